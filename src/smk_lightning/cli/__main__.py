"""``python -m smk_lightning.cli`` (what ``torchrun``, ``srun`` and ``smk-sweep`` start) = ``smk``."""

from smk_lightning.cli.smk import main

main()
