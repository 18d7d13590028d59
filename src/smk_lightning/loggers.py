"""The TensorBoard logger of ``smk`` runs: Lightning's, without the ``epoch`` scalar.

Lightning adds ``epoch`` to every logged step; the streamed corpus is one long pass, so
that curve is a flat 0 and TensorBoard shows it first. (``hp_metric``, the other
placeholder, is off through ``default_hp_metric: false`` in the CLI's defaults.)
"""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger (same options) that does not log ``epoch``."""

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)
