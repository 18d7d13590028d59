"""``SMKDataModule``: streamed, packed, resumable language-model data for Lightning."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from smk_lightning.errors import ConfigError, one_line

from .corpus import DOMAINS, PROMPTS, corpus_dir, write_corpus
from .formats import (
    DECOMPRESS_ERRORS,
    check_compression,
    check_file,
    check_first_row,
    infer_format,
    open_bytes,
    read_error,
)
from .loader import EpochStatefulDataLoader
from .metrics import unigram_entropy
from .pieces import PIECE_CHARS, open_text, read_pieces
from .stream import PackedTokenStream, Source
from .summary import COUNT_MAX_CHARS, count_lines, count_user_data, fmt_count, held_out_prompts
from .tokenizer import EOT_ID, get_or_train_tokenizer, load_tokenizer

DATA_FORMATS = ("text", "json", "parquet")
#: Generous characters-per-token used to size the embedded corpus (measured ~3.1 at
#: vocab 2048); each pass is then capped at exactly ``train_tokens`` / ``val_tokens``.
CHARS_PER_TOKEN = 4.0
TOKENIZER_TRAIN_CHARS = 2_000_000


def _count_text_lines(f: str) -> tuple[int, int, int]:
    """(records that are not valid UTF-8 text, non-empty text records, characters in the last of
    those) of a text file (decompressed as its extension says), read as the stream reads it: a
    record is a line, or a ``PIECE_CHARS`` piece of a longer line, so memory stays bounded. A
    file that looks binary is refused."""
    bad = good = last = 0
    with open_bytes(f) as fh:
        if b"\0" in fh.read(8192):  # git's heuristic: NUL bytes near the start mean binary
            raise _one_line(
                f"data_files: {f!r} looks like a binary file (it contains NUL bytes), not text; "
                "pass UTF-8 text files (compressed ones if they end in .gz, .bz2 or .xz), "
                "or set data_format to json/parquet for such files."
            )
    with open_text(f) as fh:
        for record in read_pieces(fh):
            if "\ufffd" in record or "\0" in record:  # skipped by the stream (bytes that are not UTF-8)
                bad += 1
            elif record.strip():
                good += 1
                last = len(record)
    return bad, good, last


def _one_line(msg: str) -> ConfigError:
    return ConfigError(one_line(msg))


class SMKDataModule(L.LightningDataModule):
    """Streamed, tokenized and packed language-model data with exact mid-epoch resume.

    By default an embedded synthetic corpus with five domains (prose, arithmetic,
    code, records, copy) is generated once into ``cache_dir``; local files or a
    Hugging Face hub dataset can be used instead. Every source is streamed as a
    ``datasets`` iterable dataset (``load_dataset(..., streaming=True)``; plain text
    through our own reader, which reads a line longer than ``PIECE_CHARS`` = 16,384
    characters as several documents, so memory follows the piece, not the line),
    sharded over ranks and dataloader workers, tokenized with a byte-level BPE
    (trained on the head of the training stream and cached; long documents of any
    format are tokenized in pieces), separated by ``<|endoftext|>`` (id 0) and
    packed into windows. A batch is a dict of ``[batch_size, seq_len]`` int64
    tensors: ``input_ids``, ``targets`` (``input_ids`` shifted by one) and
    ``domain`` (index into ``domain_names`` of each target token's document; only for
    the embedded corpus, whose documents are labelled).

    Args:
        seq_len: Tokens per training example (context length).
        batch_size: Examples per batch on each device.
        train_tokens: Target tokens per training epoch. For the embedded corpus this
            also sizes the generated training split; an epoch stops after this many
            tokens. Ignored for user data (an epoch is one pass over the files).
        val_tokens: Tokens in the embedded corpus's validation split (the fixed
            validation set; identical on every validation run).
        vocab_size: Target size of the BPE vocabulary; the model's vocabulary is
            linked to this value. The trained tokenizer may end up smaller, never larger.
        seed: Seed of the embedded corpus, the tokenizer cache key and the training
            shuffle order.
        data_files: Path or glob (comma-separated for several) of local files to
            train on instead of the embedded corpus. None uses the embedded corpus.
        data_format: Format of ``data_files``: "text" (one document per line; a
            line longer than 16,384 characters, such as a book without newlines, is
            read as documents of at most that many characters, cut at whitespace;
            lines that are not valid UTF-8 are skipped and counted), "json"
            (JSON lines) or "parquet". None infers it from the file extension
            (.jsonl/.json/.ndjson: json, .parquet/.pq: parquet, anything else: text).
            Text and JSON lines may be compressed (.gz, .bz2, .xz after the extension).
        text_field: Field holding the document text in json/parquet/hub rows
            (plain text files have one field, "text").
        hub_dataset: Name of a Hugging Face hub dataset to stream (its "train"
            split) instead of local files; needs network access. Takes precedence
            over ``data_files``.
        val_fraction_docs: For user data, about one document in this many goes to
            validation (chosen by a hash of its text, so the split does not depend on
            ranks or workers); the rest is training data. The pieces of a long text
            line are documents here too, so a single-line file is split as well.
        tokenizer_path: Existing tokenizer.json to use instead of training one; its
            vocabulary must not exceed ``vocab_size``.
        cache_dir: Directory for the generated corpus and cached tokenizers.
        num_workers: Dataloader worker processes per device (0 = main process).
            Work is split by file shards, so more workers than shards idle.
        shuffle_buffer: Documents held in the training shuffle buffer (it is saved
            in checkpoints, so keep it moderate).
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 16,
        train_tokens: int = 2_500_000,
        val_tokens: int = 65_536,
        vocab_size: int = 2048,
        seed: int = 1234,
        data_files: str | None = None,
        data_format: Literal["text", "json", "parquet"] | None = None,
        text_field: str = "text",
        hub_dataset: str | None = None,
        val_fraction_docs: int = 50,
        tokenizer_path: str | None = None,
        cache_dir: str = "data_cache",
        num_workers: int = 0,
        shuffle_buffer: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if data_format is not None and data_format not in DATA_FORMATS:
            raise _one_line(
                f"data_format={data_format!r} is not supported; use one of {', '.join(DATA_FORMATS)}."
            )
        if seq_len < 1 or batch_size < 1:
            raise _one_line(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1.")
        if val_fraction_docs < 2:
            raise _one_line(
                f"val_fraction_docs={val_fraction_docs} must be >= 2 (one doc in n goes to validation)."
            )
        if tokenizer_path and not os.path.isfile(os.path.expanduser(tokenizer_path)):
            raise _one_line(
                f"tokenizer_path {tokenizer_path!r} does not exist; pass an existing tokenizer.json "
                "or leave it unset to train one."
            )
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        self.vocab_size = vocab_size
        self.seed = seed
        self.data_format = data_format
        self.text_field = text_field
        self.hub_dataset = hub_dataset
        self.val_fraction_docs = val_fraction_docs
        self.tokenizer_path = tokenizer_path
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.data_files: list[str] | None = None
        if hub_dataset is None and data_files is not None:
            self.data_files = self._resolve_files(data_files)
            if data_format is None:
                self.data_format = infer_format(self.data_files)
        self._format_inferred = data_format is None
        self._tokenizer_origin = ""  # how the tokenizer was obtained, for the summary line
        self._described = False
        self._prompts: list[str] | None = None
        self._tokenizer = None
        self._tokenizer_file: str | None = None
        self._train_ds: PackedTokenStream | None = None
        self._val_ds: PackedTokenStream | None = None
        self._val_entropy: float | None = None
        self.bad_lines = 0
        self._docs: int | None = None  # usable documents (records) of text files, once scanned
        self._doc_chars = 0  # characters of the last of them (the only one, when there is one)

    # ------------------------------------------------------------------ properties
    @property
    def embedded(self) -> bool:
        return self.hub_dataset is None and self.data_files is None

    @property
    def domain_names(self) -> list[str]:
        """Names of the domain labels in batches: the embedded domains; empty for user text,
        whose batches carry no ``domain`` (so no domain heatmaps or domain NMI are logged)."""
        return list(DOMAINS) if self.embedded else []

    @property
    def eot_id(self) -> int:
        return EOT_ID

    @property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` (available after ``prepare_data``/``setup``)."""
        if self._tokenizer is None:
            self._prepare()
        return self._tokenizer

    # ------------------------------------------------------------------ sources
    def _resolve_files(self, spec: str) -> list[str]:
        files: list[str] = []
        for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
            matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise _one_line(
                    f"data_files={part!r} matches no file; pass an existing path or glob, "
                    f"or leave data_files unset to use the embedded corpus."
                )
            files += matches
        if all(os.path.getsize(f) == 0 for f in files):
            raise _one_line(
                f"data_files={spec!r}: all {len(files)} file(s) are empty; pass files with text in them."
            )
        return files

    def _embedded_paths(self) -> tuple[int, int]:
        train_chars = max(int(self.train_tokens * CHARS_PER_TOKEN), 20_000)
        val_chars = max(int(self.val_tokens * CHARS_PER_TOKEN), 20_000)
        return train_chars, val_chars

    def _sources(self) -> tuple[Source, Source]:
        if self.embedded:
            train_files, val_files = write_corpus(
                self.cache_dir, self.seed, *self._embedded_paths()
            )
            kw = dict(format="json", domain_field="domain", domain_names=tuple(DOMAINS))
            return Source(data_files=tuple(train_files), **kw), Source(
                data_files=tuple(val_files), **kw
            )
        fmt = "hub" if self.hub_dataset else self.data_format
        kw = dict(
            format=fmt,
            data_files=tuple(self.data_files or ()),
            hub_dataset=self.hub_dataset,
            text_field="text" if fmt == "text" else self.text_field,  # datasets' text builder
            val_every=self.val_fraction_docs,
        )
        return Source(split="train", **kw), Source(split="val", **kw)

    def _tokenizer_cache(self) -> Path:
        if self.embedded:
            d = corpus_dir(self.cache_dir, self.seed, *self._embedded_paths())
            return d / f"tokenizer_vocab{self.vocab_size}.json"
        if self.hub_dataset:
            desc = f"hub:{self.hub_dataset}:{self.text_field}"
        else:
            stats = [
                (os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f)))
                for f in self.data_files
            ]
            desc = f"{self.data_format}:{self.text_field}:{stats}"
        key = hashlib.sha1(
            f"{desc}|{self.vocab_size}|{self.seed}|{self.val_fraction_docs}".encode()
        ).hexdigest()[:16]
        return Path(self.cache_dir) / f"tokenizer_{key}" / "tokenizer.json"

    def _scan_text_files(self) -> None:
        """Count lines that are not valid UTF-8; fail if no usable line remains."""
        bad = good = 0
        for f in self.data_files:
            try:
                bad_f, good_f, last_f = _count_text_lines(f)
            except DECOMPRESS_ERRORS as e:  # a compressed file that does not decompress
                raise read_error(f, e) from None
            bad, good = bad + bad_f, good + good_f
            if good_f:
                self._doc_chars = last_f
        self.bad_lines = bad
        self._docs = good
        if good == 0:
            raise _one_line(
                f"data_files {self.hparams.data_files!r} contain no usable text lines "
                f"({bad} lines that are not valid UTF-8 text); pass UTF-8 text files with content."
            )
        if bad:
            warnings.warn(
                f"data_files: skipping {bad} line(s) that are not valid UTF-8 text ({good} usable lines).",
                stacklevel=2,
            )

    def _prepare(self) -> None:
        """Write the corpus, train/load the tokenizer (idempotent, cached on disk) and check
        that each split fills at least one block (before any run directory is written)."""
        if self._tokenizer is not None:
            return
        self._load_tokenizer()
        self._check_blocks()

    def _check_user_data(self, train_src: Source) -> None:
        """Fail in one line on files of the wrong format or rows without the text field,
        before a tokenizer is trained on nothing."""
        if self.hub_dataset:
            check_first_row(train_src, f"hub_dataset {self.hub_dataset!r}")
            return
        check_compression(self.data_files, self.data_format)
        for f in self.data_files:
            check_file(f, self.data_format)
        if self.data_format == "text":
            self._scan_text_files()
        else:
            check_first_row(dataclasses.replace(train_src, data_files=(self.data_files[0],)),
                            f"data_files {self.data_files[0]!r}")

    def _load_tokenizer(self) -> None:
        train_src, _ = self._sources()
        if not self.embedded:
            self._check_user_data(train_src)
        if self.tokenizer_path:
            self._tokenizer = load_tokenizer(self.tokenizer_path, self.vocab_size)
            self._tokenizer_file = str(self.tokenizer_path)
            self._tokenizer_origin = f"loaded from {self.tokenizer_path}"
            return
        cache = self._tokenizer_cache()
        self._tokenizer_origin = (
            f"cached at {cache}" if cache.is_file()
            else f"trained on up to {fmt_count(TOKENIZER_TRAIN_CHARS)} characters of the train split, saved to {cache}"
        )

        def head_texts():
            for ex in train_src.load():
                doc = train_src.parse(ex)
                if doc is not None:
                    yield doc[0]

        self._tokenizer = get_or_train_tokenizer(
            cache, head_texts, self.vocab_size, TOKENIZER_TRAIN_CHARS
        )
        self._tokenizer_file = str(cache)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        self._prepare()

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _make_stream(self, split: str, rank: int = 0, world: int = 1) -> PackedTokenStream:
        train_src, val_src = self._sources()
        if split == "train":
            return PackedTokenStream(
                train_src,
                self._tokenizer_file,
                self.seq_len,
                rank,
                world,
                shuffle=True,
                seed=self.seed,
                token_cap=self.train_tokens if self.embedded else None,
                buffer_docs=self.shuffle_buffer,
            )
        if not self.embedded:
            # Your text's validation split is not sharded: every rank evaluates the same blocks.
            # Sharded by document, ranks got different numbers of blocks (nothing caps them as
            # ``val_tokens`` caps the embedded split), and then different batch sizes (Lightning's
            # sync_dist mean floors the summed batch size, Lightning-AI/pytorch-lightning#21838:
            # val/loss came out 1.1–1.5 × log(val/ppl) on 2 ranks) or batch counts (the validation
            # statistics' collectives then pair up wrongly). Duplicated, the numbers equal one
            # process's.
            rank, world = 0, 1
        return PackedTokenStream(
            val_src,
            self._tokenizer_file,
            self.seq_len,
            rank,
            world,
            shuffle=False,
            seed=self.seed,
            token_cap=self.val_tokens if self.embedded else None,
        )

    def _check_blocks(self) -> None:
        for split in ("train", "val"):
            probe = next(iter(self._make_stream(split)), None)
            if probe is None:
                short = f"the {split} split has fewer than seq_len+1={self.seq_len + 1} tokens"
                if self._docs == 1:  # documents are held out whole: one cannot be split
                    raise _one_line(
                        f"{short}: data_files hold a single document (one line of {self._doc_chars:,} "
                        "characters, without newlines), and a document goes whole to the train or the "
                        "validation split; pass more text, or break it into lines (each line is a "
                        f"document, one in {self.val_fraction_docs} held out for validation; a line longer "
                        f"than {PIECE_CHARS:,} characters is read as several)."
                    )
                hint = (
                    "use more data or a smaller seq_len"
                    if split == "train"
                    else "use more data, a smaller seq_len or a smaller val_fraction_docs"
                )
                if self._docs is not None:
                    hint = (f"data_files hold {self._docs:,} documents (lines, and {PIECE_CHARS:,}-character "
                            f"pieces of longer lines), one in {self.val_fraction_docs} held out; {hint}")
                raise _one_line(f"{short}; {hint}.")

    def setup(self, stage: str | None = None) -> None:
        self._prepare()
        rank, world = self._rank_world()
        if rank == 0 and not self._described:
            self._described = True
            rank_zero_info(f"data: {self.describe()}")
        if self._train_ds is not None:
            return
        self._train_ds = self._make_stream("train", rank, world)
        self._val_ds = self._make_stream("val", rank, world)

    def _loader(
        self, ds: PackedTokenStream, drop_last: bool, lag: int = 0
    ) -> EpochStatefulDataLoader:
        return EpochStatefulDataLoader(
            ds,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            drop_last=drop_last,
            persistent_workers=False,
            consumer_lag=lag,
        )

    def train_dataloader(self) -> EpochStatefulDataLoader:
        if self._train_ds is None:
            self.setup("fit")
        # Lightning's fit loop prefetches one batch before checkpointing (see EpochStatefulDataLoader)
        lag = 1 if getattr(self, "trainer", None) is not None else 0
        return self._loader(self._train_ds, drop_last=True, lag=lag)

    def val_dataloader(self) -> EpochStatefulDataLoader:
        if self._val_ds is None:
            self.setup("validate")
        return self._loader(self._val_ds, drop_last=False)

    # ------------------------------------------------------------------ statistics
    def val_unigram_entropy(self) -> float:
        """Unigram entropy (nats) of the whole validation split's target tokens."""
        if self._val_entropy is None:
            self._prepare()
            import torch

            targets = [b["targets"] for b in self._make_stream("val")]
            if not targets:
                raise _one_line(
                    "the validation split is empty; use more data or a smaller seq_len."
                )
            self._val_entropy = unigram_entropy(torch.cat(targets))
        return self._val_entropy

    # ------------------------------------------------------------------ feedback
    def describe(self) -> str:
        """One line about the data: source, documents and tokens per split, how validation
        is held out, and the tokenizer (counting reads at most ``COUNT_MAX_CHARS`` of user text)."""
        self._prepare()
        vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        tokenizer = f"tokenizer: {vocab:,} tokens, {self._tokenizer_origin}"
        if self.embedded:
            train_src, val_src = self._sources()
            docs = f"{count_lines(train_src.data_files):,} train / {count_lines(val_src.data_files):,} val documents"
            return (f"embedded corpus ({len(DOMAINS)} domains: {', '.join(DOMAINS)}), {docs}; "
                    f"{self.train_tokens:,} train tokens per epoch, {self.val_tokens:,} val tokens "
                    f"(a separately generated split); {tokenizer}")
        hold_out = (f"validation: one document in {self.val_fraction_docs} held out by text hash "
                    f"(--data.val_fraction_docs)")
        if self.hub_dataset:  # counting would download it: say what is known
            return (f"hub dataset {self.hub_dataset!r} (field {self.text_field!r}), streamed, not counted; "
                    f"{hold_out}; {tokenizer}")
        names = ", ".join(Path(f).name for f in self.data_files[:3])
        more = f" and {len(self.data_files) - 3} more" if len(self.data_files) > 3 else ""
        how = "inferred from the extension" if self._format_inferred else "data_format"
        field = f", field {self.text_field!r}" if self.data_format != "text" else ""
        bad = f", {self.bad_lines} invalid lines skipped" if self.bad_lines else ""
        where = f"{len(self.data_files)} file(s) ({names}{more}; {self.data_format}, {how}{field}{bad})"
        train_src, _ = self._sources()
        c = count_user_data(dataclasses.replace(train_src, split=None), self._tokenizer)
        at_least = "" if c.complete else "at least "
        counted = "" if c.complete else f" (counted in the first {fmt_count(COUNT_MAX_CHARS)} characters)"
        return (f"{where}: {at_least}{c.docs['train']:,} train / {c.docs['val']:,} val documents, "
                f"{c.tokens['train']:,} train / {c.tokens['val']:,} val tokens{counted}; {hold_out}; {tokenizer}")

    def sample_prompts(self, n: int = 5) -> list[str]:
        """Prompts for text samples: one per domain for the embedded corpus; for user text the
        opening words of the first ``n`` held-out (validation) documents, so samples continue
        the user's own kind of text."""
        if self._prompts is None:
            if self.embedded:
                self._prompts = list(PROMPTS)
            else:
                _, val_src = self._sources()
                self._prompts = held_out_prompts(val_src, n)
        return list(self._prompts)
