"""The TensorBoard logger of ``smk`` runs: Lightning's, remembering the newest value of each scalar.

``latest`` is read by the console's progress lines (``callbacks/console.py``): the monitors
write their scalars (``train/g_acc``, ...) straight to the loggers at the optimizer step,
bypassing ``trainer.callback_metrics``.

It also never writes Lightning's ``epoch`` scalar, which Lightning adds to any step logged
without a ``step`` value (the module logs one, so this is a safety net): the streamed
corpus is one long pass, so that curve would be a flat 0 shown first. ``hp_metric``, the
other placeholder, is off through ``default_hp_metric: false`` in the CLI's defaults.
"""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger (same options); ``latest``: the newest value of each scalar."""

    latest: dict[str, float]

    def log_metrics(self, metrics, step=None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if not hasattr(self, "latest"):
            self.latest = {}
        self.latest.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        super().log_metrics(metrics, step)
