"""Embedded synthetic corpus: five clearly different, learnable text domains.

Every document is a dict ``{"text": str, "domain": str}``. Generation is fully
deterministic for a seed (``random.Random`` seeded with a string, which does not
depend on ``PYTHONHASHSEED``). The train and validation splits are drawn from
different seed streams, so they are disjoint generations.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

DOMAINS: tuple[str, ...] = ("prose", "arithmetic", "code", "records", "copy")
#: Text-sample prompts, one in the style of each domain (same order as DOMAINS).
PROMPTS: tuple[str, ...] = ("the small robot", "12 + 7 =", "def add(", "name: ", "copy: a b c |")

#: Bump when the generators change so cached corpora are regenerated.
CORPUS_VERSION = 1

# ----------------------------------------------------------------------------- vocabulary
_NOUNS = (
    "cat dog bird fish horse king queen child farmer doctor teacher river mountain city "
    "village forest garden house road bridge ship boat train letter book song story "
    "window door table chair lamp stone tree flower apple bread cheese wine coin sword "
    "shield castle tower market island ocean lake desert cloud storm wind rain snow "
    "star moon sun island valley field meadow wolf fox bear owl rabbit mouse sailor "
    "soldier merchant baker painter poet singer student judge captain hunter miller "
    "clock mirror candle basket bottle hammer rope ladder wheel cart"
).split()
_VERBS = (
    "sees finds follows carries builds paints watches loves fears helps calls visits "
    "remembers forgets opens closes breaks fixes sells buys reads writes sings "
    "chases guards leaves crosses hides keeps finds greets answers"
).split()
_INTRANS = "sleeps runs waits laughs sings dances falls rests wanders listens smiles".split()
_ADJS = (
    "old young small large quiet loud bright dark green red blue golden silver wooden "
    "happy sad brave tired clever gentle wild calm cold warm ancient strange hidden "
    "narrow wide heavy light busy empty rich poor honest proud"
).split()
_ADVS = "slowly quickly quietly often rarely gladly softly boldly carefully suddenly".split()
_PREPS = "near under behind beside across over through inside".split()
_DETS = "the a every one this that".split()
_CONJ = ("and then", "but", "because", "while", "so")

_VERB_STEMS = (
    "get set load save find count make build read write parse check update compute "
    "send open close scan merge split sort filter"
).split()
_OBJ_STEMS = (
    "user item value index name total count score list table node path key line word "
    "file record result buffer price size"
).split()
_VARS = "x y z n m i j k a b c total acc result count value tmp item idx pos".split()

_NAMES = (
    "alice bob carol dave erin frank grace heidi ivan judy mallory nina oscar peggy "
    "quinn rupert sybil trent ursula victor wendy xavier yvonne zack"
).split()
_CITIES = (
    "paris london berlin madrid rome vienna prague oslo lisbon dublin tokyo lima "
    "cairo delhi sydney boston denver austin"
).split()
_JOBS = "baker teacher nurse pilot farmer writer chef lawyer artist engineer clerk tailor".split()
_COLORS = "red green blue yellow black white purple orange".split()

_SYMBOLS = list("abcdefghijklmnopqrstuvwxyz") + [str(d) for d in range(10)]


# ----------------------------------------------------------------------------- generators
def _noun_phrase(rng: random.Random) -> str:
    parts = [rng.choice(_DETS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(_ADJS))
    parts.append(rng.choice(_NOUNS))
    if rng.random() < 0.2:
        parts += [rng.choice(_PREPS), "the", rng.choice(_NOUNS)]
    return " ".join(parts)


def _clause(rng: random.Random) -> str:
    subj = _noun_phrase(rng)
    r = rng.random()
    if r < 0.55:
        vp = f"{rng.choice(_VERBS)} {_noun_phrase(rng)}"
    elif r < 0.8:
        vp = f"{rng.choice(_INTRANS)} {rng.choice(_ADVS)}"
    else:
        vp = f"{rng.choice(_VERBS)} {_noun_phrase(rng)} {rng.choice(_PREPS)} {_noun_phrase(rng)}"
    return f"{subj} {vp}"


def _prose(rng: random.Random) -> str:
    sents = []
    for _ in range(rng.randint(3, 8)):
        s = _clause(rng)
        if rng.random() < 0.3:
            s = f"{s} {rng.choice(_CONJ)} {_clause(rng)}"
        sents.append(s[0].upper() + s[1:] + ".")
    return " ".join(sents)


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 12)):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            c = a * b
        elif op == "+":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            c = a + b
        else:
            a = rng.randint(0, 99)
            b = rng.randint(0, a)
            c = a - b
        lines.append(f"{a} {op} {b} = {c}")
    return "\n".join(lines)


def _ident(rng: random.Random) -> str:
    return f"{rng.choice(_VERB_STEMS)}_{rng.choice(_OBJ_STEMS)}"


def _code_function(rng: random.Random) -> str:
    name = _ident(rng)
    a, b, v = rng.sample(_VARS, 3)
    n = rng.randint(0, 20)
    k = rng.randint(1, 9)
    t = rng.randrange(4)
    if t == 0:
        body = (
            f"def {name}({a}, {b}):\n"
            f"    {v} = {a} + {b}\n"
            f"    if {v} > {n}:\n"
            f"        return {v} - {n}\n"
            f"    return {v}\n"
        )
    elif t == 1:
        body = (
            f"def {name}({a}):\n"
            f"    {v} = 0\n"
            f"    for {b} in range({a}):\n"
            f"        {v} += {b} * {k}\n"
            f"    return {v}\n"
        )
    elif t == 2:
        body = (
            f"def {name}({a}, {b}):\n"
            f"    {v} = []\n"
            f"    for item in {a}:\n"
            f"        if item != {b}:\n"
            f"            {v}.append(item)\n"
            f"    return {v}\n"
        )
    else:
        body = (
            f"def {name}({a}):\n"
            f"    while {a} > {n}:\n"
            f"        {a} = {a} // {k + 1}\n"
            f"    return {a}\n"
        )
    return body


def _code(rng: random.Random) -> str:
    return "\n".join(_code_function(rng) for _ in range(rng.randint(1, 3))).rstrip("\n")


def _records(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        lines.append(
            f"name: {rng.choice(_NAMES)}; age: {rng.randint(18, 90)}; "
            f"city: {rng.choice(_CITIES)}; job: {rng.choice(_JOBS)}; "
            f"color: {rng.choice(_COLORS)}"
        )
    return "\n".join(lines)


def _copy(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        seq = [rng.choice(_SYMBOLS) for _ in range(rng.randint(3, 10))]
        if rng.random() < 0.5:
            lines.append(f"copy: {' '.join(seq)} | {' '.join(seq)}")
        else:
            lines.append(f"reverse: {' '.join(seq)} | {' '.join(reversed(seq))}")
    return "\n".join(lines)


_GENERATORS = {
    "prose": _prose,
    "arithmetic": _arithmetic,
    "code": _code,
    "records": _records,
    "copy": _copy,
}
assert tuple(_GENERATORS) == DOMAINS


def generate_documents(seed: int | str, approx_chars: int) -> Iterator[dict]:
    """Yield ``{"text", "domain"}`` documents until about ``approx_chars`` characters.

    Domains are drawn uniformly at random per document. Deterministic for ``seed``.
    """
    rng = random.Random(f"smk-corpus-{seed}")
    total = 0
    while total < approx_chars:
        domain = rng.choice(DOMAINS)
        text = _GENERATORS[domain](rng)
        total += len(text) + 1
        yield {"text": text, "domain": domain}


# ----------------------------------------------------------------------------- writer
def corpus_dir(root: str | os.PathLike, seed: int, train_chars: int, val_chars: int) -> Path:
    """Cache directory of one embedded corpus, keyed by seed, sizes and generator version."""
    return Path(root) / f"corpus_v{CORPUS_VERSION}_seed{seed}_train{train_chars}_val{val_chars}"


def _write_shards(path: Path, prefix: str, docs: Iterator[dict], n_shards: int) -> list[str]:
    files = [path / f"{prefix}-{i:03d}.jsonl" for i in range(n_shards)]
    handles = [open(f, "w", encoding="utf-8") for f in files]
    try:
        for i, doc in enumerate(docs):
            handles[i % n_shards].write(json.dumps(doc) + "\n")
    finally:
        for h in handles:
            h.close()
    return [str(f) for f in files]


def write_corpus(
    dir: str | os.PathLike,
    seed: int,
    train_chars: int,
    val_chars: int,
    train_shards: int = 16,
    val_shards: int = 4,
) -> tuple[list[str], list[str]]:
    """Write the corpus as jsonl shards under ``dir`` once; reuse it if already present.

    Returns ``(train_files, val_files)``. Train and validation come from different
    seed streams (``"{seed}-train"`` and ``"{seed}-val"``), so they are disjoint.
    The directory is written to a temporary name and renamed, so a crashed write
    never leaves a half corpus that would be reused.
    """
    out = corpus_dir(dir, seed, train_chars, val_chars)
    train = [str(out / f"train-{i:03d}.jsonl") for i in range(train_shards)]
    val = [str(out / f"val-{i:03d}.jsonl") for i in range(val_shards)]
    if all(os.path.exists(f) for f in train + val):
        return train, val
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_shards(tmp, "train", generate_documents(f"{seed}-train", train_chars), train_shards)
    _write_shards(tmp, "val", generate_documents(f"{seed}-val", val_chars), val_shards)
    try:
        os.rename(tmp, out)
    except OSError:  # another process won the race (or a stale partial dir exists)
        if all(os.path.exists(f) for f in train + val):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
    return train, val
