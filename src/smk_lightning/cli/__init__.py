"""The ``smk`` command: Lightning's CLI around ``SMKModule`` and ``SMKDataModule``, with its
checkpoint handling (``checkpoint``), trainer-option checks (``trainer_options``) and logger
(``logger``); ``python -m smk_lightning.cli`` is the same command."""

from smk_lightning.cli.smk import main, make_cli

__all__ = ["main", "make_cli"]
