"""``smk``: LightningCLI for SMKModule + SMKDataModule.

    smk fit --config configs/default.yaml
    smk validate --config configs/smoke.yaml --ckpt_path lightning_logs/.../last.ckpt

Defaults live in the config dataclasses and callback signatures; this file only wires
them: the TensorBoard logger under ``lightning_logs/``, ``last.ckpt`` checkpoints, the
monitors, and the ``data.vocab_size → model.model.vocab_size`` link.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from smk_lightning.callbacks import GracefulInterrupt, RouterMonitor, SystemMonitor, TextSampler
from smk_lightning.data import SMKDataModule
from smk_lightning.errors import ConfigError, one_line
from smk_lightning.module import NonFiniteTrainingError, SMKModule

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "smk"},
    },
    "inference_mode": False,  # validation statistics need a backward pass
    "max_steps": 1200,
    "val_check_interval": 200,
    "limit_val_batches": 8,
    "check_val_every_n_epoch": None,  # validate every val_check_interval steps, across epochs
    "log_every_n_steps": 10,
}


class SMKCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.model.vocab_size")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.save_on_exception": True})
        parser.add_lightning_class_args(RouterMonitor, "router_monitor")
        parser.add_lightning_class_args(SystemMonitor, "system_monitor")
        parser.add_lightning_class_args(TextSampler, "samples")
        parser.add_lightning_class_args(GracefulInterrupt, "interrupt")

    # -- bad input fails before anything runs (main prints ConfigError / ArgumentError as one line)
    def init_parser(self, **kwargs):
        kwargs.setdefault("exit_on_error", False)  # raise parse errors instead of printing the whole usage
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        cfg = _subconfig(self.config)
        ckpt = cfg.get("ckpt_path") if cfg is not self.config else None
        if ckpt and ckpt not in _SPECIAL_CKPT and "://" not in str(ckpt) and not os.path.isfile(ckpt):
            raise ConfigError(
                f"ckpt_path {str(ckpt)!r} does not exist; pass an existing checkpoint file "
                "(e.g. lightning_logs/smk/version_0/checkpoints/last.ckpt)"
            )
        # Lightning replaces the model settings by the checkpoint's hyper-parameters right after this.
        self._model_before_ckpt = _flat(cfg.get("model")) if ckpt else None

    def before_instantiate_classes(self) -> None:
        cfg = _subconfig(self.config)
        before = getattr(self, "_model_before_ckpt", None)
        if before is not None:
            after = _flat(cfg.get("model"))
            changed = [f"model.{k}={after[k]!r} (config: {v!r})" for k, v in before.items()
                       if k in after and after[k] != v and not k.endswith("vocab_size")]
            if changed:
                rank_zero_warn(
                    "ckpt_path: the checkpoint's model settings replace the config's: " + ", ".join(changed[:4])
                    + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
                )
        seq_len, max_seq_len = cfg.data.seq_len, cfg.model.model.max_seq_len
        if seq_len > max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds model.model.max_seq_len={max_seq_len}; "
                "raise --model.model.max_seq_len or lower --data.seq_len"
            )

    def _check_checkpoint(self) -> None:
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt and os.path.isfile(ckpt):
            msg = _checkpoint_mismatch(ckpt, self.model)
            if msg:
                raise ConfigError(msg)

    def before_fit(self) -> None:
        self._check_checkpoint()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()


_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


def _subconfig(config):
    sub = config.get("subcommand")
    return config[sub] if sub else config


def _flat(ns, prefix: str = "") -> dict:
    """Nested Namespace/dict → ``{"model.d_model": 32, ...}`` (leaves only)."""
    if ns is None:
        return {}
    items = ns.as_dict() if hasattr(ns, "as_dict") else ns
    out: dict = {}
    for k, v in items.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_hint(ckpt: str) -> str:
    cfg = Path(ckpt).resolve().parent.parent / "config.yaml"
    where = f"--config {cfg}" if cfg.is_file() else "the config.yaml saved in the checkpoint's run directory"
    return f"use the config the checkpoint was trained with ({where})"


def _shape(t) -> str:
    return "(" + ", ".join(str(int(d)) for d in t) + ")"


def _checkpoint_mismatch(ckpt: str, model) -> str | None:
    """One-line description of how the checkpoint's weights differ from ``model``, or None."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    except Exception:  # unreadable here: leave it to Lightning (main reformats its size mismatch)
        return None
    own = model.state_dict()
    diff = [(k, v.shape, own[k].shape) for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if diff:
        k, theirs, ours = diff[0]
        more = f" ({len(diff) - 1} more parameters differ)" if len(diff) > 1 else ""
        return (f"checkpoint {ckpt!r} does not match the model config: {k} has shape {_shape(theirs)} in the "
                f"checkpoint but {_shape(ours)} in the config{more}; {_config_hint(ckpt)}")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} parameters of the configured model (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"has {len(unexpected)} parameters the configured model lacks (e.g. {unexpected[0]})")
        return f"checkpoint {ckpt!r} does not match the model config: it {' and '.join(parts)}; {_config_hint(ckpt)}"
    return None


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: \"([^\"]+)\"")


def _load_state_dict_message(err: RuntimeError) -> str | None:
    """One line for a state-dict mismatch raised while loading a checkpoint, else None."""
    text = str(err)
    hint = "use the config the checkpoint was trained with (the config.yaml in its run directory)"
    m = _SIZE_MISMATCH.search(text)
    if m:
        n = len(_SIZE_MISMATCH.findall(text))
        more = f" ({n - 1} more parameters differ)" if n > 1 else ""
        return (f"the checkpoint does not match the model config: {m.group(1)} has shape ({m.group(2)}) in the "
                f"checkpoint but ({m.group(3)}) in the config{more}; {hint}")
    m = _KEYS.search(text)
    if m:
        return (f"the checkpoint does not match the model config: {m.group(1).lower()} parameter {m.group(2)}; "
                f"{hint}")
    return None


def _parse_error_message(err: ArgumentError, args) -> str:
    msg = one_line(err)
    msg = re.sub(r"Expected a <class '(\w+)'>", r"Expected type \1", msg)
    msg = re.sub(r"Expected a typing\.Literal\[(.*?)\]", r"Expected one of \1", msg)
    if len(msg) > 400:
        msg = msg[:400] + " ..."
    sub = next((a for a in args or () if a in SMKCLI.subcommands()), None)
    return f"{msg} (see: smk {sub} --help)" if sub else f"{msg} (see: smk --help)"


def _error_exit(message: str) -> None:
    sys.stderr.write(f"smk: error: {one_line(message)}\n")
    sys.exit(2)


def make_cli(args: list[str] | None = None, run: bool = True) -> SMKCLI:
    """Build (and with ``run``, execute) the CLI; ``run=False`` parses and instantiates only."""
    argv = sys.argv[1:] if args is None else args
    # Field docstrings become --help text, but reading them costs seconds of start-up:
    # only pay for it when help is asked for.
    set_parsing_settings(docstring_parse_attribute_docstrings=bool({"-h", "--help"} & set(argv)))
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
    """``smk``: bad settings and inputs end with one line on stderr and exit status 2."""
    try:
        cli = make_cli(args)
    except SIGTERMException:
        # Lightning saved a checkpoint (save_on_exception) and exits with status 0; a job
        # scheduler must still see that the run did not finish.
        sys.stderr.write("smk: stopped by SIGTERM after saving a checkpoint; resume with --ckpt_path last\n")
        sys.exit(143)
    except (ConfigError, NonFiniteTrainingError) as e:
        _error_exit(str(e))
    except ArgumentError as e:  # jsonargparse: unknown key, wrong type, bad choice, unreadable config
        _error_exit(_parse_error_message(e, sys.argv[1:] if args is None else args))
    except RuntimeError as e:
        msg = _load_state_dict_message(e)
        if msg is None:
            raise
        _error_exit(msg)
    interrupt = next((c for c in cli.trainer.callbacks if isinstance(c, GracefulInterrupt)), None)
    if interrupt is not None and interrupt.requested:
        sys.stderr.write("smk: interrupted by Ctrl-C after saving a checkpoint; resume with --ckpt_path last\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
