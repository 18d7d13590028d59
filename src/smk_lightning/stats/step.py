"""Statistics of a training step, from what ``MoELayer`` captured in the forward and the
upstream gradient its output hook caught in the one main backward.

With the ghost engine, routed pairs reuse the forward's pre-activations, ‖h‖² and
‖y‖: the only new matmul is g W2ᵀ on the routed pairs. Entries outside the routed set
(dense / probe scope) are computed from scratch by ``ghost_stats``, with no graph.
Other engines recompute everything from the captured input and gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from smk_lightning.model.moe import MoELayer
from smk_lightning.stats.ghost import ghost_stats
from smk_lightning.stats.rules import ghost_mg
from smk_lightning.stats.scopes import routed_mask, scope_mask


@torch.no_grad()
def step_stats(layer: MoELayer, engine: Callable, scope: str, probe_fraction: float | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(M_A, M_G, mask) ``[N, E]`` for the layer's captured step; ``engine`` is an
    ``ENGINES`` entry (ghost gets the capture fast path)."""
    cap = layer.capture
    if cap is None or cap.grad_ND is None:
        raise RuntimeError(
            "no captured forward/backward on this MoE layer: set layer.capture_stats, run the "
            "forward and the backward, then call step_stats"
        )
    routing, E = cap.routing, layer.num_experts
    mask_NE = scope_mask(routing.topi_NK, E, scope, probe_fraction, generator)
    dt = torch.promote_types(cap.ma_P.dtype, cap.grad_ND.dtype)
    M_A = torch.full(mask_NE.shape, float("nan"), dtype=dt, device=mask_NE.device)
    M_G = M_A.clone()
    if engine is not ghost_stats:
        engine(layer, cap.x_ND, cap.grad_ND, mask_NE, M_A, M_G)
        return M_A, M_G, mask_NE

    tok_P = routing.order_P // layer.top_k
    exp_P = routing.topi_NK.reshape(-1)[routing.order_P]
    g_PD = cap.grad_ND.to(dt)[tok_P]
    gh_PF = torch.cat([
        g_nD @ layer.w2[e].detach().to(dt).T for e, g_nD in enumerate(g_PD.split(routing.counts_E))
    ])
    xsq_P = cap.x_ND.to(dt).square().sum(-1)[tok_P]
    u_PF = cap.u_PF.to(dt)
    v_PF = None if cap.v_PF is None else cap.v_PF.to(dt)
    M_A[tok_P, exp_P] = cap.ma_P.to(dt)
    M_G[tok_P, exp_P] = ghost_mg(xsq_P, g_PD.square().sum(-1), gh_PF, u_PF, v_PF, cap.hsq_P.to(dt))
    extra_NE = mask_NE & ~routed_mask(routing.topi_NK, E)
    if extra_NE.any():
        ghost_stats(layer, cap.x_ND, cap.grad_ND, extra_NE, M_A, M_G)
    return M_A, M_G, mask_NE
