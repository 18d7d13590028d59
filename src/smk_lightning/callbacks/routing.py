"""RouterMonitor: routing health, smk instruments and expert specialisation in TensorBoard.

Tags (``<layer>`` is ``layer<i>``):
    train/g_acc, train/kl_div, train/topk_overlap      mean over MoE layers
    routing/<layer>/g_acc, …/kl_div, …/topk_overlap   per layer
    routing/<layer>/load                               histogram of per-expert token share
    routing/load_max_share                             largest expert share (1/E is balanced)
    routing/entropy                                    mean per-token router entropy (nats)
    routing/dead_experts                               experts that got no token this step, all layers
    routing/<layer>/domain_nmi                         NMI(chosen expert; token domain)
    stats/<layer>/M_A_mean, stats/<layer>/M_G_mean     means over defined entries
    figures: routing/<layer>/expert_domain, stats/<layer>/M_G_expert_domain
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from smk_lightning.callbacks.figures import close, heatmap


def normalized_mutual_info(counts_XY: np.ndarray) -> float:
    """NMI with arithmetic-mean normalisation, 2·I(X;Y) / (H(X)+H(Y)); 0 when either is constant."""
    total = counts_XY.sum()
    if total == 0:
        return float("nan")
    p = counts_XY / total
    px, py = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(px, py)[nz])).sum())
    hx = float(-(px[px > 0] * np.log(px[px > 0])).sum())
    hy = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    return 0.0 if hx + hy == 0 else 2 * mi / (hx + hy)


class RouterMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int = 10, heatmap_every_n_steps: int = 100) -> None:
        """Routing and smk metrics.

        Args:
            log_every_n_steps: Log scalars every n training steps.
            heatmap_every_n_steps: Log histograms, domain NMI and expert × domain heatmaps every n steps
                (accumulated over the steps in between).
        """
        self.log_every = log_every_n_steps
        self.heatmap_every = heatmap_every_n_steps
        self._domain_counts: dict[str, np.ndarray] = {}
        self._mg_sums: dict[str, np.ndarray] = {}

    @staticmethod
    def _domain_names(trainer) -> list[str]:
        dm = trainer.datamodule
        return list(getattr(dm, "domain_names", None) or ["text"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        layers = pl_module.moe_layers
        if not layers:
            return
        names = self._domain_names(trainer)
        domain_N = batch["domain"].reshape(-1).clamp_min(0).cpu() if "domain" in batch else None
        self._accumulate(pl_module, names, domain_N)
        if step % self.log_every == 0:
            self._log_scalars(pl_module)
        if step % self.heatmap_every == 0:
            self._log_figures(trainer, pl_module, names)

    def _accumulate(self, pl_module, names: list[str], domain_N) -> None:
        for lname, layer in pl_module.moe_layers.items():
            if layer.last_topi_NK is None or domain_N is None:
                continue
            E, D = layer.num_experts, len(names)
            top1_N = layer.last_topi_NK[:, 0].cpu()
            if len(top1_N) != len(domain_N):
                continue
            counts = torch.bincount(top1_N * D + domain_N, minlength=E * D).view(E, D).numpy()
            self._domain_counts[lname] = self._domain_counts.get(lname, 0) + counts
            if lname in pl_module.step_stats:
                M_A, M_G, mask = pl_module.step_stats[lname]
                mg = torch.nan_to_num(M_G.float(), nan=0.0).cpu()
                defined = mask.float().cpu()
                idx = domain_N.unsqueeze(1) + torch.arange(E).unsqueeze(0) * D  # [N, E] → flat E×D
                sums = torch.zeros(E * D).index_add_(0, idx.reshape(-1), mg.reshape(-1)).view(E, D)
                cnts = torch.zeros(E * D).index_add_(0, idx.reshape(-1), defined.reshape(-1)).view(E, D)
                prev = self._mg_sums.get(lname, np.zeros((2, E, D)))
                self._mg_sums[lname] = prev + np.stack([sums.numpy(), cnts.numpy()])

    def _log_scalars(self, pl_module) -> None:
        loads, ents, dead = [], [], 0
        per_layer: dict[str, list] = {"g_acc": [], "kl_div": [], "topk_overlap": []}
        logs = {}
        step_metrics = pl_module.step_metrics()
        for lname, layer in pl_module.moe_layers.items():
            if layer.last_topi_NK is None:
                continue
            E = layer.num_experts
            load_E = torch.bincount(layer.last_topi_NK.reshape(-1), minlength=E).float()
            share_E = load_E / load_E.sum()
            loads.append(share_E.max())
            dead += int((load_E == 0).sum())
            p = layer.last_probs_NE.float()
            ents.append(-(torch.xlogy(p, p)).sum(-1).mean())
            for key, val in step_metrics.get(lname, {}).items():
                logs[f"routing/{lname}/{key}"] = val
                per_layer[key].append(val)
            if lname in pl_module.step_stats:
                M_A, M_G, mask = pl_module.step_stats[lname]
                logs[f"stats/{lname}/M_A_mean"] = M_A[mask].float().mean()
                logs[f"stats/{lname}/M_G_mean"] = M_G[mask].float().mean()
        if loads:
            logs["routing/load_max_share"] = torch.stack(loads).max()
            logs["routing/entropy"] = torch.stack(ents).mean()
            logs["routing/dead_experts"] = float(dead)
        for key, vals in per_layer.items():
            if vals:
                logs[f"train/{key}"] = torch.stack(vals).nanmean()
        pl_module.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in logs.items()},
                           on_step=True, on_epoch=False)

    def _log_figures(self, trainer, pl_module, names: list[str]) -> None:
        exp = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        step = trainer.global_step
        for lname, layer in pl_module.moe_layers.items():
            experts = [f"e{i}" for i in range(layer.num_experts)]
            if lname in self._domain_counts:
                counts = self._domain_counts.pop(lname)
                pl_module.log(f"routing/{lname}/domain_nmi", normalized_mutual_info(counts))
                if exp is not None:
                    share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
                    fig = heatmap(share, experts, names, f"{lname}: share of each domain's tokens per top-1 expert")
                    exp.add_figure(f"routing/{lname}/expert_domain", fig, step)
                    close(fig)
            if exp is not None and layer.last_topi_NK is not None:
                load = torch.bincount(layer.last_topi_NK.reshape(-1), minlength=layer.num_experts).float()
                exp.add_histogram(f"routing/{lname}/load", (load / load.sum()).cpu().numpy(), step)
            if lname in self._mg_sums:
                sums, cnts = self._mg_sums.pop(lname)
                if exp is not None:
                    mean = np.where(cnts > 0, sums / np.maximum(cnts, 1), np.nan)
                    fig = heatmap(mean, experts, names, f"{lname}: mean M_G per expert × token domain")
                    exp.add_figure(f"stats/{lname}/M_G_expert_domain", fig, step)
                    close(fig)
