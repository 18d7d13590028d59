"""``smk-build-corpus``: a real-text corpus from Debian packages of public prose.

    smk-build-corpus --out data/real_corpus.txt
    smk fit --config configs/default.yaml --data.data_files data/real_corpus.txt

Sources (Debian main, all redistributable): the King James Bible (``bible-kjv``), the
Jargon File (``jargon-text``), the fortune cookie collections (``fortunes``), the Debian
Reference (``debian-reference-en``), the GNU coding and maintainer standards
(``gnu-standards``) and the license texts in /usr/share/common-licenses. Missing packages
are installed with apt-get when running as root; otherwise the one command to run is
printed. The output has one document per line (one fortune, or a group of consecutive
paragraphs of one text of at most ``--doc-chars`` characters), in a seeded random order: the data module
trains its tokenizer on the head of the file and shuffles within a small buffer only, so
a file sorted by source would give a Bible-only tokenizer and a non-stationary stream.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
LICENSE_DIR = Path("/usr/share/common-licenses")
# fortune files that are pictures, not prose
FORTUNE_SKIP = {"art", "ascii-art"}
DOC_CHARS = 2000
# measured with --count-tokens 2048 on the full corpus (2.85 M tokens, 8.8 M characters)
CHARS_PER_TOKEN = 3.09

_OVERSTRIKE = re.compile(r".\x08")  # nroff bold/underline: "X\bX", "_\bX"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")
_RULE = re.compile(r"^\s*([=*\-_~#.]|[\u2500-\u257f])\1*\s*$")  # heading underlines, rules
_BOX = re.compile(r"^\s*(\||\+[-=+]|[\u2500-\u257f])")  # table and box-drawing rows
_NUMBERED = re.compile(r"^\s*([A-Z0-9]{1,3}\.)+[0-9]*\.?\s+\S")  # "10.3.2. Title" (TOC lines)
_MENU = re.compile(r"^\s*\*\s.*::")  # Info menu entries "* Node::"
_PROMPT = re.compile(r"^\s*[$#>] ")  # shell sessions
_JARGON_HEAD = re.compile(r"^[ ]*:([^:\n]+):[^\n]*\n[ ]*\n[ ]*", re.M)
_VERSE = re.compile(r"^\s+(\d+) ")


def _clean(text: str) -> str:
    text = _OVERSTRIKE.sub("", text).replace("\t", " ").replace("\r", "")
    return _CONTROL.sub("", text)


def _join(lines: Iterable[str]) -> str:
    return " ".join(" ".join(lines).split())


def _is_prose(lines: list[str]) -> bool:
    """A block of text lines that reads as prose, not a table, code, menu or contents list."""
    if any(_BOX.match(x) or _MENU.match(x) or _PROMPT.match(x) for x in lines):
        return False
    if len(lines) >= 3 and sum(bool(_NUMBERED.match(x)) for x in lines) * 3 >= 2 * len(lines):
        return False
    chars = "".join(lines).replace(" ", "")
    if not chars:
        return False
    letters = sum(c.isalpha() for c in chars)
    return letters / len(chars) >= 0.75 and len(_join(lines).split()) >= 3


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of a plain-text document (blank-line separated), unwrapped to one line
    each; tables, code, menus, contents lists, rules and box art are dropped."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", _clean(text)):
        lines = [x for x in block.split("\n") if x.strip() and not _RULE.match(x)]
        if lines and _is_prose(lines):
            out.append(_join(lines))
    return out


def bible_paragraphs(text: str) -> list[str]:
    """Verses of the output of ``bible Gen1:1-Rev22:21`` (chapter headings between blank
    lines, verses as "  N text" with unindented continuation lines), without numbers."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", _clean(text)):
        verse: list[str] = []
        for line in block.split("\n"):
            m = _VERSE.match(line)
            if m:
                if verse:
                    out.append(_join(verse))
                verse = [line[m.end():]]
            elif verse:
                verse.append(line)
        if verse:
            out.append(_join(verse))
    return out


def jargon_paragraphs(text: str) -> list[str]:
    """Paragraphs of the Jargon File, each entry's headword (":term: /pronunciation/, n.",
    dropped alone as non-prose) glued to the front of its first paragraph as "term:"."""
    return prose_paragraphs(_JARGON_HEAD.sub(r"\1: ", _clean(text)))


def fortune_paragraphs(text: str) -> list[str]:
    """Entries of a fortune file (separated by lines holding only "%"), one line each."""
    out = []
    for entry in re.split(r"^%\s*$", _clean(text), flags=re.M):
        lines = [x for x in entry.split("\n") if x.strip()]
        if lines and _is_prose(lines):
            out.append(_join(lines))
    return out


def pack(paragraphs: Iterable[str], max_chars: int = DOC_CHARS) -> list[str]:
    """Consecutive paragraphs joined into documents of at most ``max_chars`` characters (a
    longer paragraph is a document of its own), so a document keeps its context."""
    docs: list[str] = []
    cur = ""
    for p in paragraphs:
        if cur and len(cur) + 1 + len(p) > max_chars:
            docs.append(cur)
            cur = ""
        cur = f"{cur} {p}" if cur else p
    if cur:
        docs.append(cur)
    return docs


def _gz(path: str) -> str:
    return gzip.open(path, "rt", encoding="utf-8", errors="replace").read()


def _bible() -> str:
    return subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                          check=True, env={**os.environ, "COLUMNS": "80"}).stdout


def _fortunes(doc_chars: int) -> list[str]:
    # each fortune is its own document: unrelated neighbours would only add noise
    paras: list[str] = []
    for f in sorted(FORTUNE_DIR.iterdir()):
        if f.suffix or f.is_symlink() or f.name in FORTUNE_SKIP:
            continue  # .dat indexes, .u8 links to the same files
        paras += fortune_paragraphs(f.read_text(encoding="utf-8", errors="replace"))
    return paras


def _licenses(doc_chars: int) -> list[str]:
    # real files only: GPL, LGPL, GFDL are links to the versioned texts
    files = [f for f in sorted(LICENSE_DIR.iterdir()) if f.is_file() and not f.is_symlink()]
    return [d for f in files for d in pack(prose_paragraphs(f.read_text(errors="replace")), doc_chars)]


def _texts(*paths: str) -> Callable[[int], list[str]]:
    """Documents of gzipped plain-text manuals, packed per file."""
    return lambda doc_chars: [d for p in paths for d in pack(prose_paragraphs(_gz(p)), doc_chars)]


# name → (Debian packages it needs, function of doc_chars returning its documents)
SOURCES: dict[str, tuple[tuple[str, ...], Callable[[int], list[str]]]] = {
    "bible-kjv": (("bible-kjv", "bible-kjv-text"), lambda n: pack(bible_paragraphs(_bible()), n)),
    "jargon": (("jargon-text",), lambda n: pack(jargon_paragraphs(_gz("/usr/share/doc/jargon-text/jargon.txt.gz")), n)),
    "fortunes": (("fortunes",), _fortunes),
    "debian-reference": (("debian-reference-en",),
                         _texts("/usr/share/debian-reference/debian-reference.en.txt.gz")),
    "gnu-standards": (("gnu-standards",), _texts("/usr/share/doc/gnu-standards/standards.text.gz",
                                                 "/usr/share/doc/gnu-standards/maintain.text.gz")),
    "licenses": ((), _licenses),
}


def _missing(packages: Iterable[str]) -> list[str]:
    def installed(p: str) -> bool:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.endswith(" installed")

    return [p for p in packages if not installed(p)]


def _fail(msg: str) -> None:
    print(f"smk-build-corpus: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def ensure_packages(packages: list[str], install: bool) -> None:
    """apt-get install the missing packages (as root), else say the one command to run."""
    if not packages:
        return
    if not shutil.which("dpkg-query"):
        _fail("this needs a Debian/Ubuntu system (dpkg-query not found)")
    missing = _missing(packages)
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if not install or os.geteuid() != 0:
        _fail(f"missing Debian packages; install them with: sudo {' '.join(cmd)}")
    print(f"installing {' '.join(missing)} ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        # a stale package list is the usual cause: refresh it once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            _fail(f"apt-get could not install {' '.join(missing)}; run: sudo apt-get update && sudo {' '.join(cmd)}")


def count_tokens(path: Path, vocab_size: int, cache_dir: str) -> tuple[int, int]:
    """(train, val) tokens as `smk fit --data.data_files PATH` packs them (same tokenizer,
    same document split; the tokenizer is cached in ``cache_dir`` for the later fit)."""
    from smk_lightning.data import SMKDataModule

    dm = SMKDataModule(data_files=str(path), vocab_size=vocab_size, cache_dir=cache_dir,
                       seq_len=128, batch_size=64)
    dm.setup("fit")
    train = sum(b["targets"].numel() for b in dm.train_dataloader())
    val = sum(b["targets"].numel() for b in dm.val_dataloader())
    return train, val


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smk-build-corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/real_corpus.txt"),
                        help="output text file, one document per line (default: data/real_corpus.txt)")
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES),
                        help="which sources to include (default: all)")
    parser.add_argument("--doc-chars", type=int, default=DOC_CHARS,
                        help=f"most characters of a document made of several paragraphs (default: {DOC_CHARS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document order (default: 0)")
    parser.add_argument("--no-install", action="store_true",
                        help="never run apt-get; print the command to install what is missing")
    parser.add_argument("--count-tokens", type=int, metavar="VOCAB", default=None,
                        help="also count tokens with the project's BPE of this vocabulary size (e.g. 2048; "
                             "takes a minute or two; caches the tokenizer in --cache-dir)")
    parser.add_argument("--cache-dir", default="data_cache", help="tokenizer cache (default: data_cache, as smk fit)")
    args = parser.parse_args(argv)
    if args.doc_chars < 1:
        _fail(f"--doc-chars={args.doc_chars} must be >= 1")

    ensure_packages(sorted({p for s in args.sources for p in SOURCES[s][0]}), not args.no_install)
    docs: list[str] = []
    for name in args.sources:
        got = SOURCES[name][1](args.doc_chars)
        print(f"{name:>17}: {len(got):6d} documents {sum(map(len, got)):10,d} characters")
        docs += got
    random.Random(args.seed).shuffle(docs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    tmp.replace(args.out)  # never leave a half-written corpus under the final name
    chars = sum(map(len, docs))
    print(f"wrote {args.out}: {len(docs):,d} documents, {chars:,d} characters, about "
          f"{chars / CHARS_PER_TOKEN / 1e6:.1f} M tokens at vocab 2048 (--count-tokens 2048 counts them)")
    if args.count_tokens:
        train, val = count_tokens(args.out, args.count_tokens, args.cache_dir)
        print(f"tokens at vocab {args.count_tokens}: {train:,d} train + {val:,d} validation "
              f"(seq_len 128 blocks; {chars / (train + val):.2f} characters per token)")


if __name__ == "__main__":
    main()
