"""smk-build-corpus: text extraction on small samples of each source format (no apt; the
real corpus is built by hand, see README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smk_lightning.corpus_build import (
    LICENSE_DIR,
    bible_paragraphs,
    fortune_paragraphs,
    jargon_paragraphs,
    main,
    pack,
    prose_paragraphs,
)

MANUAL = """\
Table of Contents

1. GNU/Linux tutorials
    1.1. Console basics
    1.2. Unix-like filesystem

3.3 Using Non-standard Features
===============================

Many GNU facilities that already exist support a number of convenient
extensions over the comparable Unix facilities.\tWhether to use them
is a difficult question.

    +-----------------------------+
    |directory|usage              |
    |---------+-------------------|
    |/etc/    |configuration files|
    +-----------------------------+

    $ ls -l /etc/
    # apt-get install gcc

      + chroot provides a basic virtualized environment enough to
        compile programs.

* Menu:
* Preface::   About this manual.
"""


def test_prose_paragraphs_keeps_prose_only():
    paras = prose_paragraphs(MANUAL)
    assert paras == [  # headings stay (short, but real text); lists, tables, code, menus go
        "Table of Contents",
        "3.3 Using Non-standard Features",
        "Many GNU facilities that already exist support a number of convenient extensions over "
        "the comparable Unix facilities. Whether to use them is a difficult question.",
        "+ chroot provides a basic virtualized environment enough to compile programs.",
    ]


def test_bible_paragraphs():
    text = ("\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
            "  2 And the earth was without form, and void; and darkness was upon the face of\n"
            "the deep.\n\nGenesis 2\n\n  1 Thus the heavens and the earth were finished.\n")
    assert bible_paragraphs(text) == [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "Thus the heavens and the earth were finished.",
    ]


def test_fortune_paragraphs():
    text = ("Kent's Heuristic:\n\tLook for it first where you'd most like to find it.\n%\n"
            "_\bB_\bo_\bl_\bd words are underlined by overstriking.\n%\n"
            "  ####  ####\n  #  #  #  #\n%\n")
    assert fortune_paragraphs(text) == [
        "Kent's Heuristic: Look for it first where you'd most like to find it.",
        "Bold words are underlined by overstriking.",
    ]


def test_jargon_headword_joins_its_definition():
    text = ("   :baroque: adj.\n\n   [common] Feature-encrusted; complex; gaudy; verging on\n"
            "   excessive.\n\n   :BASIC: /bay'·sic/, n.\n\n   A programming language.\n")
    assert jargon_paragraphs(text) == [
        "baroque: [common] Feature-encrusted; complex; gaudy; verging on excessive.",
        "BASIC: A programming language.",
    ]


def test_pack():
    assert pack(["aaaa", "bbb", "cc", "d" * 12], max_chars=9) == ["aaaa bbb", "cc", "d" * 12]
    assert pack([]) == []


@pytest.mark.skipif(not LICENSE_DIR.is_dir(), reason="no /usr/share/common-licenses (not Debian)")
def test_build_from_license_texts(tmp_path, capsys):
    """The one source every Debian system has: no package to install."""
    out = tmp_path / "data" / "corpus.txt"
    main(["--sources", "licenses", "--out", str(out), "--no-install"])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 10 and all(line.strip() and len(line) <= 20_000 for line in lines)
    assert any("GNU GENERAL PUBLIC LICENSE" in line for line in lines)
    assert f"{len(lines):,d} documents" in capsys.readouterr().out
    assert not list(Path(tmp_path / "data").glob("*.tmp"))
