"""Long documents in bounded pieces, so memory follows the piece, not the document.

A book or a dump without newlines is one line of tens of megabytes. Read as one document it is
held whole, hashed whole and tokenized whole (the tokenizer's working memory is many times the
text: a 26 MB line peaked above 5 GB), and it lands whole in one split, so validation stays
empty. Here a text file is read ``PIECE_CHARS`` characters at a time, and a line longer than
that becomes several records (documents) of at most ``PIECE_CHARS`` characters each; a
shorter line is one record, exactly as ``datasets``' text builder reads it (universal
newlines, the line without its ``\\n``), so short-line corpora give the same batches as before.

Where a piece ends: just before a space, tab or line break that is followed by a character
that is not whitespace, the last such place in the second half of the piece; without one, at
``PIECE_CHARS`` (a word longer than half a piece is split). The whitespace starts the next
piece, so concatenating a line's pieces gives the line back exactly, and the cut falls on a
boundary of the byte-level BPE's pre-tokenizer: a long text encoded piece by piece
(:func:`encode_in_pieces`) gives the same ids as encoded whole, unless a piece had to be cut
inside a word.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

from .formats import open_bytes

#: Most characters in one record of a text file, and in one piece handed to the tokenizer.
PIECE_CHARS = 16_384
#: About the most characters handed to the tokenizer in one call.
ENCODE_CHARS = 1 << 18
#: Whitespace a piece may end before (ASCII, which Python and the tokenizer's regex agree is space).
_CUT_BEFORE = frozenset(" \t\n\r\f\v")


def cut_point(window: str, n: int = PIECE_CHARS) -> int:
    """Length of the first piece of ``window`` (a text longer than ``n`` characters, of which
    at least the first ``n + 1`` are given): the last ``p`` in ``[n // 2, n)`` where
    ``window[p]`` is ASCII whitespace and ``window[p + 1]`` is not whitespace; else ``n``."""
    for p in range(min(n, len(window) - 1) - 1, n // 2 - 1, -1):
        if window[p] in _CUT_BEFORE and not window[p + 1].isspace():
            return p
    return n


def split_text(text: str, n: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``n`` characters (``"".join`` of them is ``text``); a text
    of at most ``n`` characters is its own one piece."""
    if len(text) <= n:
        yield text
        return
    start, end = 0, len(text)
    while end - start > n:
        p = cut_point(text[start : start + n + 1], n)
        yield text[start : start + p]
        start += p
    yield text[start:]  # the loop leaves 1..n characters


def open_text(path: str) -> io.TextIOWrapper:
    """``path`` as UTF-8 text the way ``datasets``' text builder opens it: decompressed by its
    extension, universal newlines (``\\r\\n`` and ``\\r`` read as ``\\n``), bytes that are not
    UTF-8 read as U+FFFD."""
    return io.TextIOWrapper(open_bytes(path), encoding="utf-8", errors="replace", newline=None)


def read_pieces(fh: io.TextIOBase, n: int = PIECE_CHARS) -> Iterator[str]:
    """The records of an open text file: each line without its ``\\n`` if it has at most ``n``
    characters, else the line's pieces. Reads at most ``n + 1`` characters at a time."""
    rest = ""
    while True:
        chunk = fh.readline(n + 1 - len(rest))
        if not chunk:  # end of file
            if rest:
                yield rest
            return
        text = rest + chunk
        if text.endswith("\n"):
            yield text[:-1]
            rest = ""
        elif len(text) <= n:  # a last line without "\n": the next read says end of file
            rest = text
        else:  # n + 1 characters of a line that goes on
            p = cut_point(text, n)
            yield text[:p]
            rest = text[p:]


def text_file_records(files: Sequence[str]) -> Iterator[dict]:
    """``{"text": record}`` for every record of ``files`` in order: the rows of
    ``datasets.load_dataset("text", ...)`` for lines of at most ``PIECE_CHARS`` characters, and
    longer lines in pieces. The generator of the text reader (``Source.load``); ``datasets``
    shards and shuffles the list ``files``."""
    for path in files:
        with open_text(path) as fh:
            for record in read_pieces(fh):
                yield {"text": record}


def encode_in_pieces(tokenizer, texts: Sequence[str], fast: bool = False) -> list[list[int]]:
    """The token ids of each of ``texts``, a text longer than ``PIECE_CHARS`` encoded piece by
    piece and its ids concatenated. The tokenizer is handed about ``ENCODE_CHARS`` characters a
    call (one call for a batch of short texts), so its working memory, many times the text, stays
    bounded. ``fast``: ``encode_batch_fast`` (no offsets)."""
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    out: list[list[int]] = [[] for _ in texts]
    owners: list[int] = []
    pending: list[str] = []
    size = 0

    def flush() -> None:
        for i, enc in zip(owners, encode(pending)):
            out[i].extend(enc.ids)
        owners.clear()
        pending.clear()

    for i, text in enumerate(texts):
        for piece in split_text(text):
            owners.append(i)
            pending.append(piece)
            size += len(piece)
            if size >= ENCODE_CHARS:
                flush()
                size = 0
    if pending:
        flush()
    return out
