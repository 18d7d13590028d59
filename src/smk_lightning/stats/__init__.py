"""Exact per-token, per-expert statistics M_A and M_G (docs/design.md).

``expert_token_stats`` is the public entry point; ``ENGINES`` is the registry of
engines (``stats/engines.py``), each filling the masked entries of M_A, M_G.
``step_stats`` computes the statistics of a training step from what the layer captured.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smk_lightning.model.moe import MoELayer, route
from smk_lightning.model.precision import acc_dtype
from smk_lightning.stats.capture import StatsCapture, probe_generator
from smk_lightning.stats.engines import ENGINES, Engine, get_engine
from smk_lightning.stats.scopes import SCOPES, check_scope, scope_mask
from smk_lightning.stats.step import step_stats


def expert_token_stats(layer: MoELayer, x: Tensor, grad_out: Tensor, engine: str = "ghost",
                       scope: str = "routed", probe_fraction: float | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """M_A, M_G ``[N, E]`` of ``layer`` for input ``x`` and upstream gradient ``grad_out``
    (both ``[N, D]`` or ``[..., D]``); NaN where the scope leaves an entry undefined.

    Parameters and their ``.grad`` are not changed.
    """
    with torch.autocast(x.device.type, enabled=False):  # docs/design.md: float32 or wider
        return _expert_token_stats(layer, x, grad_out, get_engine(engine), scope, probe_fraction, generator)


def _expert_token_stats(layer, x, grad_out, fn, scope, probe_fraction, generator):
    check_scope(scope, probe_fraction)
    x_ND = x.detach().reshape(-1, layer.d_model)
    g_ND = grad_out.detach().reshape(-1, layer.d_model)
    if x_ND.shape != g_ND.shape:
        raise ValueError(f"x {tuple(x.shape)} and grad_out {tuple(grad_out.shape)} must have the same shape")
    with torch.no_grad():
        _, _, topi_NK = route(layer.router_logits(x_ND), layer.top_k, layer.renormalize, layer.score_bias_E)
    mask_NE = scope_mask(topi_NK, layer.num_experts, scope, probe_fraction, generator)
    dt = acc_dtype(x_ND, g_ND, layer.w1)  # norms accumulate in float32 at least
    M_A = torch.full(mask_NE.shape, float("nan"), dtype=dt, device=x_ND.device)
    M_G = M_A.clone()
    fn(layer, x_ND, g_ND, mask_NE, M_A, M_G)
    return M_A, M_G


__all__ = ["ENGINES", "SCOPES", "Engine", "StatsCapture", "expert_token_stats", "get_engine", "probe_generator",
           "step_stats"]
