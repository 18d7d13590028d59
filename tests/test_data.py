"""Tests of the data layer: corpus, tokenizer, packed streaming batches, exact resume."""

from __future__ import annotations

import itertools
import math
import re
import warnings

import pytest
import torch

from smk_lightning.data import DOMAINS, SMKDataModule, generate_documents, unigram_entropy
from smk_lightning.data.loader import EpochStatefulDataLoader
from smk_lightning.data.tokenizer import EOT_ID, load_tokenizer

SMALL = dict(
    seq_len=32, batch_size=4, train_tokens=20_000, val_tokens=4_096, vocab_size=512, seed=7
)


def _dm(tmp_path, **kw):
    args = {**SMALL, "cache_dir": str(tmp_path / "cache"), **kw}
    dm = SMKDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "targets", "domain"))


# ----------------------------------------------------------------------------- corpus
def test_corpus_deterministic_domains_and_arithmetic():
    a = list(generate_documents(3, 50_000))
    b = list(generate_documents(3, 50_000))
    c = list(generate_documents(4, 50_000))
    assert a == b
    assert a != c
    assert len(DOMAINS) >= 5
    assert {d["domain"] for d in a} == set(DOMAINS)
    n_checked = 0
    for d in a:
        if d["domain"] != "arithmetic":
            continue
        for line in d["text"].splitlines():
            m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", line)
            assert m, line
            x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
            assert {"+": x + y, "-": x - y, "*": x * y}[op] == z, line
            n_checked += 1
    assert n_checked > 50


# ----------------------------------------------------------------------------- batches
def test_batch_shapes_targets_domains(tmp_path):
    dm = _dm(tmp_path)
    assert dm.domain_names == list(DOMAINS)
    assert dm.eot_id == EOT_ID == 0
    assert dm.tokenizer.token_to_id("<|endoftext|>") == 0
    assert dm.tokenizer.get_vocab_size() <= SMALL["vocab_size"]
    loader = dm.train_dataloader()
    assert isinstance(loader, EpochStatefulDataLoader)
    batches = _take(iter(loader), 5)
    prev = None
    for b in batches:
        for k in ("input_ids", "targets", "domain"):
            assert b[k].shape == (4, 32) and b[k].dtype == torch.long
        # targets are input_ids shifted by one (within each packed window)
        assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
        assert b["domain"].min() >= 0 and b["domain"].max() < len(DOMAINS)
        assert b["input_ids"].max() < SMALL["vocab_size"]
        prev = b
    # consecutive windows of one stream overlap by one token (stride seq_len)
    assert torch.equal(prev["targets"][0, -1], prev["input_ids"][1, 0])
    # documents are separated by <|endoftext|>
    assert (torch.cat([b["targets"] for b in batches]) == EOT_ID).any()
    # an epoch is train_tokens tokens
    n = sum(1 for _ in dm.train_dataloader())
    assert n == SMALL["train_tokens"] // (32 * 4)


def test_domain_label_matches_document(tmp_path):
    dm = _dm(tmp_path)
    tok = dm.tokenizer
    b = next(iter(dm.val_dataloader()))
    arith = dm.domain_names.index("arithmetic")
    rows = b["targets"][b["domain"] == arith]
    text = tok.decode([t for t in rows.tolist() if t != EOT_ID])
    assert re.search(r"\d+ [-+*] \d+ = \d+", text)


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_exact(tmp_path, num_workers):
    dm = _dm(tmp_path, num_workers=num_workers)
    n, m = 7, 9
    loader = dm.train_dataloader()
    it = iter(loader)
    first = _take(it, n)
    state = loader.state_dict()
    expected = _take(it, m)

    dm2 = _dm(tmp_path, num_workers=num_workers)
    loader2 = dm2.train_dataloader()
    loader2.load_state_dict(state)
    got = _take(iter(loader2), m)
    assert all(_same(a, b) for a, b in zip(expected, got))
    # no repeat: resumed batches differ from those before the checkpoint
    assert not any(_same(a, b) for a in first for b in got)


def test_resume_across_epochs_and_epochs_differ(tmp_path):
    dm = _dm(tmp_path, train_tokens=4_096)
    loader = dm.train_dataloader()
    epoch0 = list(loader)
    it = iter(loader)  # epoch 1
    _take(it, 3)
    state = loader.state_dict()
    rest1 = list(it)
    epoch2 = list(loader)
    assert len(epoch0) == 4_096 // (32 * 4)
    assert not all(_same(a, b) for a, b in zip(epoch0, epoch2))  # reshuffled per epoch

    loader2 = _dm(tmp_path, train_tokens=4_096).train_dataloader()
    loader2.load_state_dict(state)
    got_rest1 = list(loader2)
    got_epoch2 = list(loader2)
    assert len(got_rest1) == len(rest1) and all(_same(a, b) for a, b in zip(rest1, got_rest1))
    assert len(got_epoch2) == len(epoch2) and all(_same(a, b) for a, b in zip(epoch2, got_epoch2))


def test_workers_do_not_duplicate(tmp_path):
    dm0 = _dm(tmp_path, num_workers=0)
    dm2 = _dm(tmp_path, num_workers=2)
    v0 = [r for b in dm0.val_dataloader() for r in b["input_ids"].tolist()]
    v2 = [r for b in dm2.val_dataloader() for r in b["input_ids"].tolist()]
    # rows from the two workers are disjoint documents, not copies
    assert len({tuple(r) for r in v2}) == len(v2)
    assert len(v2) > 0 and len(v0) > 0


# ----------------------------------------------------------------------------- validation
def test_validation_split_fixed(tmp_path):
    a = list(_dm(tmp_path).val_dataloader())
    dm = _dm(tmp_path)
    b = list(dm.val_dataloader())
    c = list(dm.val_dataloader())
    assert len(a) == math.ceil(SMALL["val_tokens"] / (32 * 4))
    assert all(_same(x, y) and _same(x, z) for x, y, z in zip(a, b, c))


def test_val_unigram_entropy(tmp_path):
    dm = _dm(tmp_path)
    h = dm.val_unigram_entropy()
    assert math.isfinite(h) and 2.0 < h < math.log(SMALL["vocab_size"])
    assert unigram_entropy([1, 1, 1]) == 0.0
    assert unigram_entropy([0, 1]) == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------- user data
def _write_text(path, n_lines=600):
    docs = itertools.islice(generate_documents(11, 10**9), n_lines)
    lines = [" ".join(d["text"].split()) for d in docs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def test_text_file(tmp_path):
    f = tmp_path / "corpus.txt"
    _write_text(f)
    dm = _dm(tmp_path, data_files=str(f), data_format="text", val_fraction_docs=10)
    assert dm.domain_names == []  # user text has no domain labels ...
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == (4, 32) and "domain" not in b  # ... and batches invent none
    assert len(list(dm.val_dataloader())) > 0
    # train and val documents are disjoint
    assert dm._train_ds.source.split == "train" and dm._val_ds.source.split == "val"


def test_json_glob(tmp_path):
    import json

    for i in range(2):
        with open(tmp_path / f"part{i}.jsonl", "w") as fh:
            for d in generate_documents(20 + i, 60_000):
                fh.write(json.dumps({"body": d["text"]}) + "\n")
    dm = _dm(
        tmp_path, data_files=str(tmp_path / "part*.jsonl"), data_format="json", text_field="body"
    )
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (4, 32)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError) as e:
        SMKDataModule(data_files=str(tmp_path / "nope*.txt"), cache_dir=str(tmp_path))
    assert "\n" not in str(e.value) and "nope" in str(e.value)
    with pytest.raises(ValueError, match="data_format"):
        SMKDataModule(data_format="csv", cache_dir=str(tmp_path))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        SMKDataModule(data_files=str(tmp_path / "empty.txt"), cache_dir=str(tmp_path))
    f = tmp_path / "short.txt"
    f.write_text("hello world\n" * 3)
    with pytest.raises(ValueError, match="fewer than"):
        _dm(tmp_path, data_files=str(f), seq_len=512)


def test_invalid_utf8_lines_skipped(tmp_path):
    f = tmp_path / "mixed.txt"
    lines = _write_text(f)
    with open(f, "ab") as fh:
        for _ in range(5):
            fh.write(b"bad \xff\xfe bytes here\n")
        fh.write(b"\xc3\x28 also bad\n")
    with pytest.warns(UserWarning, match="skipping 6 line"):
        dm = _dm(tmp_path, data_files=str(f), val_fraction_docs=10)
    assert dm.bad_lines == 6
    text = "".join(
        dm.tokenizer.decode(b["input_ids"][i].tolist())
        for b in dm.train_dataloader()
        for i in range(4)
    )
    assert "\ufffd" not in text and "bad" not in text
    assert len(lines) > 0
    g = tmp_path / "allbad.txt"
    g.write_bytes(b"\xff\xfe\n" * 4)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="no usable"):
        warnings.simplefilter("ignore")
        _dm(tmp_path, data_files=str(g))


def test_tokenizer_too_large(tmp_path):
    dm = _dm(tmp_path)
    path = dm._tokenizer_file
    n = dm.tokenizer.get_vocab_size()
    with pytest.raises(ValueError, match=f"{n} tokens but vocab_size is 100"):
        load_tokenizer(path, 100)
    dm2 = SMKDataModule(
        **{**SMALL, "vocab_size": 100}, tokenizer_path=path, cache_dir=str(tmp_path / "c2")
    )
    with pytest.raises(ValueError, match="vocab_size"):
        dm2.prepare_data()


def test_lightning_checkpoint_resume_exact(tmp_path):
    """Through Trainer.fit: Lightning checkpoints the loader state; resume neither skips nor repeats."""
    import lightning as L

    seen: list[torch.Tensor] = []

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(SMALL["vocab_size"], 4)
            self.out = torch.nn.Linear(4, SMALL["vocab_size"])

        def training_step(self, batch, _):
            seen.append(batch["input_ids"].clone())
            logits = self.out(self.emb(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["targets"].flatten()
            )

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps, ckpt=None):
        dm = SMKDataModule(**{**SMALL, "train_tokens": 1_024}, cache_dir=str(tmp_path / "cache"))
        trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(Tiny(), datamodule=dm, ckpt_path=ckpt)
        return trainer

    fit(13)  # epochs of 8 steps: crosses an epoch boundary
    full = list(seen)
    seen.clear()
    fit(11).save_checkpoint(tmp_path / "a.ckpt")
    fit(13, str(tmp_path / "a.ckpt"))
    assert len(seen) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(full, seen))


# ----------------------------------------------------------------------------- own text: feedback
def _write_jsonl(path, n=600, field="text"):
    import json

    docs = list(itertools.islice(generate_documents(12, 10**9), n))
    with open(path, "w") as fh:
        for d in docs:
            fh.write(json.dumps({field: d["text"], "id": 1}) + "\n")
    return [d["text"] for d in docs]


def test_format_inferred_from_extension(tmp_path):
    """A .jsonl file without data_format is read as JSON: batches hold the documents' text, not raw JSON."""
    _write_jsonl(tmp_path / "docs.jsonl")
    dm = _dm(tmp_path, data_files=str(tmp_path / "docs.jsonl"))
    assert dm.data_format == "json"
    text = "".join(dm.tokenizer.decode(r) for b in itertools.islice(dm.train_dataloader(), 5)
                   for r in b["input_ids"].tolist())
    assert '"text"' not in text and '"id"' not in text and "{" not in text
    assert "json, inferred from the extension" in dm.describe()


def test_describe_counts_documents_and_tokens(tmp_path):
    import zlib

    f = tmp_path / "corpus.txt"
    lines = _write_text(f)
    dm = _dm(tmp_path, data_files=str(f), val_fraction_docs=10)
    line = dm.describe()
    n_val = sum(zlib.crc32(t.encode()) % 10 == 0 for t in lines)
    assert f"{len(lines) - n_val:,} train / {n_val:,} val documents" in line
    train_tok = sum(len(dm.tokenizer.encode(t).ids) + 1 for t in lines if zlib.crc32(t.encode()) % 10)
    assert f"{train_tok:,} train / " in line
    assert "one document in 10 held out" in line and "corpus.txt" in line
    vocab = dm.tokenizer.get_vocab_size()
    assert f"tokenizer: {vocab} tokens, trained on" in line
    assert "cached at" in _dm(tmp_path, data_files=str(f), val_fraction_docs=10).describe()
    assert "\n" not in line


def test_describe_embedded(tmp_path):
    line = _dm(tmp_path).describe()
    assert "embedded corpus" in line and f"{SMALL['train_tokens']:,} train tokens per epoch" in line


def test_sample_prompts(tmp_path):
    """Embedded corpus: one built-in prompt per domain; user text: heads of held-out documents."""
    import zlib

    from smk_lightning.data.corpus import PROMPTS

    assert _dm(tmp_path).sample_prompts() == list(PROMPTS)
    f = tmp_path / "corpus.txt"
    lines = _write_text(f)
    prompts = _dm(tmp_path, data_files=str(f), val_fraction_docs=10).sample_prompts(3)
    val_docs = [t for t in lines if zlib.crc32(t.encode()) % 10 == 0]
    assert len(prompts) == 3
    assert prompts[0] == " ".join(val_docs[0].split()[:6])[:48].rstrip()
    assert all(any(d.startswith(p) for d in val_docs) for p in prompts)


# ----------------------------------------------------------------------------- compressed files
@pytest.mark.parametrize("ext", [".gz", ".bz2", ".xz"])
@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_compressed_files_read_as_the_uncompressed_ones(tmp_path, kind, ext):
    """``x.jsonl.gz`` is JSON lines, ``x.txt.bz2`` text: the same documents, tokens and
    batches as the uncompressed file (the format under the compression suffix)."""
    import bz2
    import gzip
    import lzma

    plain = tmp_path / "plain" / f"docs.{kind}"
    plain.parent.mkdir()
    if kind == "txt":
        _write_text(plain)
    else:
        _write_jsonl(plain)
    packed = tmp_path / "packed" / f"docs.{kind}{ext}"
    packed.parent.mkdir()
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[ext]
    with opener(packed, "wb") as fh:
        fh.write(plain.read_bytes())
    a = _dm(tmp_path / "plain", data_files=str(plain))
    b = _dm(tmp_path / "packed", data_files=str(packed))
    assert a.data_format == b.data_format == ("text" if kind == "txt" else "json")
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    for x, y in zip(itertools.islice(a.train_dataloader(), 3), itertools.islice(b.train_dataloader(), 3)):
        assert torch.equal(x["input_ids"], y["input_ids"])
    assert a.describe().split("tokenizer")[0] == b.describe().replace(packed.name, plain.name).split("tokenizer")[0]
