"""PeriodicCheckpoint: ``last.ckpt`` at every validation and every few minutes, written atomically.

The streamed corpus is one long epoch, and Lightning's ``ModelCheckpoint(save_top_k=0,
save_last=True)`` writes ``last.ckpt`` only when training ends: a SIGKILL (OOM killer,
pre-empted node) lost the whole run. Lightning 2.6 also ignores ``train_time_interval``
under manual optimisation (its manual path looks at ``every_n_train_steps`` only), and
it refuses ``every_n_train_steps`` together with ``train_time_interval``. So this subclass
saves ``last.ckpt`` itself:

- after every validation during ``fit``;
- at an optimizer-step boundary once ``train_time_interval`` has passed since the last
  write (default 10 minutes), and every ``every_n_train_steps`` optimizer steps if set;
- when training ends or stops (Ctrl-C, ``should_stop``), and on an exception
  (``save_on_exception``), as Lightning does.

Top-k checkpoints (``monitor`` + ``save_top_k``) are Lightning's, at every validation.

Writes go through :class:`AtomicCheckpointIO`: a temporary file in the checkpoint's own
directory, fsync, then ``os.replace``. Lightning's own ``_atomic_save`` stages the file
in the system temp directory and *moves* it, which is a plain copy onto ``last.ckpt``
when the two are on different filesystems, so a kill mid-copy could truncate it.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from smk_lightning.errors import ConfigError

_TMP_SUFFIX = ".tmp"


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (full disk, read-only directory); the message says
    whether the previous file is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.<pid>.tmp`` next to the target, fsync, ``os.replace``: the
    target is the old file or the complete new one, never a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:  # a full disk, a read-only or vanished directory: one line, not a traceback
            tmp.unlink(missing_ok=True)
            kept = (f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written")
            raise CheckpointWriteError(f"could not write the checkpoint {path}: {e.strerror or e}; {kept} — free space "
                              "or fix the directory, then resume with --ckpt_path last") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def remove_stale_temporaries(dirpath: str | os.PathLike) -> None:
    """Delete ``.*.ckpt.<pid>.tmp`` left by a process killed mid-write."""
    for p in Path(dirpath).glob(f".*.ckpt.*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()


class PeriodicCheckpoint(ModelCheckpoint):
    def __init__(self, train_time_interval: timedelta | None = timedelta(minutes=10),
                 every_n_train_steps: int | None = None, **kwargs) -> None:
        """Lightning's ModelCheckpoint, plus ``last.ckpt`` at every validation and periodically.

        Args:
            train_time_interval: Also write last.ckpt at the first optimizer-step boundary after
                this much time since the last write (None: only at validations and at the end).
            every_n_train_steps: Also write last.ckpt every n optimizer steps (None or 0: off).
        """
        super().__init__(**kwargs)
        # The triggers are ours (see the module docstring); Lightning's stay at "every validation".
        self._train_time_interval = train_time_interval
        self._every_n_train_steps = every_n_train_steps or 0
        self._saved_in_validation = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, CheckpointWriteError):
            return  # the same disk would refuse the exception-time checkpoint too, and its error would hide this one
        super().on_exception(trainer, pl_module, exception)

    @property
    def state_key(self) -> str:
        # Without the triggers, so changing the interval on resume keeps the restored state
        # (last_model_path: otherwise Lightning writes last-v1.ckpt beside last.ckpt).
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave custom IO plugins alone
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and self.dirpath and _is_local_file_protocol(self.dirpath):
            if trainer.is_global_zero:
                remove_stale_temporaries(self.dirpath)
            if self.save_last and not self.last_model_path:
                # resuming into the same run directory overwrites its last.ckpt (not last-v1.ckpt)
                self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Replaces Lightning's hook (whose manual-optimisation path ignores the time interval).
        if not pl_module.step_state.boundary or self._should_skip_saving_checkpoint(trainer):
            return
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if self._train_time_interval is not None:
            elapsed = time.monotonic() - (self._last_time_checked or time.monotonic())
            # rank 0 decides, so that every rank enters the save (a collective) together
            due = trainer.strategy.broadcast(due or elapsed >= self._train_time_interval.total_seconds())
        if due:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)  # top-k, when monitoring
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if not trainer.sanity_checking:
            self._saved_in_validation = self._last_global_step_saved == trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        # Lightning writes last.ckpt at the end only if nothing was ever written; after periodic
        # writes the final state must still be saved. Written again when the final validation
        # saved this step: that file's loop counters predate the last batch's bookkeeping, and
        # Lightning would resume its batch counter one short (it gates log_every_n_steps and is
        # the logger's default step).
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.fast_dev_run
        stale = self._last_global_step_saved != trainer.global_step or self._saved_in_validation
        if self.save_last and fitting and trainer.global_step > 0 and stale:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_time_checked = time.monotonic()  # the interval counts from the last write
        self._saved_in_validation = False
