"""Packed token stream over a streaming Hugging Face dataset, with exact resume.

Pipeline, per rank and per dataloader worker::

    datasets.load_dataset(fmt, data_files, streaming=True)     # documents (json, parquet, hub)
    datasets.IterableDataset.from_generator(text_file_records) # text: lines, long ones in pieces
      -> split_dataset_by_node(rank, world_size)                # rank shards
      -> .shuffle(seed, buffer_size=1) + set_epoch(epoch)       # shard order per epoch (train)
      -> (worker split by datasets' own torch-worker sharding)
      -> our seeded document shuffle buffer (train)             # checkpointed, unlike datasets'
      -> tokenize (long documents PIECE_CHARS characters at a time), append <|endoftext|>,
         pack seq_len+1 windows (stride seq_len)

``datasets``' own shuffle buffer is not saved in its ``state_dict`` (it is refilled
on resume, so examples would be skipped), hence we shuffle shard order with
``buffer_size=1`` and keep our own document buffer, whose contents, RNG state,
packing buffer, epoch and the ``datasets`` stream state are all in ``state_dict()``.
"""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .pieces import ENCODE_CHARS, encode_in_pieces, text_file_records
from .tokenizer import EOT_ID


class _DropShuffleBufferNote(logging.Filter):
    """datasets says a resumed stream's "shuffle buffer … will be refilled": our buffer_size
    is 1 (the packer shuffles in its own checkpointed buffer), so the note would only
    contradict "resume is exact"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer" not in record.getMessage()


logging.getLogger("datasets.iterable_dataset").addFilter(_DropShuffleBufferNote())


@dataclass(frozen=True)
class Source:
    """Where documents come from (picklable; the HF dataset is built lazily in each worker)."""

    format: str  # "json" | "text" | "parquet" | "hub"
    data_files: tuple[str, ...] = ()
    hub_dataset: str | None = None
    text_field: str = "text"
    domain_field: str | None = None  # embedded corpus: "domain"
    domain_names: tuple[str, ...] = ()
    split: str | None = None  # None: all docs; "train"/"val": hash split of user data
    val_every: int = 50

    @property
    def labelled(self) -> bool:
        """Documents carry a domain label (the embedded corpus); user text does not."""
        return self.domain_field is not None

    def is_val(self, text: str) -> bool:
        """Hash split of user data: about one document in ``val_every`` is held out (a piece
        of a long text line is a document)."""
        return zlib.crc32(text.encode("utf-8", "replace")) % self.val_every == 0

    def load(self):
        import datasets

        if self.format == "hub":
            return datasets.load_dataset(self.hub_dataset, split="train", streaming=True)
        if self.format == "text":
            # Our reader, not datasets' text builder (which holds a line whole however long it
            # is): lines of at most PIECE_CHARS characters are its rows, longer lines come in
            # pieces. Bad bytes -> U+FFFD; such records are skipped. The list of files is the
            # shards, as the builder's are, so sharding, shard shuffling and resume positions
            # are the same.
            return datasets.IterableDataset.from_generator(
                text_file_records,
                features=datasets.Features({"text": datasets.Value("string")}),
                gen_kwargs={"files": list(self.data_files)},
            )
        return datasets.load_dataset(
            self.format, data_files=list(self.data_files), split="train", streaming=True
        )

    def parse(self, ex: dict) -> tuple[str, int] | None:
        """Return ``(text, domain_index)`` or ``None`` to skip the document."""
        text = ex.get(self.text_field)
        if not isinstance(text, str) or not text.strip():
            return None
        if self.format == "text" and ("\ufffd" in text or "\0" in text):
            return None
        if self.split is not None and self.is_val(text) != (self.split == "val"):
            return None
        dom = 0
        if self.domain_field is not None:
            dom = self.domain_names.index(ex[self.domain_field])
        return text, dom


def _from_text_builder_state(state: Any) -> Any:
    """A ``datasets`` stream state saved while text files were read by ``datasets``' text builder
    (before long lines came in pieces), in the form the records reader has: the builder's
    ``ArrowExamplesIterable`` state sits in a ``RebatchedArrowExamplesIterable`` that the
    example-by-example iteration here never advances, and counts rows, which are the records of
    every line of at most ``PIECE_CHARS`` characters. A state of the records reader is returned
    as it is."""
    if isinstance(state, list):
        return [_from_text_builder_state(s) for s in state]
    if not isinstance(state, dict):
        return state
    if state.get("type") == "RebatchedArrowExamplesIterable" and state.get("previous_state") is None:
        return _from_text_builder_state(state["examples_iterable"])
    out = {k: _from_text_builder_state(v) for k, v in state.items()}
    if out.get("type") == "ArrowExamplesIterable":
        out["type"] = "ExamplesIterable"
    return out


def _rng_to_list(rng: random.Random) -> list:
    v, internal, gauss = rng.getstate()
    return [v, list(internal), gauss]


def _rng_from_list(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


@dataclass
class _State:
    epoch: int
    hf: dict | None = None
    buf: list = field(default_factory=list)  # [[text, domain], ...]
    rng: list | None = None
    tok: list = field(default_factory=list)
    dom: list = field(default_factory=list)
    emitted: int = 0
    exhausted: bool = False


class PackedTokenStream(IterableDataset):
    """Yields ``{"input_ids", "targets"}`` LongTensors of length ``seq_len``, plus ``"domain"``
    (each target token's document label) when the source is labelled.

    Args:
        source: document source.
        tokenizer_path: tokenizer.json to load lazily (in each worker).
        seq_len: tokens per example; windows of ``seq_len + 1`` with stride ``seq_len``.
        rank, world_size: data-parallel rank sharding.
        shuffle: train mode (shard-order shuffle + document buffer, epochs advance);
            if False the stream is fixed (validation): same blocks every pass.
        seed: shuffle seed.
        token_cap: stop a pass after this many target tokens in total (split evenly
            over ranks and workers); None = full pass over the source.
        buffer_docs: size of the document shuffle buffer.
    """

    def __init__(
        self,
        source: Source,
        tokenizer_path: str,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        token_cap: int | None = None,
        buffer_docs: int = 256,
        encode_batch: int = 64,
    ) -> None:
        super().__init__()
        self.source = source
        self.tokenizer_path = tokenizer_path
        self.seq_len = seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle
        self.seed = seed
        self.token_cap = token_cap
        self.buffer_docs = buffer_docs if shuffle else encode_batch
        self.encode_batch = encode_batch
        self._epoch = 0
        self._pending: _State | None = None
        self._live: tuple[_State, Any, random.Random] | None = None
        self._tokenizer = None

    # ------------------------------------------------------------------ pickling / epochs
    def __getstate__(self):
        d = self.__dict__.copy()
        d["_tokenizer"] = None
        d["_live"] = None
        return d

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(self.tokenizer_path)
        return self._tokenizer

    def set_epoch(self, epoch: int) -> None:
        """Start the next fresh pass at ``epoch`` (no-op for a fixed validation stream)."""
        if self.shuffle:
            self._epoch = int(epoch)
            self._pending = None

    # ------------------------------------------------------------------ state
    def _fresh(self, epoch: int) -> _State:
        return _State(epoch=epoch if self.shuffle else 0)

    def state_dict(self) -> dict[str, Any]:
        if self._live is not None:
            st, hf, rng = self._live
            out = dict(st.__dict__)
            out["hf"] = hf.state_dict()
            out["rng"] = _rng_to_list(rng)
            out["buf"] = [list(b) for b in st.buf]
            out["tok"] = list(st.tok)
            out["dom"] = list(st.dom)
            return out
        st = self._pending if self._pending is not None else self._fresh(self._epoch)
        return dict(st.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = _State(**state)
        self._live = None

    # ------------------------------------------------------------------ iteration
    def _build_hf(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        ds = self.source.load()
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=1)  # shard order only
            ds.set_epoch(epoch)
        return ds

    def __iter__(self):
        st = self._pending if self._pending is not None else self._fresh(self._epoch)
        self._pending = None
        wi = get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        cap = None
        if self.token_cap is not None:
            cap = max(self.seq_len, self.token_cap // (self.world_size * nw))
        hf = self._build_hf(st.epoch)
        if st.hf is not None:
            saved = _from_text_builder_state(st.hf) if self.source.format == "text" else st.hf
            hf.load_state_dict(saved)  # datasets applies it lazily, at the first next() below
        if st.rng is not None:
            rng = _rng_from_list(st.rng)
        else:
            rng = random.Random(f"smk-buffer-{self.seed}-{st.epoch}-{self.rank}-{wid}")
        st.buf = [list(b) for b in st.buf]
        self._live = (st, hf, rng)
        hf_iter = iter(hf)
        tok = self.tokenizer
        T = self.seq_len
        while True:
            while len(st.tok) > T and (cap is None or st.emitted < cap):
                ids = torch.tensor(st.tok[: T + 1], dtype=torch.long)
                ex = {"input_ids": ids[:-1], "targets": ids[1:]}
                # user text has no labels: no made-up "domain" (monitors then skip domain figures)
                if self.source.labelled:
                    ex["domain"] = torch.tensor(st.dom[1 : T + 1], dtype=torch.long)
                del st.tok[:T]
                del st.dom[:T]
                st.emitted += T
                yield ex
            if cap is not None and st.emitted >= cap:
                break
            # Up to encode_batch documents, or fewer long ones: ENCODE_CHARS characters bound what
            # is tokenized and held at once. The documents come out of the buffer in the same
            # order however they are grouped, so the batches do not depend on the grouping.
            docs, chars = [], 0
            while len(docs) < self.encode_batch and chars < ENCODE_CHARS:
                while not st.exhausted and len(st.buf) < self.buffer_docs:
                    ex = next(hf_iter, None)
                    if ex is None:
                        st.exhausted = True
                        break
                    doc = self.source.parse(ex)
                    if doc is not None:  # empty, undecodable or the other split's document
                        st.buf.append(list(doc))
                if not st.buf:
                    break
                if self.shuffle:
                    i = rng.randrange(len(st.buf))
                    st.buf[i], st.buf[-1] = st.buf[-1], st.buf[i]
                    docs.append(st.buf.pop())
                else:
                    docs.append(st.buf.pop(0))
                chars += len(docs[-1][0])
            if not docs:
                break
            for ids, (_, d) in zip(encode_in_pieces(tok, [t for t, _ in docs]), docs):
                st.tok.extend(ids)
                st.tok.append(EOT_ID)
                st.dom.extend([d] * (len(ids) + 1))
        # pass complete: a state_dict taken now means "start of the next epoch"
        self._live = None
        if self.shuffle:
            self._epoch = st.epoch + 1
