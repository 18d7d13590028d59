"""Long lines are read in pieces: a book or a dump without newlines trains in bounded memory, and
short-line corpora give the batches they gave when ``datasets``' text builder read them."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import smk_lightning
from smk_lightning.data import SMKDataModule, generate_documents
from smk_lightning.data.pieces import (
    PIECE_CHARS,
    encode_in_pieces,
    open_text,
    read_pieces,
    split_text,
    text_file_records,
)
from smk_lightning.data.stream import PackedTokenStream, Source
from smk_lightning.data.tokenizer import _head, train_tokenizer
from smk_lightning.errors import ConfigError

SMALL = dict(seq_len=32, batch_size=4, vocab_size=512, seed=7)


def _words(seed: int, n_chars: int) -> str:
    """Prose of about ``n_chars`` characters on one line (the embedded corpus's documents, joined)."""
    parts, n = [], 0
    for d in generate_documents(seed, n_chars):
        parts.append(" ".join(d["text"].split()))
        n += len(parts[-1]) + 1
    return " ".join(parts)[:n_chars].rstrip()


def _lines(seed: int = 11, n: int = 600) -> list[str]:
    return [" ".join(d["text"].split()) for d in itertools.islice(generate_documents(seed, 10**9), n)]


def _dm(tmp_path, **kw) -> SMKDataModule:
    dm = SMKDataModule(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _builder_load(self):
    """How text files were read before pieces: ``datasets``' text builder, a line a row."""
    import datasets

    return datasets.load_dataset("text", data_files=list(self.data_files), split="train", streaming=True,
                                 encoding_errors="replace")


def _rebuild(records: list[str], lines: list[str]) -> None:
    """The records are the lines in order, a long line as consecutive pieces that concatenate to it."""
    it = iter(records)
    for line in lines:
        got = next(it)
        while len(got) < len(line):
            got += next(it)
        assert got == line
    assert next(it, None) is None


# ----------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("n", [64, 100, PIECE_CHARS])
def test_pieces_bounded_and_concatenate_to_the_line(tmp_path, n):
    long = _words(1, 5 * n + 17)
    lines = [long, "short line", "", long[: n - 1], long[:n], long[: n + 1], long[: n + 2],
             "x" * (3 * n),  # no whitespace: cut at n exactly
             long.replace(" ", "\t")]
    f = tmp_path / "t.txt"
    f.write_text("\n".join(lines), encoding="utf-8")  # the last line has no "\n"
    with open_text(str(f)) as fh:
        records = list(read_pieces(fh, n))
    assert max(len(r) for r in records) <= n
    _rebuild(records, lines)
    # a line of at most n characters is one record, itself
    assert lines[3] in records and lines[4] in records and "short line" in records
    # a cut line's pieces after the first start at whitespace followed by a word: no word is split
    pieces = list(split_text(long, n))
    assert len(pieces) > 1 and all(p[0] == " " and not p[1].isspace() for p in pieces[1:])
    assert all(len(p) >= n // 2 for p in pieces[:-1])
    assert [len(p) for p in split_text("x" * (3 * n), n)] == [n, n, n]
    assert list(split_text("", n)) == [""] and list(split_text("ab", n)) == ["ab"]


def test_short_lines_are_the_text_builders_rows(tmp_path):
    """Universal newlines, blank lines, a last line without "\\n", bytes that are not UTF-8:
    the same rows as ``datasets.load_dataset("text")``; a compressed file the same as the
    uncompressed one (the text builder raised UnicodeDecodeError on one with bad bytes)."""
    import gzip

    body = "\n".join(_lines(n=200)).encode() + b"\r\nwindows\r\nold mac\rform\x0cfeed \xe2\x80\xa8 sep\n\n\nbad \xff\xfe\nlast"
    a = tmp_path / "a.txt"
    a.write_bytes(body)
    b = tmp_path / "b.txt.gz"
    with gzip.open(b, "wb") as fh:
        fh.write(body)
    new = [r["text"] for r in Source(format="text", data_files=(str(a),)).load()]
    old = [r["text"] for r in _builder_load(Source(format="text", data_files=(str(a),)))]
    assert new == old and len(new) == 207
    assert new[-7:] == ["windows", "old mac", "form\x0cfeed \u2028 sep", "", "", "bad \ufffd\ufffd", "last"]
    both = [r["text"] for r in Source(format="text", data_files=(str(a), str(b))).load()]
    assert both == new + new == [r["text"] for r in text_file_records([str(a), str(b)])]


def test_long_text_encoded_in_pieces_gives_the_same_ids():
    text = "\n".join(_lines(n=3000))  # ~300 k characters with newlines: many pieces
    tok = train_tokenizer([text[:200_000]], 400)
    long = text.replace("\n", " ")
    for t in (text, long, long.replace(" ", "  ")):
        assert len(list(split_text(t))) > 10
        assert encode_in_pieces(tok, [t, "short"]) == [tok.encode(t).ids, tok.encode("short").ids]
        assert encode_in_pieces(tok, [t], fast=True) == [tok.encode(t).ids]


def test_tokenizer_trainer_sees_bounded_pieces():
    long = _words(2, 10 * PIECE_CHARS)
    head = list(_head([long, "after"], max_chars=4 * PIECE_CHARS))
    assert max(len(p) for p in head) <= PIECE_CHARS
    assert 4 * PIECE_CHARS <= sum(map(len, head)) < 5 * PIECE_CHARS
    assert list(_head(["a b", "c d"], 100)) == ["a b", "c d"]  # short texts as before


# ----------------------------------------------------------------------------- same batches
def test_short_line_corpus_gives_the_same_batches(tmp_path, monkeypatch):
    """Two files of short lines (shard order shuffled per epoch): two epochs of training batches,
    the validation batches and the tokenizer equal those of the text builder."""
    for i in range(2):
        (tmp_path / f"part{i}.txt").write_text("\n".join(_lines(20 + i, 300)) + "\n", encoding="utf-8")
    spec = str(tmp_path / "part*.txt")

    def batches(dm):
        loader = dm.train_dataloader()
        return [list(loader), list(loader), list(dm.val_dataloader())]

    new_dm = _dm(tmp_path / "new", data_files=spec, val_fraction_docs=10)
    new = batches(new_dm)
    with monkeypatch.context() as m:
        m.setattr(Source, "load", _builder_load)
        old_dm = _dm(tmp_path / "old", data_files=spec, val_fraction_docs=10)
        old = batches(old_dm)
    assert new_dm.tokenizer.get_vocab() == old_dm.tokenizer.get_vocab()
    for a, b in zip(new, old):
        assert len(a) == len(b) > 0
        assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["targets"], y["targets"])
                   for x, y in zip(a, b))
    assert new_dm.describe().split("tokenizer")[0] == old_dm.describe().split("tokenizer")[0]


@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_a_position_saved_by_the_text_builder(tmp_path, monkeypatch, world):
    """A checkpoint's data position written while the text builder read the files resumes exactly."""
    f = tmp_path / "c.txt"
    f.write_text("\n".join(_lines(n=800)) + "\n", encoding="utf-8")
    dm = _dm(tmp_path, data_files=str(f))
    src = dm._train_ds.source

    def stream():
        return PackedTokenStream(src, dm._tokenizer_file, 32, rank=0, world_size=world, shuffle=True,
                                 seed=3, buffer_docs=16)

    with monkeypatch.context() as m:
        m.setattr(Source, "load", _builder_load)
        old = stream()
        it = iter(old)
        for _ in range(40):
            next(it)
        state = old.state_dict()
        expected = [next(it)["input_ids"] for _ in range(30)]
    assert "RebatchedArrowExamplesIterable" in repr(state["hf"])
    new = stream()
    new.load_state_dict(state)
    got = [b["input_ids"] for b in itertools.islice(iter(new), 30)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got)) and len(got) == 30


# ----------------------------------------------------------------------------- one long line
def test_one_line_file_trains_with_both_splits(tmp_path):
    f = tmp_path / "book.txt"
    text = _words(5, 2_000_000)  # 2 MB, no newline
    f.write_text(text, encoding="utf-8")
    dm = _dm(tmp_path, data_files=str(f), val_fraction_docs=10)
    n_pieces = -(-len(text) // PIECE_CHARS)
    assert dm._docs >= n_pieces
    train = list(itertools.islice(dm.train_dataloader(), 5))
    val = list(dm.val_dataloader())
    assert len(train) == 5 and len(val) > 0
    line = dm.describe()
    assert " val documents" in line and " 0 val documents" not in line


def test_one_line_file_memory_bounded(tmp_path):
    """A 20 MB line: prepare (scan, tokenizer training, split check), the summary line and
    batches of both splits grow the peak RSS by far less than the file (it was gigabytes)."""
    f = tmp_path / "dump.txt"
    chunk = _words(6, 1_000_000)
    with open(f, "w", encoding="utf-8") as fh:
        for _ in range(21):
            fh.write(chunk + " ")
    script = textwrap.dedent(f"""
        import itertools, resource, sys
        import datasets, lightning, tokenizers, torch  # noqa: F401  (their memory is not the data's)
        from smk_lightning.data import SMKDataModule
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before = peak()
        dm = SMKDataModule(seq_len=64, batch_size=8, vocab_size=512, data_files={str(f)!r},
                           cache_dir={str(tmp_path / "cache")!r})
        dm.prepare_data()
        dm.setup("fit")
        dm.describe()
        assert len(list(itertools.islice(dm.train_dataloader(), 20))) == 20
        assert len(list(itertools.islice(dm.val_dataloader(), 20))) > 0
        print("growth_mb", peak() - before)
    """)
    src = str(Path(smk_lightning.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    growth = float(res.stdout.split("growth_mb")[-1])
    assert os.path.getsize(f) > 20_000_000
    assert growth < 300, f"peak RSS grew by {growth:.0f} MB for a 20 MB line"


# ----------------------------------------------------------------------------- messages
def test_single_document_says_so(tmp_path):
    text = _words(8, 5_000)
    import zlib

    assert zlib.crc32(text.encode()) % 50  # the document goes to train: validation is empty
    f = tmp_path / "one.txt"
    f.write_text(text + "\n\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        _dm(tmp_path, data_files=str(f))
    msg = str(e.value)
    assert "\n" not in msg
    assert "the val split has fewer than seq_len+1=33 tokens" in msg
    assert f"a single document (one line of {len(text):,} characters, without newlines)" in msg
    assert "break it into lines" in msg and f"{PIECE_CHARS:,} characters" in msg


def test_few_documents_are_counted_in_the_message(tmp_path):
    f = tmp_path / "few.txt"
    f.write_text("hello world\n" * 3)
    with pytest.raises(ConfigError, match=r"train split has fewer than .* data_files hold 3 documents"):
        _dm(tmp_path, data_files=str(f), seq_len=512)
