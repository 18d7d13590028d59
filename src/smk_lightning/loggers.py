"""The TensorBoard logger of ``smk`` runs: Lightning's, without the ``epoch`` scalar.

Lightning adds ``epoch`` to every logged step; the streamed corpus is one long pass, so
that curve is a flat 0 and TensorBoard shows it first. (``hp_metric``, the other
placeholder, is off through ``default_hp_metric: false`` in the CLI's defaults.)

``latest`` keeps the newest value of each scalar written, for the console's progress
lines: some monitors write straight to the loggers, bypassing ``trainer.callback_metrics``.
"""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger (same options) that does not log ``epoch``."""

    latest: dict[str, float]

    def log_metrics(self, metrics, step=None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if not hasattr(self, "latest"):
            self.latest = {}
        self.latest.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        super().log_metrics(metrics, step)
