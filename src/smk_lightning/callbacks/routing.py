"""RouterMonitor: routing health, smk instruments and expert specialisation in TensorBoard.

Tags (``<layer>`` is ``layer<i>``):
    train/g_acc, train/kl_div, …                       mean over MoE layers of the module's step_state.metrics()
    train/<layer>/g_acc, …/kl_div, …                   per layer (validation: val/<layer>/…)
    routing/<layer>/load                               histogram of per-expert token share
    routing/load_max_share                             largest expert share (1/E is balanced)
    routing/entropy                                    mean per-token router entropy (nats)
    routing/dead_experts                               experts that got no token this step, all layers
    routing/<layer>/domain_nmi                         NMI(chosen expert; token domain)
    val/route_change                                   route stability: share of a fixed validation
                                                       batch's tokens (the first validation's first
                                                       batch) whose top-1 expert changed since the
                                                       previous validation, mean over MoE layers
    stats/<layer>/M_A_mean, stats/<layer>/M_G_mean     means over defined entries
    figures: routing/<layer>/expert_domain, stats/<layer>/M_G_expert_domain

Domain tags and figures need labelled data (the embedded corpus: the datamodule's
``domain_names`` and a ``domain`` key in batches); for user text they are not logged.

With gradient accumulation a callback sees every micro-batch while ``trainer.global_step``
stands still, so counts are accumulated on every micro-batch and scalars and figures are
logged once, on the micro-batch that ended the optimizer step (``pl_module.step_state.boundary``).
Statistics are used only on the micro-batch that computed them (see ``_fresh_stats``); when
a log step has none (``stats.every_n_steps > 1``), the statistics' scalars are logged at the
next step that computes them, under that step's number.

Every tag is written at ``trainer.global_step`` (optimizer steps taken) straight to the
loggers: ``LightningModule.log`` would hold a value until the trainer's next flush and
repeat it at every later flush, so a scalar logged only now and then would reappear stale.
"""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from smk_lightning.callbacks.figures import close, heatmap
from smk_lightning.model.moe import expert_counts


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


def tensorboard(trainer):
    return next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def log_now(trainer, metrics: dict, step: int) -> None:
    """Write scalars (tensors or numbers) to every logger at ``step`` now, with one host sync."""
    if not metrics or not trainer.loggers:
        return
    device = next((v.device for v in metrics.values() if isinstance(v, torch.Tensor)), None)
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                          for v in metrics.values()]).tolist()
    for lg in trainer.loggers:
        lg.log_metrics(dict(zip(metrics, values)), step=step)


class RouterMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int = 10, heatmap_every_n_steps: int = 100) -> None:
        """Routing and smk metrics.

        Args:
            log_every_n_steps: Log scalars every n optimizer steps.
            heatmap_every_n_steps: Log histograms, domain NMI and expert × domain heatmaps every n optimizer
                steps (accumulated over the steps in between).
        """
        self.log_every = log_every_n_steps
        self.heatmap_every = heatmap_every_n_steps
        # on the device until the figures are drawn (no host sync per step)
        self._domain_counts: dict[str, torch.Tensor] = {}  # [E, D] top-1 tokens per expert × domain
        self._mg_sums: dict[str, torch.Tensor] = {}  # [2, E, D] sum of M_G and count of defined entries
        self._load: dict[str, torch.Tensor] = {}  # per-expert routed pairs of the current optimizer step
        self._entropy: list[torch.Tensor] = []  # mean router entropy of its micro-batches
        self._seen: dict[str, torch.Tensor] = {}  # M_A tensor of each layer's last used statistics
        self._stats_due = True  # a log step passed since the statistics' scalars were last logged
        # route stability: the fixed validation batch and its top-1 experts [L, N] at the last validation
        self._route_ids: torch.Tensor | None = None
        self._route_top1: torch.Tensor | None = None

    def state_dict(self) -> dict:
        return {"route_ids": self._route_ids, "route_top1": self._route_top1}

    def load_state_dict(self, state_dict: dict) -> None:
        self._route_ids, self._route_top1 = state_dict.get("route_ids"), state_dict.get("route_top1")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Route stability, once per validation (its first batch; not in the sanity check)."""
        if trainer.sanity_checking or batch_idx != 0 or dataloader_idx != 0 or not pl_module.moe_layers:
            return
        if self._route_ids is None:
            self._route_ids = batch["input_ids"].detach().cpu().clone()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            pl_module.model(self._route_ids.to(pl_module.device))
        top1_LN = torch.stack([layer.last_topi_NK[:, 0] for layer in pl_module.moe_layers.values()]).cpu()
        prev, self._route_top1 = self._route_top1, top1_LN
        if prev is not None and prev.shape == top1_LN.shape:
            log_now(trainer, {"val/route_change": (prev != top1_LN).float().mean()}, trainer.global_step)

    @staticmethod
    def _domain_names(trainer) -> list[str]:
        return list(getattr(trainer.datamodule, "domain_names", None) or [])

    def _fresh_stats(self, pl_module) -> dict:
        """This micro-batch's statistics (``pl_module.step_state``: empty on micro-batches that
        compute none); an entry that is the same object as one used before is stale and is
        skipped."""
        stats = pl_module.step_state.stats
        fresh = {k: v for k, v in stats.items() if self._seen.get(k) is not v[0]}
        self._seen.update({k: v[0] for k, v in stats.items()})
        return fresh

    def on_validation_end(self, trainer, pl_module) -> None:
        self._fresh_stats(pl_module)  # whatever validation left there is not a training step's

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.moe_layers:
            return
        boundary = pl_module.step_state.boundary
        # the optimizer step this micro-batch belongs to (global_step counts it once it is taken)
        step = trainer.global_step if boundary else trainer.global_step + 1
        fresh = self._fresh_stats(pl_module)
        names = self._domain_names(trainer)
        if names and "domain" in batch:
            self._accumulate_domains(pl_module, fresh, len(names), batch["domain"].reshape(-1).clamp_min(0))
        if step % self.log_every == 0 or step % self.heatmap_every == 0:
            self._accumulate_routing(pl_module)
        if not boundary:
            return
        logs = {}
        if step % self.log_every == 0:
            logs.update(self._routing_scalars())
            self._stats_due = True
        if self._stats_due and fresh:
            logs.update(self._stats_scalars(pl_module, fresh))
            self._stats_due = False
        log_now(trainer, logs, step)
        if step % self.heatmap_every == 0:
            self._log_figures(trainer, pl_module, names, step)
        self._load, self._entropy = {}, []

    def _accumulate_domains(self, pl_module, fresh: dict, D: int, domain_N: torch.Tensor) -> None:
        """Top-1 expert × domain counts and M_G sums of this micro-batch, on the device
        (``scatter_add_``/``index_add_``, not ``bincount``, which reads its input on the host on CUDA)."""
        for lname, layer in pl_module.moe_layers.items():
            if layer.last_topi_NK is None:
                continue
            E = layer.num_experts
            top1_N = layer.last_topi_NK[:, 0]
            if len(top1_N) != len(domain_N):
                continue
            dom_N = domain_N.to(top1_N.device)
            counts = torch.zeros(E * D, dtype=torch.long, device=top1_N.device)
            counts.scatter_add_(0, top1_N * D + dom_N, torch.ones_like(top1_N))
            prev = self._domain_counts.get(lname)
            self._domain_counts[lname] = counts.view(E, D) if prev is None else prev + counts.view(E, D)
            if lname in fresh:
                _, M_G, mask = fresh[lname]
                mg = torch.nan_to_num(M_G.float(), nan=0.0)
                idx = (dom_N.unsqueeze(1) + torch.arange(E, device=dom_N.device).unsqueeze(0) * D).reshape(-1)
                both = torch.zeros(2, E * D, dtype=torch.float32, device=mg.device)
                both[0].index_add_(0, idx, mg.reshape(-1))
                both[1].index_add_(0, idx, mask.float().reshape(-1))
                prev = self._mg_sums.get(lname)
                self._mg_sums[lname] = both.view(2, E, D) if prev is None else prev + both.view(2, E, D)

    def _accumulate_routing(self, pl_module) -> None:
        """Expert loads and router entropy of this micro-batch, on the device (no sync)."""
        ents = []
        for lname, layer in pl_module.moe_layers.items():
            if layer.last_topi_NK is None:
                continue
            load_E = expert_counts(layer.last_topi_NK, layer.num_experts)
            self._load[lname] = self._load[lname] + load_E if lname in self._load else load_E
            p = layer.last_probs_NE.float()
            ents.append(-(torch.xlogy(p, p)).sum(-1).mean())
        if ents:
            self._entropy.append(torch.stack(ents).mean())

    def _routing_scalars(self) -> dict:
        if not self._load:
            return {}
        loads_LE = torch.stack([v.float() for v in self._load.values()])
        return {"routing/load_max_share": (loads_LE / loads_LE.sum(1, keepdim=True)).max(),
                "routing/dead_experts": (loads_LE == 0).sum(),
                "routing/entropy": torch.stack(self._entropy).mean()}

    def _stats_scalars(self, pl_module, fresh: dict) -> dict:
        """smk metrics and statistic means of this micro-batch's (fresh) statistics."""
        logs = {}
        per_key: dict[str, list] = defaultdict(list)
        metrics = pl_module.step_state.metrics()
        for lname in pl_module.moe_layers:
            if lname not in fresh:
                continue
            for key, val in metrics.get(lname, {}).items():
                logs[f"train/{lname}/{key}"] = val
                per_key[key].append(val)
            M_A, M_G, mask = fresh[lname]
            logs[f"stats/{lname}/M_A_mean"] = M_A[mask].float().mean()
            logs[f"stats/{lname}/M_G_mean"] = M_G[mask].float().mean()
        for key, vals in per_key.items():
            logs[f"train/{key}"] = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vals]).nanmean()
        return logs

    def _log_figures(self, trainer, pl_module, names: list[str], step: int) -> None:
        exp = tensorboard(trainer)
        for lname, layer in pl_module.moe_layers.items():
            experts = [f"e{i}" for i in range(layer.num_experts)]
            if lname in self._domain_counts:
                counts = self._domain_counts.pop(lname).cpu().numpy()  # host read: every heatmap_every steps
                log_now(trainer, {f"routing/{lname}/domain_nmi": normalized_mutual_info(counts)}, step)
                if exp is not None:
                    share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
                    fig = heatmap(share, experts, names, f"{lname}: share of each domain's tokens per top-1 expert")
                    exp.add_figure(f"routing/{lname}/expert_domain", fig, step)
                    close(fig)
            if exp is not None and lname in self._load:
                load = self._load[lname].float()
                exp.add_histogram(f"routing/{lname}/load", (load / load.sum()).cpu().numpy(), step)
            if lname in self._mg_sums:
                sums, cnts = self._mg_sums.pop(lname).cpu().numpy()
                if exp is not None:
                    mean = np.where(cnts > 0, sums / np.maximum(cnts, 1), np.nan)
                    fig = heatmap(mean, experts, names, f"{lname}: mean M_G per expert × token domain")
                    exp.add_figure(f"stats/{lname}/M_G_expert_domain", fig, step)
                    close(fig)
