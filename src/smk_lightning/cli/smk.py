"""``smk``: LightningCLI for SMKModule + SMKDataModule.

    smk fit --config configs/default.yaml
    smk fit --config configs/default.yaml --ckpt_path last        # resume the newest run, in its directory
    smk validate --config configs/smoke.yaml --ckpt_path lightning_logs/.../last.ckpt

Defaults live in the config dataclasses and callback signatures; this file only wires
them: the TensorBoard logger under ``lightning_logs/``, periodic atomic ``last.ckpt``
checkpoints, the monitors, the console display, and the ``data.vocab_size →
model.model.vocab_size`` link. Bad settings are refused before anything runs (see
``cli_checkpoint`` for ``--ckpt_path``, ``cli_trainer_options`` for trainer options).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError
from functools import partial
from pathlib import Path

from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from smk_lightning.callbacks import (
    GracefulInterrupt,
    ParamSummary,
    PeriodicCheckpoint,
    ProgressLines,
    RouterMonitor,
    StepProgressBar,
    SystemMonitor,
    TextSampler,
    ValidateLastStep,
)
from smk_lightning.cli.allocator import keep_freed_memory
from smk_lightning.cli.checkpoint import (
    SPECIAL_CKPT,
    checkpoint_mismatch,
    load_checkpoint,
    load_state_dict_message,
    logger_args,
    resolve_last,
    run_version_of,
    version_dir,
)
from smk_lightning.cli.trainer_options import (
    RESTRICTED_HELP,
    check_accelerator,
    check_barebones,
    check_compile,
    check_precision,
    check_strategy,
    map_optim_options,
)
from smk_lightning.data import SMKDataModule
from smk_lightning.errors import ConfigError, exit_with_error, one_line
from smk_lightning.training.module import NonFiniteTrainingError, SMKModule

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "smk_lightning.cli.logger.TensorBoardLogger",  # Lightning's; keeps the newest values for the console
        # name None: the run is named by what it is (``_name_run``) unless one is given
        "init_args": {"save_dir": "lightning_logs", "name": None, "default_hp_metric": False},
    },
    "inference_mode": False,  # validation statistics need a backward pass
    "max_steps": 1200,
    "val_check_interval": 200,
    "limit_val_batches": 8,
    "check_val_every_n_epoch": None,  # validate every val_check_interval steps, across epochs
    "log_every_n_steps": 10,
}


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's, except that the trainer options whose values smk restricts say which
    values it takes (``RESTRICTED_HELP``) instead of listing Lightning's."""

    def _get_help_string(self, action) -> str:
        return RESTRICTED_HELP.get(action.dest) or super()._get_help_string(action)


class SMKCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: the module has no test or predict step (its held-out
        split is the validation one), so Lightning's ``test`` / ``predict`` are not offered."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.model.vocab_size")
        parser.add_lightning_class_args(PeriodicCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.save_on_exception": True})
        parser.add_lightning_class_args(RouterMonitor, "router_monitor")
        parser.add_lightning_class_args(SystemMonitor, "system_monitor")
        parser.add_lightning_class_args(TextSampler, "samples")
        parser.add_lightning_class_args(GracefulInterrupt, "interrupt")
        parser.add_lightning_class_args(ProgressLines, "console")
        # --help: the project's options first, Lightning's Trainer (hundreds of lines) last, and
        # a usage line that does not repeat every option
        trainer = parser.groups["trainer"]
        trainer.title = "Lightning's Trainer (--trainer.*; smk's own options are above)"
        parser._action_groups = [g for g in parser._action_groups if g is not trainer] + [trainer]
        parser.usage = "%(prog)s [-h] [--config CONFIG] [--print_config[=flags]] [--ckpt_path CKPT_PATH] [--KEY VALUE ...]"

    # -- bad input fails before anything runs (main prints ConfigError / ArgumentError as one line)
    def init_parser(self, **kwargs):
        kwargs.setdefault("exit_on_error", False)  # raise parse errors instead of printing the whole usage
        kwargs.setdefault("formatter_class", _HelpFormatter)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        cfg = _subconfig(self.config)
        _name_run(cfg)
        _logs_under_root_dir(cfg)
        ckpt = cfg.get("ckpt_path") if cfg is not self.config else None
        if ckpt == "last":
            ckpt = str(resolve_last(cfg))
            cfg.ckpt_path = ckpt  # Lightning would look in the new, empty run directory
        if ckpt and ckpt not in SPECIAL_CKPT and "://" not in str(ckpt):
            if not os.path.isfile(ckpt):
                raise ConfigError(
                    f"ckpt_path {str(ckpt)!r} does not exist; pass an existing checkpoint file "
                    "(e.g. lightning_logs/default/version_0/checkpoints/last.ckpt) or --ckpt_path last"
                )
            checkpoint = load_checkpoint(ckpt)  # refuses pickled code / unreadable files in one line
            if self.config.get("subcommand") == "fit":
                self._continue_run(cfg, Path(ckpt), checkpoint.get("global_step"))
        # Lightning replaces the model settings by the checkpoint's hyper-parameters right after this.
        self._model_before_ckpt = _flat(cfg.get("model")) if ckpt else None

    @staticmethod
    def _continue_run(cfg, ckpt: Path, global_step: int | None) -> None:
        """A fit from a checkpoint of a run in this logger's tree logs into that run's directory:
        one event directory, steps continuing. TensorBoard's ``purge_step`` hides what a killed
        process logged after the checkpoint (the logs' x-axis is the optimizer step: the module
        logs ``step``), so no step shows two values."""
        init = logger_args(cfg.trainer)
        run = run_version_of(ckpt, cfg)
        if init is None or run is None:
            return
        if init.get("version") is None:
            init.version = run
        if version_dir(init.version) != version_dir(run):  # an explicit other version: a new run directory
            return
        if isinstance(global_step, int) and "purge_step" in init and init.get("purge_step") is None:
            init.purge_step = global_step + 1

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
        map_optim_options(cfg)
        check_barebones(cfg.trainer.get("barebones"))
        check_strategy(cfg.trainer.get("strategy"))
        check_accelerator(cfg.trainer.get("accelerator"))
        check_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
        check_compile(cfg.model.model.compile, cfg.trainer.get("precision"))

    def instantiate_trainer(self, **kwargs):
        """Adds the console display: a step progress bar on a terminal, plain lines otherwise
        (``ProgressLines`` prints only when no bar is shown); a one-line model summary; the
        validation of the final step."""
        trainer_cfg = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        callbacks = list(trainer_cfg.get("callbacks") or [])
        extra = [ValidateLastStep()]
        bar = trainer_cfg.get("enable_progress_bar")  # None (default): a bar on a terminal only
        if bar is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            if bar or sys.stdout.isatty():
                extra.append(StepProgressBar())
            else:
                kwargs.setdefault("enable_progress_bar", False)  # redraws would fill a log file
        if trainer_cfg.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary)
                                                                             for c in callbacks):
            extra.append(ParamSummary())
        kwargs.setdefault("callbacks", callbacks + extra)
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config, callbacks):
        # --trainer.enable_checkpointing false: no checkpoint at all, so no ``checkpoint``
        # callback either (Lightning refuses a ModelCheckpoint with checkpointing off)
        _RUN["checkpointing"] = config.get("enable_checkpointing") is not False
        if not _RUN["checkpointing"]:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def _check_checkpoint(self) -> None:
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt and os.path.isfile(ckpt):
            msg = checkpoint_mismatch(ckpt, self.model)
            if msg:
                raise ConfigError(msg)

    def before_fit(self) -> None:
        self._check_checkpoint()
        self._say_where("run directory")

    def after_fit(self) -> None:
        self._say_where("done; run directory")

    def _say_where(self, what: str) -> None:
        """Where the run is written (TensorBoard logs, config.yaml, checkpoints/), on rank zero."""
        trainer = self.trainer
        if trainer.is_global_zero and trainer.logger is not None and trainer.log_dir:
            print(f"smk: {what} {trainer.log_dir} (TensorBoard: tensorboard --logdir "
                  f"{trainer.logger.save_dir})", flush=True)

    def before_validate(self) -> None:
        if not self.config[self.subcommand].get("ckpt_path"):
            rank_zero_warn("smk validate without --ckpt_path evaluates freshly initialised weights; pass "
                           "--ckpt_path last (or a checkpoint file) to evaluate a trained run")
        self._check_checkpoint()


# What ``main`` reports when the run ends early: whether a checkpoint was saved. Kept here
# because a SIGTERM ends ``make_cli`` with an exception, leaving no CLI object to ask.
_RUN = {"checkpointing": True}


def _name_run(cfg) -> None:
    """A run is named by what it is, unless ``--trainer.logger.init_args.name`` says otherwise:
    the file name of its last ``--config`` (``--config configs/experiments/smk_hard.yaml`` →
    ``lightning_logs/smk_hard/version_N``), else its router loss (``lightning_logs/switch/…``)."""
    init = logger_args(cfg.trainer)
    if init is None or init.get("name") is not None:
        return
    files = [Path(str(c)) for c in cfg.get("config") or [] if os.path.isfile(str(c))]
    init.name = files[-1].stem if files else str(cfg.model.router.loss)


def _logs_under_root_dir(cfg) -> None:
    """``--trainer.default_root_dir D`` puts the run under ``D`` as Lightning's default logger
    would (``D/lightning_logs/…``): the configured logger's ``save_dir``, while it is still
    the default, becomes ``D/lightning_logs`` (checkpoints live in the run directory)."""
    root, init = cfg.trainer.get("default_root_dir"), logger_args(cfg.trainer)
    if root is not None:
        _check_creatable(root, "--trainer.default_root_dir")
    default = TRAINER_DEFAULTS["logger"]["init_args"]["save_dir"]
    if root is not None and init is not None and init.get("save_dir") == default:
        init.save_dir = str(Path(root) / default)


def _check_creatable(path, option: str) -> None:
    """A directory the run will write must exist or be creatable: its nearest existing
    ancestor must be a writable directory (checked without creating anything)."""
    p = Path(path).absolute()
    ancestor = next(a for a in (p, *p.parents) if a.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{option}={str(path)!r} cannot be created: {ancestor} is a file; pass a directory path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={str(path)!r} cannot be created: {ancestor} is not writable; "
                          "pass a directory you can write to")


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


_NO_OPTIMIZER_OPTION = re.compile(r"(^|[\s'\"-])(optimizer|lr_scheduler)\b")


def _parse_error_message(err: ArgumentError, args) -> str:
    msg = one_line(err)
    msg = re.sub(r"Expected a <class '(\w+)'>", r"Expected type \1", msg)
    msg = re.sub(r"Expected a typing\.Literal\[(.*?)\]", r"Expected one of \1", msg)
    if len(msg) > 400:
        msg = msg[:400] + " ..."
    if _NO_OPTIMIZER_OPTION.search(msg):
        msg += ("; smk has no --optimizer / --lr_scheduler: the module's AdamW with warmup + cosine decay is set "
                "by --model.optim.* (lr, router_lr, weight_decay, betas, warmup_steps, min_lr_ratio)")
    sub = next((a for a in args or () if a in SMKCLI.subcommands()), None)
    return f"{msg} (see: smk {sub} --help)" if sub else f"{msg} (see: smk --help)"


_error_exit = partial(exit_with_error, "smk")


class _DropNoise(logging.Filter):
    """Lightning's "💡 Tip: … try installing litlogger / litmodels" advertisements, and its note
    that our one-line model summary replaces its table."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("💡 Tip", "Trainer already configured with model summary"))


def quiet_third_party() -> None:
    """Every run printed deprecation warnings of torch / torchdata / Lightning internals and
    Lightning's advertisements; none is actionable by an smk user. Our own warnings stay."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"^(?!smk_lightning)")
    warnings.filterwarnings("ignore", message=r".*\bis deprecated\b", category=UserWarning,
                            module=r"^(?!smk_lightning)")
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropNoise())


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
        # the module builds its own AdamW + schedule (manual optimisation): a LightningCLI
        # --optimizer / --lr_scheduler would be ignored by its training step
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def _saved() -> str:
    if _RUN["checkpointing"]:
        return "after saving a checkpoint; resume with --ckpt_path last"
    return "without a checkpoint (--trainer.enable_checkpointing false)"


def main(args: list[str] | None = None) -> None:
    """``smk``: bad settings and inputs end with one line on stderr and exit status 2."""
    quiet_third_party()
    keep_freed_memory()
    try:
        cli = make_cli(args)
    except SIGTERMException:
        # Lightning saved a checkpoint (save_on_exception) and exits with status 0; a job
        # scheduler must still see that the run did not finish.
        sys.stderr.write("smk: stopped by SIGTERM " + _saved() + "\n")
        sys.exit(143)
    except (ConfigError, NonFiniteTrainingError) as e:
        _error_exit(str(e))
    except MisconfigurationException as e:  # Lightning refusing a trainer setting (accelerator, devices, ...)
        _error_exit(str(e))
    except ArgumentError as e:  # jsonargparse: unknown key, wrong type, bad choice, unreadable config
        _error_exit(_parse_error_message(e, sys.argv[1:] if args is None else args))
    except RuntimeError as e:
        msg = load_state_dict_message(e)
        if msg is None:
            raise
        _error_exit(msg)
    interrupt = next((c for c in cli.trainer.callbacks if isinstance(c, GracefulInterrupt)), None)
    if interrupt is not None and interrupt.requested:
        sys.stderr.write("smk: interrupted by Ctrl-C " + _saved() + "\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
