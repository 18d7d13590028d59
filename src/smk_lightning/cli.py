"""``smk``: LightningCLI for SMKModule + SMKDataModule.

    smk fit --config configs/default.yaml
    smk validate --config configs/smoke.yaml --ckpt_path lightning_logs/.../last.ckpt

Defaults live in the config dataclasses and callback signatures; this file only wires
them: the TensorBoard logger under ``lightning_logs/``, ``last.ckpt`` checkpoints, the
monitors, and the ``data.vocab_size → model.model.vocab_size`` link.
"""

from __future__ import annotations

import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from smk_lightning.callbacks import RouterMonitor, SystemMonitor, TextSampler
from smk_lightning.data import SMKDataModule
from smk_lightning.module import SMKModule

set_parsing_settings(docstring_parse_attribute_docstrings=True)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "smk"},
    },
    "inference_mode": False,  # validation statistics need a backward pass
    "max_steps": 1000,
    "val_check_interval": 200,
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
}


class SMKCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.model.vocab_size")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(RouterMonitor, "router_monitor")
        parser.add_lightning_class_args(SystemMonitor, "system_monitor")
        parser.add_lightning_class_args(TextSampler, "samples")


def make_cli(args: list[str] | None = None, run: bool = True) -> SMKCLI:
    """Build (and with ``run``, execute) the CLI; ``run=False`` parses and instantiates only."""
    return SMKCLI(
        SMKModule,
        SMKDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=1234,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    make_cli(args)


if __name__ == "__main__":
    main(sys.argv[1:])
