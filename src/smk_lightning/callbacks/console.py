"""What ``smk fit`` prints while it trains.

- :class:`StepProgressBar` (stdout is a terminal): Lightning's rich bar counting optimizer
  steps to ``trainer.max_steps``. The stock bar counts batches of the current pass over
  the streamed data and reads ``Epoch 1/-2 … 270/1087`` (no max_epochs, a pass that is not
  the run) with ``v_num: 0.000``.
- :class:`ProgressLines` (no bar: stdout piped to a file or ``tee``, or the bar disabled):
  one plain line every n steps, which a log file keeps readable::

      step 120/1200 | loss 2.345 | val loss 2.301 | g_acc_dense 0.31 (chance 0.12) | 7650 tok/s | ETA 5m12s

  ``g_acc_dense`` is the accuracy the README, ``smk-report`` and its plot read: the router's
  top expert against ΔSC's on rows where every expert is defined (chance 1/E).

- :class:`ParamSummary`: one line instead of Lightning's model table, whose FLOPs column
  and ``Total FLOPs: 0`` are always 0 here (Lightning counts FLOPs only for modules with an
  ``example_input_array``) and whose rows are just the model and a metric.

Both progress displays act at optimizer-step boundaries only (``pl_module.step_state.boundary``,
False on the micro-batches inside a gradient-accumulation step).
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count

# progress-bar / progress-line names of the logged metrics
_SHORT = {"train/loss": "loss", "train/smk_loss": "smk_loss", "val/loss": "val loss",
          "train/g_acc_dense": "g_acc_dense", "throughput/tokens_per_s": "tok/s"}


def _value(trainer, key: str) -> float | None:
    """The newest value of a metric: from ``self.log`` (callback_metrics), else the newest one
    written to a logger that keeps it (``smk_lightning.cli.logger.TensorBoardLogger.latest``;
    some monitors write straight to the loggers)."""
    v = trainer.callback_metrics.get(key)
    if v is None:
        # (isinstance: fast_dev_run's DummyLogger answers any attribute with a no-op function)
        v = next((lg.latest[key] for lg in trainer.loggers
                  if isinstance(getattr(lg, "latest", None), dict) and key in lg.latest), None)
    return None if v is None else float(v)


def format_duration(seconds: float) -> str:
    """``12s``, ``5m12s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StepProgressBar(RichProgressBar):
    """Rich progress bar over optimizer steps: ``step ━━━━ 270/1200 0:00:41 • 0:02:30 6.5it/s loss: …``."""

    @property
    def total_train_batches(self):
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"  # padded like Lightning's, against flicker

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # One bar for the whole run: a new pass over the data must not reset it.
        if self.train_progress_bar_id is None:
            super().on_train_epoch_start(trainer, pl_module)
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.step_state.boundary:
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the run directory's number, shown as a float
        out = {}
        for k, v in items.items():
            name = _SHORT.get(k, k)
            out[name] = f"{v:.0f}" if name == "tok/s" and isinstance(v, float) else v
        return out


class ProgressLines(L.Callback):
    def __init__(self, every_n_steps: int | None = None) -> None:
        """Plain progress lines on stdout when no progress bar is shown (stdout is not a terminal).

        Args:
            every_n_steps: Print a line every n optimizer steps and after each validation
                (None: trainer.log_every_n_steps; 0: never).
        """
        self.every_n_steps = every_n_steps
        self._active = False
        self._t0 = 0.0
        self._step0 = 0
        self._last = -1
        self._n = 0
        self._chance = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        # trainer.log_every_n_steps counts micro-batches under accumulation (see cli_trainer_options)
        accum = pl_module.optim_cfg.accumulate_grad_batches
        n = trainer.log_every_n_steps // accum if self.every_n_steps is None else self.every_n_steps
        self._n = n
        self._chance = 1 / pl_module.model_cfg.num_experts  # of g_acc_dense
        self._active = bool(n) and trainer.progress_bar_callback is None and trainer.is_global_zero
        self._t0, self._step0, self._last = time.monotonic(), trainer.global_step, trainer.global_step

    def _head(self, trainer) -> str:
        total = trainer.max_steps
        return f"step {trainer.global_step}/{total}" if total and total > 0 else f"step {trainer.global_step}"

    def _eta(self, trainer) -> str | None:
        done, total = trainer.global_step - self._step0, trainer.max_steps
        elapsed = time.monotonic() - self._t0
        if not total or total <= 0 or done <= 0 or elapsed <= 0:
            return None
        return format_duration((total - trainer.global_step) * elapsed / done)

    def _fields(self, trainer, formats: dict[str, str]) -> list[str]:
        values = {key: _value(trainer, key) for key in formats}
        return [self._head(trainer)] + [fmt.format(v) for key, fmt in formats.items()
                                        if (v := values[key]) is not None]

    def line(self, trainer) -> str:
        """``step 120/1200 | loss 2.345 | val loss 2.301 | g_acc_dense 0.31 (chance 0.12) | 7650 tok/s | ETA 5m12s``"""
        acc = f"g_acc_dense {{:.2f}} (chance {self._chance:.2f})"
        parts = self._fields(trainer, {"train/loss": "loss {:.3f}", "val/loss": "val loss {:.3f}",
                                       "train/g_acc_dense": acc, "throughput/tokens_per_s": "{:.0f} tok/s"})
        eta = self._eta(trainer)
        return " | ".join(parts + ([f"ETA {eta}"] if eta is not None else []))

    def val_line(self, trainer) -> str:
        """``step 200/1200 | val loss 2.290 | val ppl 9.87 | val g_acc_dense 0.33 (chance 0.12) | val kl_div 0.344``"""
        acc = f"val g_acc_dense {{:.2f}} (chance {self._chance:.2f})"
        return " | ".join(self._fields(trainer, {"val/loss": "val loss {:.3f}", "val/ppl": "val ppl {:.2f}",
                                                 "val/g_acc_dense": acc, "val/kl_div": "val kl_div {:.3f}"}))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._active or not pl_module.step_state.boundary or step == self._last:
            return
        final = trainer.max_steps > 0 and step >= trainer.max_steps
        if step % self._n == 0 or final:
            self._last = step
            print(self.line(trainer), flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._active and not trainer.sanity_checking and trainer.state.fn == "fit":
            print(self.val_line(trainer), flush=True)


class ParamSummary(ModelSummary):
    """``model: 61.9 K parameters (61.9 K trainable), 0.25 MB`` instead of the FLOPs-less table."""

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  *args, **kwargs) -> None:
        rank_zero_info(f"model: {get_human_readable_count(total_parameters).strip()} parameters "
                       f"({get_human_readable_count(trainable_parameters).strip()} trainable), {model_size:.2f} MB")
