"""The TensorBoard logger of ``smk`` runs: Lightning's, remembering the newest value of each scalar.

``latest`` is read by the console's progress lines (``callbacks/console.py``): the monitors
write their scalars (``train/g_acc``, ...) straight to the loggers at the optimizer step,
bypassing ``trainer.callback_metrics``.

It writes a Custom Scalars layout once (``LAYOUT``: TensorBoard's CUSTOM SCALARS tab), which
opens on what a run is read by — loss, the headline accuracy g_acc_dense, the router's
distance to its targets — with train and validation on one chart, then routing and system;
the SCALARS tab sorts sections by name and would open on ``memory``.

It also never writes Lightning's ``epoch`` scalar, which Lightning adds to any step logged
without a ``step`` value (the module logs one, so this is a safety net): the streamed
corpus is one long pass, so that curve would be a flat 0 shown first. ``hp_metric``, the
other placeholder, is off through ``default_hp_metric: false`` in the CLI's defaults.
"""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger


def _chart(*tags: str) -> list:
    return ["Multiline", [f"^{t}$" for t in tags]]


LAYOUT = {
    "1 loss and accuracy": {
        "loss (train, val)": _chart("train/loss", "val/loss"),
        "g_acc_dense: router top-1 = ΔSC top-1 on fully defined rows (chance 1/E)": _chart("train/g_acc_dense",
                                                                                         "val/g_acc_dense"),
        "kl_div to the ΔSC target": _chart("train/kl_div", "val/kl_div"),
        "router losses": _chart("train/smk_loss", "train/aux_loss", "train/z_loss"),
    },
    "2 routing": {
        "busiest expert's share of the routed pairs": _chart("routing/load_max_share"),
        "router entropy (uniform: log E)": _chart("routing/entropy"),
        "dead experts": _chart("routing/dead_experts"),
        "target–router agreement": _chart("train/agreement", "val/agreement"),
        "route change since the last validation": _chart("val/route_change"),
    },
    "3 system": {
        "tokens/s": _chart("throughput/tokens_per_s"),
        "peak memory (MB)": _chart("memory/peak_mb"),
        "learning rate": _chart("train/lr"),
    },
}


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger (same options); ``latest``: the newest value of each scalar."""

    latest: dict[str, float]

    def log_metrics(self, metrics, step=None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if not hasattr(self, "latest"):
            self.latest = {}
            self.experiment.add_custom_scalars(LAYOUT)  # once per process, with the first values
        self.latest.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        super().log_metrics(metrics, step)
