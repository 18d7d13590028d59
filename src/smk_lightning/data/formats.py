"""Which reader a user's files need, and cheap checks that they hold what that reader expects.

Without these, a ``.jsonl`` file read as text trains on raw JSON (samples full of ``"text``
and ``}``), a text file read as JSON dies in a long pyarrow traceback, and a wrong
``text_field`` surfaces as "fewer than seq_len+1 tokens". Each check reads a few bytes or
the first row, before the tokenizer is trained, and fails with one line that names the file
and the flag to pass.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from pathlib import Path
from typing import IO

from smk_lightning.errors import ConfigError, one_line

#: File extension → ``datasets`` builder; any other extension is read as text (one document a line,
#: a line longer than ``pieces.PIECE_CHARS`` in pieces).
EXTENSIONS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}
#: Compressions ``datasets`` undoes by extension when it streams a file (``x.jsonl.gz`` is JSON
#: lines), with the standard-library reader the checks here use on the same bytes.
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
#: What those readers raise on bytes that do not decompress.
DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
_HEAD_BYTES = 4096


def data_suffix(path: str) -> str:
    """The extension that says the format, under a compression suffix: ``a.jsonl.gz`` → ``.jsonl``."""
    p = Path(path)
    if p.suffix.lower() in COMPRESSIONS:
        p = p.with_suffix("")
    return p.suffix.lower()


def open_bytes(path: str) -> IO[bytes]:
    """``path`` for reading bytes, decompressed if its extension names a compression."""
    opener = COMPRESSIONS.get(Path(path).suffix.lower())
    return open(path, "rb") if opener is None else opener(path, "rb")


def read_error(path: str, err: Exception) -> Exception:
    """A compressed file that does not decompress, in one line (any other error as it is)."""
    if Path(path).suffix.lower() not in COMPRESSIONS:
        return err
    return ConfigError(one_line(
        f"data_files: {path!r} does not decompress as {Path(path).suffix.lower()[1:]} "
        f"({one_line(err)[:120] or type(err).__name__}); pass the file uncompressed or compressed whole."
    ))


def infer_format(files: list[str]) -> str:
    """The format all ``files`` share by extension (under a compression suffix); a mix of
    formats is refused."""
    by_format: dict[str, list[str]] = {}
    for f in files:
        by_format.setdefault(EXTENSIONS.get(data_suffix(f), "text"), []).append(f)
    if len(by_format) > 1:
        examples = ", ".join(f"{Path(fs[0]).name} is {fmt}" for fmt, fs in sorted(by_format.items()))
        raise ConfigError(
            f"data_files mix formats ({examples}); pass files of one format, or set --data.data_format "
            "to read them all one way."
        )
    return next(iter(by_format))


def check_compression(files: list[str], fmt: str) -> None:
    """Parquet files are read by ``datasets`` as they are: a compressed one is refused."""
    packed = [f for f in files if Path(f).suffix.lower() in COMPRESSIONS]
    if fmt == "parquet" and packed:
        raise ConfigError(f"data_files: {packed[0]!r} is compressed Parquet, which cannot be read; pass the "
                          ".parquet file itself (Parquet compresses its columns already).")


def _flag_hint(path: str, actual: str) -> str:
    inferred = EXTENSIONS.get(data_suffix(path), "text")
    if inferred == actual:
        return f"drop --data.data_format (it is inferred from the extension: {actual}) or pass --data.data_format {actual}"
    return f"pass --data.data_format {actual}"


def check_file(path: str, fmt: str) -> None:
    """Refuse a file whose first bytes cannot be ``fmt`` (JSON must open with ``{`` or ``[``,
    Parquet with ``PAR1``), saying what it looks like instead."""
    try:
        with open_bytes(path) as fh:
            head = fh.read(_HEAD_BYTES)
    except DECOMPRESS_ERRORS as e:
        raise read_error(path, e) from None
    if fmt == "json":
        text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
        if text and text[0] not in "{[":
            looks = "parquet" if head.startswith(b"PAR1") else "text"
            raise ConfigError(one_line(
                f"data_files: {path!r} is read as JSON lines (data_format=json) but starts with "
                f"{text[:40]!r}, which is not JSON; it looks like {looks}: {_flag_hint(path, looks)}."
            ))
    elif fmt == "parquet" and not head.startswith(b"PAR1"):
        looks = "json" if head.lstrip()[:1] in (b"{", b"[") else "text"
        raise ConfigError(
            f"data_files: {path!r} is read as Parquet (data_format=parquet) but has no Parquet header; "
            f"it looks like {looks}: {_flag_hint(path, looks)}."
        )


def check_first_row(source, where: str) -> None:
    """Read the first row through ``datasets`` and check it has a text field ``source.text_field``."""
    try:
        row = next(iter(source.load()), None)
    except Exception as e:  # pyarrow / datasets raise many types; the reason fits on one line
        reason = one_line(e)[:200] or type(e).__name__
        raise ConfigError(
            f"could not read {where} as {source.format}: {reason}; check the file, or --data.data_format."
        ) from None
    if row is None:
        raise ConfigError(f"{where} has no rows; pass files with documents in them.")
    field = source.text_field
    if field not in row:
        fields = ", ".join(repr(k) for k in row) or "none"
        text_fields = [k for k, v in row.items() if isinstance(v, str)]
        hint = f"--data.text_field {text_fields[0]}" if text_fields else "--data.text_field NAME"
        raise ConfigError(
            f"{where}: the rows have no field {field!r} (text_field); their fields are {fields}; pass {hint}."
        )
    value = row[field]
    if value is not None and not isinstance(value, str):
        raise ConfigError(
            f"{where}: field {field!r} holds {type(value).__name__} values, not text; pass "
            "--data.text_field naming a field that holds the document text."
        )
