"""Statistics of a training step, from what ``MoELayer`` captured in the forward and the
upstream gradient its output hook caught in the one main backward.

With the ghost engine, routed pairs need no new matmul: the forward kept ‖y‖ and ‖h‖²,
and hooks kept the row norms of the backward's own gradients of y, u and v (see
``smk_lightning.model.moe.Capture``). Entries outside the routed set
(dense / probe scope) are computed from scratch, with no graph, for all experts of the
dense or probe rows at once (``ghost_dense_rows``: batched matmuls over [E, rows, ·]; the
probe rows are a fixed count round(ρN), so every shape is static).
Other engines recompute everything from the captured input and gradient.

Host syncs: one, ``lost_P.any()`` in routed/probe scope (see ``_step_stats``); the probe
rows are drawn on the CPU and copied to the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from smk_lightning.model.moe import MoELayer
from smk_lightning.model.precision import acc_dtype
from smk_lightning.stats.ghost import ghost_dense_rows, ghost_pairs, ghost_stats
from smk_lightning.stats.scopes import probe_index, scope_mask


@torch.no_grad()
def step_stats(layer: MoELayer, engine: Callable, scope: str, probe_fraction: float | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(M_A, M_G, mask) ``[N, E]`` for the layer's captured step; ``engine`` is an
    ``ENGINES`` entry (ghost gets the capture fast path)."""
    cap = layer.capture
    if cap is None or cap.missing_hooks():
        raise RuntimeError(
            "no complete captured forward/backward on this MoE layer "
            f"({'no capture' if cap is None else 'hooks that did not fire: ' + ', '.join(cap.missing_hooks())}): "
            "set layer.capture_stats, run the forward and a backward that reaches every expert weight, "
            "then call step_stats"
        )
    with torch.autocast(cap.x_ND.device.type, enabled=False):  # docs/design.md: float32 or wider
        return _step_stats(layer, cap, engine, scope, probe_fraction, generator)


def _step_stats(layer: MoELayer, cap, engine: Callable, scope: str, probe_fraction: float | None,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    routing, E = cap.routing, layer.num_experts
    N = routing.topi_NK.shape[0]
    rows_R = probe_index(N, probe_fraction, generator, cap.x_ND.device) if scope == "probe" else None
    mask_NE = scope_mask(routing.topi_NK, E, scope, probe_fraction, generator, rows_R=rows_R)
    dt = acc_dtype(cap.ma_P, cap.grad_ND)  # float32+ (grad_ND is bf16 under autocast)
    M_A = torch.full(mask_NE.shape, float("nan"), dtype=dt, device=mask_NE.device)
    M_G = M_A.clone()
    g_ND = cap.grad_ND.to(dt) * cap.grad_scale  # ∂L_sum/∂o (docs/design.md)
    if engine is not ghost_stats:
        engine(layer, cap.x_ND, g_ND, mask_NE, M_A, M_G)
        return M_A, M_G, mask_NE

    # Dense or probe rows first, every expert at once (their routed entries are then
    # overwritten by the captured values below; routed scope has no such rows).
    if scope == "dense":
        M_A[:], M_G[:] = ghost_dense_rows(layer, cap.x_ND, g_ND, dt)
    elif scope == "probe":
        M_A[rows_R], M_G[rows_R] = ghost_dense_rows(layer, cap.x_ND[rows_R], g_ND[rows_R], dt)

    # Routed pairs: every factor of the closed form came out of the forward and the
    # normal backward (see ``Capture``); the backward's gradients carry the pair's combine
    # weight w, which is divided out here.
    tok_P = routing.order_P // layer.top_k
    exp_P = routing.topi_NK.reshape(-1)[routing.order_P]
    w_P = cap.weights_NK.reshape(-1)[routing.order_P].to(dt)
    xsq_P = cap.x_ND.to(dt).square().sum(-1)[tok_P]
    inner_P = cap.gysq_P.to(dt) * cap.hsq_P.to(dt) + (cap.gusq_P.to(dt) + cap.gvsq_P.to(dt)) * xsq_P
    mg_P = inner_P.sqrt() * (cap.grad_scale / w_P)
    # A pair whose weight is (nearly) zero got (nearly) no gradient: its M_G is recomputed exactly.
    lost_P = w_P < torch.finfo(dt).tiny ** 0.5
    if scope == "dense":  # already recomputed above: keep that value, no sync
        mg_P = torch.where(lost_P, M_G[tok_P, exp_P], mg_P)
    M_A[tok_P, exp_P] = cap.ma_P.to(dt)
    M_G[tok_P, exp_P] = mg_P
    # HOST SYNC (routed/probe scope): lost pairs are rare, and recomputing all P pairs
    # to avoid reading this flag would cost as much as the forward's experts.
    if scope != "dense" and bool(lost_P.any()):
        tok_Q, exp_Q = tok_P[lost_P], exp_P[lost_P]
        M_A[tok_Q, exp_Q], M_G[tok_Q, exp_Q] = ghost_pairs(layer, cap.x_ND, g_ND, tok_Q, exp_Q, dt)
    return M_A, M_G, mask_NE
