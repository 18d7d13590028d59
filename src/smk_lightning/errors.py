"""Errors the user can fix by changing a setting or an input file, and the one way every
command reports them.

``smk`` (``smk_lightning.cli.main``) prints a :class:`ConfigError` as one line,
``smk: error: <message>``, and exits with status 2 instead of showing a traceback;
the tools (``smk-sweep``, ``smk-report``, ...) do the same through :func:`exit_with_error`.
``ConfigError`` subclasses ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class ConfigError(ValueError):
    """A bad configuration value or input (file, tokenizer, checkpoint); the message says what to do."""


def one_line(msg: object) -> str:
    """``msg`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(msg).split())


def exit_with_error(prog: str, msg: object, code: int = 2) -> NoReturn:
    """``prog: error: msg`` as one line on stderr, then exit with ``code`` (2, as argparse
    does for bad input): no traceback."""
    print(f"{prog}: error: {one_line(msg)}", file=sys.stderr)
    raise SystemExit(code)
