"""``--ckpt_path`` for ``smk``: which file ``last`` means, which run directory a resumed fit
continues, and one-line refusals of checkpoints that cannot be used.

``smk`` advises ``--ckpt_path last`` after Ctrl-C or SIGTERM. Lightning resolves ``last``
inside the *new* run's checkpoint directory (``version_N+1``, empty), so on its own it
would warn and start from step 0. Here ``last`` is the newest ``checkpoints/last.ckpt`` under the logger's
``save_dir/name`` (or ``checkpoint.dirpath``), and a fit from a checkpoint of a run in that
tree logs into that run's directory again: one event directory, steps continuing.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from smk_lightning.errors import ConfigError

SPECIAL_CKPT = ("last", "best", "hpc", "registry")


# -- where checkpoints are ---------------------------------------------------------------------
def _get(ns, key, default=None):
    try:
        value = ns.get(key, default) if hasattr(ns, "get") else getattr(ns, key, default)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def logger_args(trainer_cfg):
    """``init_args`` of the first configured logger with a ``save_dir`` (TensorBoard, CSV), else None."""
    loggers = _get(trainer_cfg, "logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        init = _get(lg, "init_args")
        if init is not None and _get(init, "save_dir") is not None:
            return init
    return None


def runs_root(cfg) -> Path | None:
    """``save_dir/name``: the directory holding the logger's ``version_N`` run directories."""
    init = logger_args(cfg.trainer)
    if init is None:
        return None
    name = _get(init, "name") or ""
    return Path(_get(init, "save_dir")) / str(name)


def version_dir(version) -> str:
    """The run directory name of a logger version (int N → ``version_N``)."""
    return version if isinstance(version, str) else f"version_{version}"


def last_checkpoint_candidates(cfg) -> tuple[list[Path], str]:
    """Existing ``last.ckpt`` files that ``--ckpt_path last`` may mean, and where they were looked for."""
    dirpath = _get(cfg.checkpoint, "dirpath") if _get(cfg, "checkpoint") is not None else None
    if dirpath:
        paths = [Path(dirpath) / "last.ckpt"]
        where = str(Path(dirpath) / "last.ckpt")
    elif (root := runs_root(cfg)) is not None:
        version = _get(logger_args(cfg.trainer), "version")
        if version is not None:
            paths = [root / version_dir(version) / "checkpoints" / "last.ckpt"]
            where = str(paths[0])
        else:
            paths = sorted(root.glob("*/checkpoints/last.ckpt"))
            where = str(root / "*" / "checkpoints" / "last.ckpt")
    else:  # no logger: Lightning's ModelCheckpoint writes to default_root_dir/checkpoints
        base = Path(_get(cfg.trainer, "default_root_dir") or ".")
        paths = [base / "checkpoints" / "last.ckpt"]
        where = str(paths[0])
    return [p for p in paths if p.is_file()], where


def resolve_last(cfg) -> Path:
    """The newest (by modification time) ``last.ckpt``; ConfigError naming where it looked if none."""
    found, where = last_checkpoint_candidates(cfg)
    if not found:
        raise ConfigError(f"--ckpt_path last: no last.ckpt found (looked for {where}); "
                          "drop --ckpt_path to start a new run, or pass a checkpoint file")
    return max(found, key=lambda p: (p.stat().st_mtime, str(p)))


def run_version_of(ckpt: Path, cfg):
    """The logger version (int N for ``version_N``, else the directory name) of the run that wrote
    ``ckpt``, if it lies in ``save_dir/name/<run>/checkpoints/``; else None."""
    root = runs_root(cfg)
    if root is None or ckpt.parent.name != "checkpoints":
        return None
    run_dir = ckpt.parent.parent
    if run_dir.parent.resolve() != root.resolve():
        return None
    m = re.fullmatch(r"version_(\d+)", run_dir.name)
    return int(m.group(1)) if m else run_dir.name


# -- loading ------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)``; a file that carries pickled code or is not a readable
    checkpoint raises ConfigError naming the file and why (Lightning would show a traceback)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read: {e.strerror}") from None
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise ConfigError(f"{str(path)!r} is not a checkpoint (not a file written by torch.save); pass a .ckpt "
                          "file that smk wrote (e.g. lightning_logs/default/version_0/checkpoints/last.ckpt) "
                          "or --ckpt_path last")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"the Python object {m.group(1)}" if m else "pickled Python objects"
        raise ConfigError(
            f"checkpoint {str(path)!r} is refused: it contains {what}, which a safe load "
            "(torch.load weights_only=True) does not run; use checkpoints written by smk, or re-save "
            "this one with tensors and plain containers only"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"checkpoint {str(path)!r} is not a readable checkpoint (truncated, or not "
                          f"written by torch.save): {reason}") from None


def _config_hint(ckpt: str) -> str:
    cfg = Path(ckpt).resolve().parent.parent / "config.yaml"
    where = f"--config {cfg}" if cfg.is_file() else "the config.yaml saved in the checkpoint's run directory"
    return f"use the config the checkpoint was trained with ({where})"


def _shape(t) -> str:
    return "(" + ", ".join(str(int(d)) for d in t) + ")"


def checkpoint_mismatch(ckpt: str, model) -> str | None:
    """One-line description of how the checkpoint's weights differ from ``model``, or None."""
    try:
        state = load_checkpoint(ckpt)["state_dict"]
    except (ConfigError, KeyError, TypeError):  # refused earlier, or Lightning's own message applies
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


def load_state_dict_message(err: RuntimeError) -> str | None:
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
