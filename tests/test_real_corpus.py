"""smk-build-corpus: text extraction on small samples of each source format (plain text,
Bible, Jargon File, fortunes, reStructuredText, HTML, POD), the per-source summary (no apt;
the real corpora are built by hand, see README)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import smk_lightning.tools.corpus_build as cb
from smk_lightning.tools.corpus_build import (
    LICENSE_DIR,
    bible_paragraphs,
    fortune_paragraphs,
    html_paragraphs,
    jargon_paragraphs,
    main,
    pack,
    pod_paragraphs,
    prose_paragraphs,
    rst_inline,
    rst_paragraphs,
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


RST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _workqueue:

=====================
Concurrency Managed Workqueue
=====================

:Author: Tejun Heo

There are many cases where an *asynchronous* process execution context is
needed; see :ref:`the overview <wq-overview>`, ``queue_work()`` and
`the wiki <https://example.org>`_ [#f1]_ for |details|.

.. note:: Do not rely on the order
   of execution.

.. code-block:: none

   Output of a command that reads like a sentence

.. toctree::
   :maxdepth: 2

   Introduction to the subsystem

Use it like this::

    make menuconfig and then make all of it

::

    literal again

.. function:: queue_work(wq, work)
   :noindex:

   Queue a work item on a workqueue and return whether it was queued.

- First item of a list
  goes on here.
- Second item of the list.

>>> print("doctest dropped")
doctest dropped

=====  =====
col a  col b
=====  =====

+------+------+
| grid | cell |
+------+------+

Section Title Here
------------------
"""


def test_rst_paragraphs():
    assert rst_paragraphs(RST) == [
        "Concurrency Managed Workqueue",
        "Author: Tejun Heo",
        "There are many cases where an asynchronous process execution context is needed; see "
        "the overview, queue_work() and the wiki for details.",
        "Do not rely on the order of execution.",
        "Use it like this:",
        "Queue a work item on a workqueue and return whether it was queued.",
        "First item of a list goes on here.",
        "Second item of the list.",
        "Section Title Here",
    ]


def test_rst_inline():
    assert rst_inline(r"a :class:`~json.JSONDecoder` b ``\t`` c \*not emphasis\* **bold**") == (
        r"a json.JSONDecoder b \t c *not emphasis* bold")


HTML = """\
<!DOCTYPE html><html class="sidebar-visible"><head><title>Joins</title>
<script>var x = "<p>not text</p>";</script><style>p { color: red }</style></head>
<body><div class="navheader"><a href="prev.html">Prev</a> Up Next Home page</div>
<div id="hd"><h1>Django 3.2 documentation</h1></div>
<div class="sphinxsidebar" role="navigation"><ul><li>Table of contents entry one</li></ul></div>
<h2>2.6. Joins Between Tables</h2>
<p>Queries can access <em>multiple</em> tables at once, using
<code class="literal">JOIN</code>, as in the <a href="x.html">next section</a>.</p>
<pre class="programlisting">SELECT * FROM weather JOIN cities ON city = name;</pre>
<table><tr><td>San Francisco</td><td>46</td><td>50</td></tr></table>
<ul><li>The first list item is a sentence.</li><li>And the second &amp; last one&hellip;</li></ul>
<p>Short</p><br/><p>A paragraph after a line break, with a <span>nested <b>bold</b></span> part.</p>
<div class="navfooter"><p>Prev Up Next Home</p></div>
</body></html>
"""


def test_html_paragraphs():
    assert html_paragraphs(HTML) == [
        "2.6. Joins Between Tables",
        "Queries can access multiple tables at once, using JOIN, as in the next section.",
        "The first list item is a sentence.",
        "And the second & last one\u2026",
        "A paragraph after a line break, with a nested bold part.",
    ]


POD = """\
package Foo::Bar;
use strict;

sub new { bless {}, shift }

=head1 NAME

Foo::Bar - a B<small> example

=head1 DESCRIPTION

This module uses C<< $obj->method >> and C<sprintf>, see L<perlfunc/"sprintf">,
L<the FAQ|perlfaq4> and L<perlop>.X<operator> It prints E<lt>fooE<gt>
and I<nested B<codes>> too.

    my $obj = Foo::Bar->new;
    print $obj->method;

  This verbatim block reads like prose but it is code.

=head2 Why is int() broken?

=over 4

=item * First

The first item's own paragraph is prose.

=back

=begin html

<p>Raw HTML for one formatter</p>

=end html

=for comment A comment paragraph for no one.

=cut

sub method { return 42 }

=pod

Back in POD after the code.

=cut
"""


def test_pod_paragraphs():
    assert pod_paragraphs(POD) == [  # one-word headings (NAME) go as non-prose, as elsewhere
        "Foo::Bar - a small example",
        "This module uses $obj->method and sprintf, see sprintf in perlfunc, the FAQ and "
        "perlop. It prints <foo> and nested codes too.",
        "Why is int() broken?",
        "The first item's own paragraph is prose.",
        "Back in POD after the code.",
    ]


def test_manual_sources_drop_repeated_paragraphs(tmp_path):
    """A paragraph already seen in the same source (page furniture, boilerplate) goes."""
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    a.write_text("<p>Report a bug in this page please.</p><p>First page text is here.</p>")
    b.write_text("<p>Report a bug in this page please.</p><p>Second page text is here.</p>")
    build = cb._docs(html_paragraphs, lambda: [a, b])
    assert build(30) == ["Report a bug in this page please.", "First page text is here.",
                         "Second page text is here."]


def _fake_sources(n_docs: int) -> dict:
    """Sources that need no Debian package: deterministic sentences of a few hundred words."""
    words = ("the", "kernel", "queue", "table", "river", "light", "process", "verse", "shell",
             "module", "value", "green", "paper", "over", "under", "quickly", "returns", "each")

    def make(seed: int):
        def build(doc_chars: int) -> list[str]:
            rng = random.Random(seed)
            paras = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))).capitalize() + "."
                     for _ in range(n_docs)]
            return pack(paras, doc_chars)
        return build

    return {name: ((), make(i)) for i, name in enumerate(cb.SOURCE_SETS["large"])}


def test_default_sources_and_paths(tmp_path, monkeypatch, capsys):
    """--sources small (the default) keeps the original corpus: same sources, same order,
    same path; --sources large adds the manuals and writes beside it."""
    assert cb.SOURCE_SETS["small"] == ["bible-kjv", "jargon", "fortunes", "debian-reference",
                                       "gnu-standards", "licenses"]
    assert cb.SOURCE_SETS["large"][:6] == cb.SOURCE_SETS["small"]
    monkeypatch.setattr(cb, "SOURCES", _fake_sources(20))
    monkeypatch.chdir(tmp_path)
    main(["--no-install"])
    small = Path("data/real_corpus.txt").read_text(encoding="utf-8").splitlines()
    main(["--no-install", "--sources", "large"])
    large = Path("data/real_corpus_large.txt").read_text(encoding="utf-8").splitlines()
    assert set(small) < set(large)
    assert Path("data/real_corpus.summary.json").is_file() and Path("data/real_corpus_large.summary.json").is_file()
    summary = json.loads(Path("data/real_corpus_large.summary.json").read_text())
    assert [r["source"] for r in summary["sources"]] == cb.SOURCE_SETS["large"]


def test_summary_per_source_adds_up(tmp_path, monkeypatch, capsys):
    """Each source's documents, characters and tokens, and totals that are their sums: the
    file's line count and length, the data module's token count (less its tail)."""
    monkeypatch.setattr(cb, "SOURCES", _fake_sources(300))
    out = tmp_path / "corpus.txt"
    main(["--no-install", "--sources", "bible-kjv", "linux-doc", "perl-doc", "--out", str(out),
          "--count-tokens", "300", "--cache-dir", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "corpus.summary.json").read_text())
    rows, total = summary["sources"], summary["total"]
    assert [r["source"] for r in rows] == ["bible-kjv", "linux-doc", "perl-doc"]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert total["documents"] == len(lines) == sum(r["documents"] for r in rows)
    assert total["characters"] == sum(map(len, lines)) == sum(r["characters"] for r in rows)
    for key in ("train_tokens", "val_tokens", "tokens"):
        assert total[key] == sum(r[key] for r in rows)
    assert all(r["tokens"] == r["train_tokens"] + r["val_tokens"] > r["documents"] for r in rows)
    # the loader packs the same tokens into seq_len-128 blocks and full train batches of 64
    assert 0 <= total["train_tokens"] - summary["loader_train_tokens"] < 64 * 128 + 129
    assert 0 <= total["val_tokens"] - summary["loader_val_tokens"] < 129
    for r in [*rows, {"source": "total", **total}]:
        assert f"{r['source']:<20} {r['documents']:9,d} {r['characters']:12,d} {r['train_tokens']:12,d}" in printed
