"""Errors the user can fix by changing a setting or an input file.

``smk`` (``smk_lightning.cli.main``) prints a :class:`ConfigError` as one line,
``smk: error: <message>``, and exits with status 2 instead of showing a traceback.
It subclasses ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value or input (file, tokenizer, checkpoint); the message says what to do."""


def one_line(msg: object) -> str:
    """``msg`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(msg).split())
