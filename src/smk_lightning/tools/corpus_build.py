"""``smk-build-corpus``: a real-text corpus from Debian packages of public prose.

    smk-build-corpus --count-tokens 2048                    # data/real_corpus.txt (2.8 M tokens)
    smk-build-corpus --sources large --count-tokens 2048    # data/real_corpus_large.txt (23 M tokens)
    smk fit --config configs/default.yaml --data.data_files data/real_corpus.txt

Sources, all in Debian main and redistributable (licence from /usr/share/doc/PKG/copyright):

``--sources small`` (the default; the original corpus, kept byte-identical): the King
James Bible (``bible-kjv``), the Jargon File (``jargon-text``), the fortune cookie
collections (``fortunes``), the Debian Reference (``debian-reference-en``), the GNU coding
and maintainer standards (``gnu-standards``) and the license texts in
/usr/share/common-licenses.

``--sources large`` adds these manuals (English only; generated API pages left out):

============================  ====================================  ======================
package                       what                                  licence
============================  ====================================  ======================
``linux-doc``                 kernel Documentation/ (rst)           GPL-2
``python3-doc``               Python 3 documentation (rst sources)  PSF
``perl-doc``                  Perl documentation (POD)              GPL-1+ or Artistic
``perl``                      POD of the core modules (.pm)         GPL-1+ or Artistic
``postgresql-doc``            PostgreSQL manual (HTML)              PostgreSQL
``python-django-doc``         Django documentation (HTML)           BSD-3-clause
``debian-handbook``           Debian Administrator's Handbook       GPL-2+ or CC-BY-SA-3.0
``developers-reference``      Debian Developer's Reference (rst)    GPL-2
``debian-policy``             Debian Policy Manual (rst)            GPL-2+
``maint-guide``               Debian New Maintainers' Guide (text)  GPL-2+
``erlang-doc``                Erlang/OTP documentation (HTML)       Apache-2.0
``sqlite3-doc``               SQLite documentation (HTML)           public domain
``git-doc``                   Git manual and guides (HTML)          GPL-2
``python-sqlalchemy-doc``     SQLAlchemy documentation (rst)        Expat (MIT)
``cmake-doc``                 CMake documentation (rst sources)     BSD-3-clause
``sphinx-doc``                Sphinx documentation (rst sources)    BSD-2-clause
``rust-doc``                  the Rust books (HTML)                 MIT or Apache-2.0
``octave-doc``                GNU Octave manual (HTML)              GPL-3+
``zsh-doc``                   zsh manual (HTML)                     Zsh (MIT-like)
``apache2-doc``               Apache HTTP Server manual (HTML)      Apache-2.0
``nodejs-doc``                Node.js API documentation (HTML)      Expat (MIT)
``libreoffice-help-en-us``    LibreOffice help (HTML)               MPL-2.0
============================  ====================================  ======================

Each format has its paragraph extractor: plain text (``prose_paragraphs``), the Bible,
the Jargon File, fortunes, reStructuredText (``rst_paragraphs``), HTML
(``html_paragraphs``) and POD (``pod_paragraphs``); code blocks, tables, markup,
directives, menus and navigation are dropped, and in the large set's manuals a paragraph
already seen in the same source (page furniture, boilerplate) is dropped too. Missing
packages are installed with apt-get when running as root; otherwise the one command to
run is printed. The output has one document per line (one fortune, or a group of
consecutive paragraphs of one file of at most ``--doc-chars`` characters), in a seeded
random order: the data module trains its tokenizer on the head of the file and shuffles
within a small buffer only, so a file sorted by source would give a Bible-only tokenizer
and a non-stationary stream. Beside the corpus, ``NAME.summary.json`` records the
documents, characters and (with ``--count-tokens``) tokens of each source and the
versions of the packages they came from; the same table is printed.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import gzip
import html
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from smk_lightning.errors import exit_with_error

FORTUNE_DIR = Path("/usr/share/games/fortunes")
LICENSE_DIR = Path("/usr/share/common-licenses")
# fortune files that are pictures, not prose
FORTUNE_SKIP = {"art", "ascii-art"}
DOC_CHARS = 2000
# measured with --count-tokens 2048 on the full corpus (2.85 M tokens, 8.8 M characters)
CHARS_PER_TOKEN = 3.09
# the same for --sources large (22.7 M tokens, 72.1 M characters)
CHARS_PER_TOKEN_LARGE = 3.18

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


# --- reStructuredText (kernel, Python, Debian policy and developers' reference sources)

_RST_RULE = re.compile(r"^\s*([!-/:-@\[-`{-~])\1{2,}\s*$")  # section under/overlines, transitions
_RST_SIMPLE_TABLE = re.compile(r"^\s*[=-]{2,}( +[=-]{2,})+\s*$")  # "=====  =====" borders
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w.+:-]+?)::(.*)$")
_RST_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")  # comments, targets, footnotes, substitutions
_RST_OPTION = re.compile(r"^\s*:[^:`\s][^:`]*:(\s|$)")  # ":synopsis: ...", ":maxdepth: 2"
_RST_FIELD = re.compile(r"^(\s*):([\w .-]+):\s+")  # field list ":Author: X" -> "Author: X"
_RST_BULLET = re.compile(r"^(\s*)([-*+\u2022]|#\.|\d{1,2}\.)\s+(?=\S)")
# directives whose body is prose: admonitions (their argument is prose too) and descriptions
# of an API object (the argument is a signature, dropped)
_RST_ADMONITIONS = {"note", "warning", "important", "tip", "hint", "caution", "attention", "danger",
                    "error", "admonition", "seealso"}
_RST_PROSE = _RST_ADMONITIONS | {
    "versionadded", "versionchanged", "deprecated", "deprecated-removed", "topic", "sidebar",
    "glossary", "container", "only", "impl-detail", "function", "method", "class", "attribute",
    "data", "exception", "decorator", "decoratormethod", "classmethod", "staticmethod",
    "abstractmethod", "coroutinefunction", "coroutinemethod", "awaitablefunction", "describe",
    "option", "cmdoption", "envvar", "opcode", "pdbcommand", "macro", "type", "member", "var",
    "struct", "union", "enum", "enumerator", "property"}
_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]+)`")
_RST_LINK = re.compile(r"`([^`]+)`__?")
_RST_INTERPRETED = re.compile(r"`([^`]+)`")
_RST_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_RST_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_RST_FOOTNOTE_REF = re.compile(r"\s*\[(?:#[\w-]*|\d+|\*)\]_")
_RST_SUBSTITUTION = re.compile(r"\|([\w -]+)\|(?:__?)?")
_RST_TARGET = re.compile(r"\s*<[^<>]*>$")  # "title <target>" in a role or link
_RST_ESCAPE = re.compile(r"\\([\x20-\uffff])")
_RST_ESCAPED = re.compile("[\U000F0020-\U000FFFFF]")


def _rst_title(text: str) -> str:
    return _RST_TARGET.sub("", text).lstrip("~!") or text


def rst_inline(text: str) -> str:
    """reStructuredText inline markup to plain text: roles, links, literals, emphasis,
    footnote and substitution references, backslash escapes (not inside literals)."""
    parts = _RST_LITERAL.split(text)  # odd items: the text of ``literals``, kept as is
    for i in range(0, len(parts), 2):
        # "\*" is a literal "*": hidden as a private-use character until the markup is gone
        t = _RST_ESCAPE.sub(lambda m: "" if m.group(1) == " " else chr(0xF0000 + ord(m.group(1))), parts[i])
        t = _RST_ROLE.sub(lambda m: _rst_title(m.group(1)), t)
        t = _RST_LINK.sub(lambda m: _rst_title(m.group(1)), t)
        t = _RST_INTERPRETED.sub(r"\1", t)
        t = _RST_STRONG.sub(r"\1", t)
        t = _RST_EMPHASIS.sub(r"\1", t)
        t = _RST_FOOTNOTE_REF.sub("", t)
        t = _RST_SUBSTITUTION.sub(r"\1", t)
        parts[i] = _RST_ESCAPED.sub(lambda m: chr(ord(m.group()) - 0xF0000), t)
    return "".join(parts)


def rst_paragraphs(text: str) -> list[str]:
    """Paragraphs of a reStructuredText document: section titles without their underlines
    and the prose of the text, list items and prose directives (admonitions, API object
    descriptions); directives with code or markup (code blocks, tables, images, toctrees,
    includes), comments and targets, literal blocks after "::", doctests and tables are
    dropped, inline markup is reduced to its text."""
    out: list[str] = []
    cur: list[str] = []
    cur_indent = 0  # indentation of the paragraph's first line
    skip: int | None = None  # skip blank lines and lines indented deeper than this
    head = ""  # "options" after a directive, "signature" after an API object's directive

    def flush() -> None:
        nonlocal cur
        lines, cur = cur, []
        if not lines or lines[0].lstrip().startswith(">>>") or any(_RST_SIMPLE_TABLE.match(x) for x in lines):
            return
        if _is_prose(lines):
            out.append(rst_inline(_join(lines)))

    for line in _clean(text).split("\n"):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip is not None:
            if not stripped or indent > skip:
                continue
            skip = None
        if not stripped:
            flush()
            head = ""
            continue
        if head and (head == "signature" or _RST_OPTION.match(line)):
            continue
        head = ""
        m = _RST_DIRECTIVE.match(line)
        if m:
            flush()
            name = m.group(2).rsplit(":", 1)[-1].lower()
            if name not in _RST_PROSE:
                skip = indent
            elif name in _RST_ADMONITIONS:
                head = "options"
                if m.group(3).strip():
                    cur, cur_indent = [m.group(3)], indent
            else:
                head = "signature"
            continue
        if _RST_EXPLICIT.match(line):
            flush()
            skip = indent
            continue
        if _RST_RULE.match(line):
            flush()
            continue
        b = _RST_BULLET.match(line)
        if b:
            flush()
            line = line[b.end():]
        if not cur:
            cur_indent = indent
        cur.append(_RST_FIELD.sub(r"\1\2: ", line))
        if stripped.endswith("::"):  # a literal block follows: "text::" -> "text:", "text ::" -> "text"
            last = cur.pop().rstrip()[:-2]
            if last.strip():
                cur.append(last.rstrip() if last[-1].isspace() else last + ":")
            flush()
            skip = cur_indent
    flush()
    return out


# --- HTML (PostgreSQL, Django, the Debian Administrator's Handbook)

# elements whose content is dropped: code, tables, scripts, forms, and page furniture
_HTML_SKIP = {"script", "style", "pre", "table", "head", "nav", "form", "button", "select",
              "textarea", "svg", "math", "noscript", "object", "iframe", "template"}
# a class, id or role containing one of these marks navigation, not text
_HTML_FURNITURE = ("nav", "sidebar", "toc", "breadcrumb", "header", "footer", "search",
                   "related", "indexterm", "copyright", "legalnotice", "banner", "debug", "donation")
# ... and so do these exact class or id names: Django's header and footer, Apache's
# breadcrumbs, language links and mini contents, mdBook's title bar, LibreOffice's menus,
# Node.js's "#" heading anchors
_HTML_FURNITURE_WORDS = {"hd", "ft", "path", "toplang", "bottomlang", "quickview", "menu-bar",
                         "contents-treeview", "dropdowns", "bookmarks", "mark"}
# elements that end a paragraph
_HTML_BLOCK = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
               "br", "hr", "tr", "td", "th", "ul", "ol", "dl", "section", "article", "aside",
               "header", "footer", "main", "body", "title", "caption", "figure", "figcaption",
               "address", "details", "summary", "img"}
_HTML_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed",
              "source", "track", "wbr", "param"}


class _HTMLText(HTMLParser):
    """Text of an HTML page, one paragraph per block element, with code blocks, tables,
    scripts and navigation dropped (inline markup such as <code>, <a>, <em> keeps its text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._cur: list[str] = []
        self._skip: str | None = None  # tag whose content is being dropped
        self._depth = 0  # nesting of that tag inside itself

    def _flush(self) -> None:
        text = " ".join("".join(self._cur).split())
        self._cur = []
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip is not None:
            self._depth += tag == self._skip
            return
        marks = " ".join(v or "" for k, v in attrs if k in ("class", "id", "role")).lower()
        furniture = tag not in _HTML_VOID and tag not in ("html", "body") and (
            any(w in marks for w in _HTML_FURNITURE) or not _HTML_FURNITURE_WORDS.isdisjoint(marks.split()))
        if tag in _HTML_SKIP or furniture:
            self._flush()
            self._skip, self._depth = tag, 1
        elif tag in _HTML_BLOCK:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip is not None:
            if tag == self._skip:
                self._depth -= 1
                if self._depth == 0:
                    self._skip = None
            return
        if tag in _HTML_BLOCK:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._skip is None:
            self._cur.append(data)


def html_paragraphs(text: str) -> list[str]:
    """Paragraphs of an HTML page (block elements: p, li, dd, headings, ...), unwrapped to
    one line each; scripts, styles, <pre> code, tables, forms and navigation (elements
    whose class, id or role says nav, sidebar, toc, footer, search, ...) are dropped."""
    parser = _HTMLText()
    parser.feed(_clean(text))
    parser.close()
    parser._flush()
    return [p for p in parser.paragraphs if _is_prose([p])]


# --- POD (the Perl documentation)

_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")  # innermost formatting code "C<text>"
_POD_CODES = [re.compile(rf"([A-Z]){'<' * n}\s+(.*?)\s+{'>' * n}", re.S) for n in (4, 3, 2)]  # "C<< $a->b >>"
_POD_ENTITY = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(code: str, text: str) -> str:
    if code in "XZ":  # index entry, null
        return ""
    if code == "E":  # E<gt>, E<eacute>, E<0x201E>, E<187>
        if text[:1].isdigit():
            try:
                return chr(int(text, 16 if text[:2].lower() == "0x" else 10))
            except ValueError:
                return ""
        return _POD_ENTITY.get(text, html.unescape(f"&{text};"))
    if code == "L":  # L<text|target>, L<name/"section">, L<name>
        if "|" in text:
            return text.split("|", 1)[0]
        if re.match(r"[a-z]+:[^:\s]", text):  # a URL
            return text
        name, _, section = text.partition("/")
        section = section.strip('"')
        return f"{section} in {name}" if name and section else (section or name)
    return text  # B, I, C, F, S: bold, italic, code, file, non-breaking: their text


def pod_inline(text: str) -> str:
    """POD formatting codes (B<>, C<<< >>>, L<text|target>, E<gt>, X<index>, ...) to text."""
    for pat in _POD_CODES:
        text = pat.sub(lambda m: _pod_code(m.group(1), m.group(2)), text)
    while True:
        new = _POD_CODE.sub(lambda m: _pod_code(m.group(1), m.group(2)), text)
        if new == text:
            return text
        text = new


def pod_paragraphs(text: str) -> list[str]:
    """Ordinary paragraphs of a POD document and its =head titles, formatting codes reduced
    to their text; other commands (=item, =over, =begin ... =end, =for, ...), verbatim
    (indented) blocks and any code between =cut and the next command are dropped."""
    out: list[str] = []
    in_pod, begin = False, ""  # as perlpodspec: what precedes the first command is not POD
    for block in re.split(r"\n[ \t]*\n", _clean(text)):
        if not block.strip("\n"):
            continue
        if block.startswith("="):
            cmd, _, arg = block[1:].partition(" ")
            cmd = cmd.split("\n", 1)[0]
            in_pod = cmd != "cut"
            if cmd == "begin":
                begin = arg.split()[0] if arg.split() else "?"
            elif cmd == "end":
                begin = ""
            elif cmd.startswith("head") and not begin:
                lines = [pod_inline(x) for x in arg.split("\n")]
                if _is_prose(lines):
                    out.append(_join(lines))
            continue
        if not in_pod or begin or block[0] in " \t":
            continue
        lines = [pod_inline(x) for x in block.split("\n") if x.strip()]
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


def _version_key(path: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]


def _newest(pattern: str) -> Path:
    """The directory matching ``pattern`` with the highest version (``linux-doc-6.1``)."""
    found = sorted(glob.glob(pattern), key=_version_key)
    if not found:
        _fail(f"nothing matches {pattern}; is the package installed?")
    return Path(found[-1])


def _files(root: str | Path, pattern: str, skip: Iterable[str] = ()) -> list[Path]:
    """Files under ``root`` (the newest version of a glob) matching ``pattern``, in sorted
    order, leaving out any with a path component (folder or file name) matching a glob of
    ``skip``."""
    base = _newest(str(root))
    return sorted(f for f in base.rglob(pattern) if f.is_file() and not any(
        fnmatch.fnmatchcase(part, s) for part in f.relative_to(base).parts for s in skip))


def _read(path: Path) -> str:
    if path.suffix == ".gz":
        return _gz(str(path))
    return path.read_text(encoding="utf-8", errors="replace")


def _docs(extract: Callable[[str], list[str]], files: Callable[[], list[Path]]) -> Callable[[int], list[str]]:
    """Documents of the files ``files()`` lists, each file's paragraphs packed on their own;
    a paragraph seen before in the same source (page furniture, boilerplate notes, the same
    text shipped twice) is dropped."""
    def build(doc_chars: int) -> list[str]:
        seen: set[str] = set()
        docs: list[str] = []
        for f in files():
            paras = [p for p in extract(_read(f)) if not (p in seen or seen.add(p))]
            docs += pack(paras, doc_chars)
        return docs

    return build


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
    # the large set adds these (reStructuredText, POD, HTML and plain-text manuals)
    "linux-doc": (("linux-doc",), _docs(rst_paragraphs, lambda: _files(
        "/usr/share/doc/linux-doc-*/Documentation", "*.rst.gz", skip={"translations"}))),
    "python-doc": (("python3-doc",), _docs(rst_paragraphs, lambda: _files(
        "/usr/share/doc/python3.*/html/_sources", "*.rst.txt"))),
    "perl-doc": (("perl-doc",), _docs(pod_paragraphs, lambda: _files(
        "/usr/share/perl/5.*/pod", "*.pod", skip={"perltoc.pod", "perluniprops.pod"}))),  # contents, tables
    "postgresql-doc": (("postgresql-doc",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/postgresql-doc-*/html", "*.html", skip={"bookindex.html"}))),
    "django-doc": (("python-django-doc",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/python-django-doc/html", "*.html",
        skip={"_modules", "_static", "genindex.html", "py-modindex.html", "search.html", "contents.html"}))),
    "debian-handbook": (("debian-handbook",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/debian-handbook/html/en-US", "*.html"))),
    "developers-reference": (("developers-reference",), _docs(rst_paragraphs, lambda: _files(
        "/usr/share/developers-reference/_sources", "*.rst.txt"))),
    "debian-policy": (("debian-policy",), _docs(rst_paragraphs, lambda: _files(
        "/usr/share/doc/debian-policy/policy.html/_sources", "*.rst.txt"))),
    "maint-guide": (("maint-guide",), _docs(prose_paragraphs, lambda: _files(
        "/usr/share/doc/maint-guide", "maint-guide.en.txt.gz"))),
    "erlang-doc": (("erlang-doc",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/erlang-doc", "*.html", skip={"wx-*", "jinterface-*"}))),  # generated APIs: wxWidgets, Java
    # without the indexes (lists of titles and links) and requirements.html (the docs'
    # sentences again, as a list)
    "sqlite-doc": (("sqlite3-doc",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/sqlite3", "*.html", skip={"doc_*_crossref.html", "syntaxdiagrams.html", "sitemap.html",
                                                  "keyword_index.html", "requirements.html"}))),
    "git-doc": (("git-doc",), _docs(html_paragraphs, lambda: _files("/usr/share/doc/git-doc", "*.html"))),
    "sqlalchemy-doc": (("python-sqlalchemy-doc",), _docs(rst_paragraphs, lambda: _files(
        "/usr/share/doc/python-sqlalchemy-doc/rst", "*.rst"))),
    "cmake-doc": (("cmake-doc",), _docs(rst_paragraphs, lambda: _files(
        "/usr/share/doc/cmake-data/html/_sources", "*.rst.txt"))),
    "sphinx-doc": (("sphinx-doc",), _docs(rst_paragraphs, lambda: _files(
        "/usr/share/doc/sphinx-doc/html/_sources", "*.txt"))),
    # the books (The Rust Programming Language, the Reference, Rust by Example, ...), not
    # the generated API pages nor the old editions' redirect stubs nor the one-page copies
    "rust-doc": (("rust-doc",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/rust-doc/html", "*.html",
        skip={"std", "core", "alloc", "proc_macro", "test", "src", "implementors", "static.files",
              "first-edition", "second-edition", "2018-edition", "print.html"}))),
    "octave-doc": (("octave-doc",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/octave/octave.html", "*.html"))),
    "zsh-doc": (("zsh-doc",), _docs(html_paragraphs, lambda: _files("/usr/share/doc/zsh-common/html", "*.html"))),
    "apache-doc": (("apache2-doc",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/apache2-doc/manual/en", "*.html"))),
    "perl-modules": (("perl",), _docs(pod_paragraphs, lambda: _files(
        "/usr/share/perl/5.*", "*.pm", skip={"pod"}))),  # the POD of the core modules
    "nodejs-doc": (("nodejs-doc",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/doc/nodejs/api", "*.html", skip={"all.html"}))),  # all.html: every page again
    "libreoffice-help": (("libreoffice-help-en-us",), _docs(html_paragraphs, lambda: _files(
        "/usr/share/libreoffice/help/en-US", "*.html"))),
}
# named sets of sources: "small" is the original corpus (data/real_corpus.txt, kept
# byte-identical), "large" adds the manuals above (data/real_corpus_large.txt)
SOURCE_SETS: dict[str, list[str]] = {
    "small": ["bible-kjv", "jargon", "fortunes", "debian-reference", "gnu-standards", "licenses"],
    "large": list(SOURCES),
}
DEFAULT_OUT = {"small": Path("data/real_corpus.txt"), "large": Path("data/real_corpus_large.txt")}


def _missing(packages: Iterable[str]) -> list[str]:
    def installed(p: str) -> bool:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.endswith(" installed")

    return [p for p in packages if not installed(p)]


_fail = partial(exit_with_error, "smk-build-corpus")  # bad input: one line, exit status 2


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


def count_tokens(path: Path, vocab_size: int, cache_dir: str) -> tuple[int, int, Any]:
    """(train, val, data module): tokens as `smk fit --data.data_files PATH` packs them in
    seq_len-128 blocks (same tokenizer, same document split, full train batches of 64; the
    tokenizer is cached in ``cache_dir`` for the later fit)."""
    from smk_lightning.data import SMKDataModule

    dm = SMKDataModule(data_files=str(path), vocab_size=vocab_size, cache_dir=cache_dir,
                       seq_len=128, batch_size=64)
    dm.setup("fit")
    train = sum(b["targets"].numel() for b in dm.train_dataloader())
    val = sum(b["targets"].numel() for b in dm.val_dataloader())
    return train, val, dm


def _versions(packages: Iterable[str]) -> dict[str, str]:
    out = {}
    for p in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p], capture_output=True, text=True)
        out[p] = r.stdout.strip() if r.returncode == 0 else "?"
    return out


def summarize(parts: list[tuple[str, list[str]]], tokenizer: Any = None, val_every: int = 50) -> dict:
    """Documents, characters and (with a tokenizer) tokens of each source and in total.
    Tokens are counted per document as the data module streams them (the document's tokens
    and one end-of-text token), split as it splits train and validation documents (one in
    ``val_every`` by text hash); the loader's count is these totals less the tail that does
    not fill a seq_len block or a train batch."""
    is_val = None
    if tokenizer is not None:
        from smk_lightning.data.stream import Source

        is_val = Source(format="text", split="train", val_every=val_every).is_val
    rows = []
    for name, docs in parts:
        row: dict[str, Any] = {"source": name, "packages": list(SOURCES[name][0]) if name in SOURCES else [],
                               "documents": len(docs), "characters": sum(map(len, docs))}
        if tokenizer is not None:
            train = val = 0
            for d, enc in zip(docs, tokenizer.encode_batch(docs)):
                if is_val(d):
                    val += len(enc.ids) + 1
                else:
                    train += len(enc.ids) + 1
            row.update(train_tokens=train, val_tokens=val, tokens=train + val)
        rows.append(row)
    keys = ["documents", "characters"] + (["train_tokens", "val_tokens", "tokens"] if tokenizer is not None else [])
    return {"sources": rows, "total": {k: sum(r[k] for r in rows) for k in keys}}


def _table(summary: dict) -> str:
    tokens = "tokens" in summary["total"]
    head = f"{'source':<20} {'documents':>9} {'characters':>12}" + (
        f" {'train tokens':>12} {'val tokens':>10} {'share':>6}" if tokens else "") + "  Debian packages"
    lines = [head]
    total = summary["total"]
    for r in [*summary["sources"], {"source": "total", "packages": [], **total}]:
        line = f"{r['source']:<20} {r['documents']:9,d} {r['characters']:12,d}"
        if tokens:
            line += f" {r['train_tokens']:12,d} {r['val_tokens']:10,d} {r['tokens'] / max(total['tokens'], 1):6.1%}"
        lines.append((line + "  " + " ".join(r["packages"])).rstrip())
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # never leave a half-written file under the final name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="smk-build-corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output text file, one document per line (default: data/real_corpus.txt; "
                             "data/real_corpus_large.txt with any source outside the small set); "
                             "the summary goes beside it, as data/real_corpus.summary.json")
    parser.add_argument("--sources", nargs="+", choices=[*SOURCE_SETS, *SOURCES], default=["small"],
                        metavar="SOURCE",
                        help="sources to include, by name or set: small (the original 2.8 M-token corpus: "
                             f"{', '.join(SOURCE_SETS['small'])}), large (small and "
                             f"{', '.join(n for n in SOURCE_SETS['large'] if n not in SOURCE_SETS['small'])}); "
                             "default: small")
    parser.add_argument("--doc-chars", type=int, default=DOC_CHARS,
                        help=f"most characters of a document made of several paragraphs (default: {DOC_CHARS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document order (default: 0)")
    parser.add_argument("--no-install", action="store_true",
                        help="never run apt-get; print the command to install what is missing")
    parser.add_argument("--count-tokens", type=int, metavar="VOCAB", default=None,
                        help="also count tokens with the project's BPE of this vocabulary size (e.g. 2048), "
                             "in total and per source (a few minutes for the large set; caches the "
                             "tokenizer in --cache-dir)")
    parser.add_argument("--cache-dir", default="data_cache", help="tokenizer cache (default: data_cache, as smk fit)")
    args = parser.parse_args(argv)
    if args.doc_chars < 1:
        _fail(f"--doc-chars={args.doc_chars} must be >= 1")
    sources = list(dict.fromkeys(n for s in args.sources for n in SOURCE_SETS.get(s, [s])))
    large = not set(sources) <= set(SOURCE_SETS["small"])
    out = args.out or DEFAULT_OUT["large" if large else "small"]
    per_token = CHARS_PER_TOKEN_LARGE if large else CHARS_PER_TOKEN

    ensure_packages(sorted({p for s in sources for p in SOURCES[s][0]}), not args.no_install)
    docs: list[str] = []
    parts: list[tuple[str, list[str]]] = []
    for name in sources:
        got = SOURCES[name][1](args.doc_chars)
        print(f"{name:>20}: {len(got):7,d} documents {sum(map(len, got)):12,d} characters", flush=True)
        parts.append((name, got))
        docs += got
    random.Random(args.seed).shuffle(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, "".join(d + "\n" for d in docs))
    chars = sum(map(len, docs))
    print(f"wrote {out}: {len(docs):,d} documents, {chars:,d} characters, about "
          f"{chars / per_token / 1e6:.1f} M tokens at vocab 2048 (--count-tokens 2048 counts them)")
    summary: dict[str, Any] = {"corpus": str(out), "seed": args.seed, "doc_chars": args.doc_chars}
    tokenizer, val_every = None, 50
    if args.count_tokens:
        train, val, dm = count_tokens(out, args.count_tokens, args.cache_dir)
        tokenizer, val_every = dm.tokenizer, dm.val_fraction_docs
        summary.update(vocab_size=args.count_tokens, loader_train_tokens=train, loader_val_tokens=val)
        print(f"tokens at vocab {args.count_tokens}: {train:,d} train + {val:,d} validation "
              f"(seq_len 128 blocks; {chars / (train + val):.2f} characters per token)")
    summary.update(summarize(parts, tokenizer, val_every))
    for row in summary["sources"]:
        row["package_versions"] = _versions(row["packages"])
    print("per source" + (" (tokens: each document's and its end-of-text token, split into train and "
                          "validation as the data module splits them)" if tokenizer else "") + ":")
    print(_table(summary))
    summary_path = out.with_name(out.stem + ".summary.json")
    _write(summary_path, json.dumps(summary, indent=1) + "\n")
    print(f"wrote {summary_path}")


if __name__ == "__main__":
    main()
