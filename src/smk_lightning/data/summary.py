"""What a run trains on, in numbers: documents and tokens per split, and prompts from held-out text."""

from __future__ import annotations

from dataclasses import dataclass, field

from .pieces import ENCODE_CHARS, encode_in_pieces

#: Characters counted (parsed, split and tokenized) for the summary; beyond this the
#: counts are lower bounds, so a large corpus does not delay the start of training.
COUNT_MAX_CHARS = 4_000_000
_ENCODE_BATCH = 256


@dataclass
class SplitCounts:
    docs: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    complete: bool = True  # False: stopped after COUNT_MAX_CHARS, the counts are lower bounds


def count_user_data(source, tokenizer, max_chars: int = COUNT_MAX_CHARS) -> SplitCounts:
    """Documents and tokens (with one end-of-text per document) in the train and validation
    splits of ``source`` (a ``Source`` with ``split=None``), by the same hash split as training."""
    out = SplitCounts()
    pending: dict[str, list[str]] = {"train": [], "val": []}
    pending_chars = {"train": 0, "val": 0}
    chars = 0

    def flush(split: str) -> None:
        out.tokens[split] += sum(len(ids) + 1 for ids in encode_in_pieces(tokenizer, pending[split], fast=True))
        pending[split].clear()
        pending_chars[split] = 0

    for row in source.load():
        doc = source.parse(row)
        if doc is None:
            continue
        if chars >= max_chars:
            out.complete = False
            break
        text = doc[0]
        split = "val" if source.is_val(text) else "train"
        out.docs[split] += 1
        chars += len(text)
        pending[split].append(text)
        pending_chars[split] += len(text)
        if len(pending[split]) >= _ENCODE_BATCH or pending_chars[split] >= ENCODE_CHARS:
            flush(split)
    flush("train")
    flush("val")
    return out


def count_lines(files) -> int:
    """Newlines in ``files`` (the embedded corpus's documents: one JSON line each)."""
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            n += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    return n


def document_head(text: str, max_words: int = 6, max_chars: int = 48) -> str:
    """The opening words of a document's first non-empty line: a prompt in the document's own style."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    head = " ".join(line.split()[:max_words])
    return head[:max_chars].rstrip()


def held_out_prompts(source, n: int) -> list[str]:
    """Heads of the first ``n`` validation documents of ``source`` (distinct, non-empty)."""
    prompts: list[str] = []
    for row in source.load():
        doc = source.parse(row)
        head = document_head(doc[0]) if doc is not None else ""
        if head and head not in prompts:
            prompts.append(head)
            if len(prompts) == n:
                break
    return prompts


def fmt_count(n: int) -> str:
    """1234567 → '1.23 M', 52300 → '52.3 k', 950 → '950'."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return str(n)
