"""The router's side of a training step, as plain functions of the MoE layers' captures:
which balance terms join the main loss, the statistics → ΔSC targets → smk_loss after the
main backward, and smk_loss's gradient on the routers alone.

Shape legend: L MoE layers, N tokens, E experts, K = top_k.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from smk_lightning.losses import SMKTargets, router_z_loss, smk_loss, smk_targets, switch_aux_loss
from smk_lightning.model.moe import MoELayer
from smk_lightning.stats import StatsCapture
from smk_lightning.stats.engines import Engine
from smk_lightning.training.config import RouterConfig, StatsConfig
from smk_lightning.training.distributed import all_reduce_sum, world_size
from smk_lightning.training.state import LayerTargets


def uses_auxfree(rcfg: RouterConfig) -> bool:
    """Aux-loss-free bias balancing: the router loss itself, or smk's balance term."""
    return rcfg.loss == "auxfree" or (rcfg.loss == "smk" and rcfg.balance == "auxfree")


def aux_weight(rcfg: RouterConfig) -> float:
    """Weight of the Switch aux loss in the total: the router loss itself for loss=switch,
    the balance term for loss=smk with balance=switch, else 0."""
    if rcfg.loss == "switch":
        return rcfg.weight
    return rcfg.balance_weight if rcfg.loss == "smk" and rcfg.balance == "switch" else 0.0


def router_aux_losses(layers: list[MoELayer], rcfg: RouterConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """(Switch aux loss, z-loss), averaged over the MoE layers, from their last forward;
    a term whose weight is 0 is 0. The aux loss is over the global batch (``switch_aux_loss``)."""
    aux = z = torch.zeros((), device=device)
    if not layers:
        return aux, z
    for layer in layers:
        if aux_weight(rcfg) > 0:
            aux = aux + switch_aux_loss(layer.last_probs_NE, layer.last_topi_NK, all_reduce_sum, world_size())
        if rcfg.z_loss_weight > 0:
            z = z + router_z_loss(layer.last_logits_NE)
    return aux / len(layers), z / len(layers)


def stats_and_targets(capture: StatsCapture, layers: dict[str, MoELayer], engine: Engine, scfg: StatsConfig,
                      rcfg: RouterConfig, probe_generator: Callable[[int], torch.Generator],
                      device: torch.device, compiled: bool = False) -> tuple[dict, dict[str, LayerTargets], Tensor | None]:
    """After a backward: the statistics, ΔSC targets, and smk_loss averaged over the MoE
    layers (None unless ``router.loss=smk``), all with autocast off. The targets and the loss
    run once on the layers' statistics stacked to ``[L, N, E]`` (each layer keeps its own
    moments): a few kernels per step instead of a few per layer. ``compiled``: the
    statistics (``engine.compiled()``) and ``targets_and_loss`` under ``torch.compile``."""
    if compiled:
        engine = engine.compiled()
    stats = capture.stats(engine, scfg.scope, scfg.probe_fraction, probe_generator)
    if not stats:  # no MoE layer
        return stats, {}, None
    names, moe = list(stats), [layers[name] for name in stats]
    M_A_LNE, M_G_LNE, mask_LNE = (torch.stack(ts) for ts in zip(*stats.values()))
    fn = _compiled_targets_and_loss() if compiled else targets_and_loss
    t, logits_LNE, smk = fn(M_A_LNE, M_G_LNE, mask_LNE, [layer.capture.x_ND for layer in moe],
                            [layer.router for layer in moe], rcfg, device.type)
    targets = {name: LayerTargets(logits_LNE[i].detach(), t[i], layer.top_k, layer.capture.routing.topi_NK)
               for i, (name, layer) in enumerate(zip(names, moe))}
    return stats, targets, smk


def targets_and_loss(M_A_LNE: Tensor, M_G_LNE: Tensor, mask_LNE: Tensor, x_ND: list[Tensor],
                     routers: list[torch.nn.Module], rcfg: RouterConfig, device_type: str
                     ) -> tuple[SMKTargets, Tensor, Tensor | None]:
    """(ΔSC targets, router logits ``[L, N, E]``, smk_loss or None) of L layers' statistics,
    with autocast off (the statistics' float32+). The logits are recomputed from each layer's
    detached input ``x_ND[l]``: smk_loss reaches the routers only, never the experts or the
    layers below. Global moments and row counts are summed over ranks."""
    with torch.autocast(device_type, enabled=False):
        t = smk_targets(M_A_LNE, M_G_LNE, mask_LNE, rcfg.delta_sc, rcfg.tau, rcfg.target,
                        rcfg.sinkhorn_iters, all_reduce_sum)
        logits_LNE = torch.stack([router(x.to(router.weight.dtype)) for router, x in zip(routers, x_ND)])
        smk = smk_loss(logits_LNE, t, rcfg.target, all_reduce_sum).mean() if rcfg.loss == "smk" else None
    return t, logits_LNE, smk


@cache
def _compiled_targets_and_loss() -> Callable:
    # Not fullgraph: under DDP the global moments' all_reduce may break the graph there.
    return torch.compile(targets_and_loss, dynamic=False)


def router_backward(loss: Tensor, params: list[Tensor]) -> None:
    """Add ∂loss/∂router to the routers' ``.grad`` without a DDP backward (the routers are
    kept out of DDP's reducer; their gradients are averaged over ranks by hand)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
