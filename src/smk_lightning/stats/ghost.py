"""Ghost engine: closed-form M_A, M_G (``rules.ghost_rows``), batched over experts.

No autograd graph and no per-token gradient. Two batching schemes, neither loops over
experts in Python:

- ``ghost_dense_rows``: every expert on a set of rows, as wide GEMMs over all experts and
  one batched matmul over ``[E, rows, ·]`` (``rules.ghost_rows_all_experts``; rows in
  fixed-size chunks, so the intermediates stay bounded and the shapes depend only on the
  row count);
- ``ghost_pairs``: arbitrary (token, expert) pairs, sorted by expert and multiplied like the
  layer's own forward (``ExpertGroups``: grouped GEMMs, or one matmul per expert in float64).

``ghost_stats`` (the ``ENGINES`` entry, any mask) uses the first for rows whose every
expert is wanted and the second for the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smk_lightning.model.moe import ExpertGroups, MoELayer, resolve_expert_impl
from smk_lightning.stats.rules import ghost_rows, ghost_rows_all_experts

# Elements of one [rows, E, F] intermediate of ghost_dense_rows, by device type (about five
# are alive at once); rows are processed in chunks of DENSE_CHUNK_ELEMENTS // (E·F).
# CPU: 4 MB in float32, so a chunk's elementwise work stays in cache (measured, 1 thread,
# N=2048, E=8, F=256: 2^20 vs 2^24 elements → 96 vs 153 ms dense, 24 vs 29 ms probe 0.25);
# elsewhere (GPU): 64 MB, a few large kernels with bounded memory.
DENSE_CHUNK_ELEMENTS = {"cpu": 1 << 20, "default": 1 << 24}


def _weights(layer: MoELayer, dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    w1, w2, w3 = layer.w1, layer.w2, layer.w3
    return w1.detach().to(dt), w2.detach().to(dt), None if w3 is None else w3.detach().to(dt)


@torch.no_grad()
def ghost_dense_rows(layer: MoELayer, x_RD: Tensor, g_RD: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) ``[R, E]`` of every expert on every given row, in dtype ``dt``."""
    w1_EDF, w2_EFD, w3_EDF = _weights(layer, dt)
    x_RD, g_RD = x_RD.to(dt), g_RD.to(dt)
    budget = DENSE_CHUNK_ELEMENTS.get(x_RD.device.type, DENSE_CHUNK_ELEMENTS["default"])
    chunk = max(1, budget // (layer.num_experts * layer.d_ff))
    parts = [ghost_rows_all_experts(x, g, w1_EDF, w2_EFD, w3_EDF)
             for x, g in zip(x_RD.split(chunk), g_RD.split(chunk))]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([ma for ma, _ in parts]), torch.cat([mg for _, mg in parts])


@torch.no_grad()
def ghost_pairs(layer: MoELayer, x_ND: Tensor, g_ND: Tensor, tok_Q: Tensor, exp_Q: Tensor,
                dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) ``[Q]`` of the pairs (token tok_Q[q], expert exp_Q[q]), in dtype ``dt``."""
    order_Q = exp_Q.argsort(stable=True)
    counts_E = torch.zeros(layer.num_experts, dtype=torch.long, device=exp_Q.device)
    counts_E.scatter_add_(0, exp_Q, torch.ones_like(exp_Q))
    grouped = resolve_expert_impl("auto", dt, layer.d_model, layer.d_ff) and len(exp_Q) > 0
    groups = ExpertGroups.of(counts_E, grouped)
    tok_sorted_Q = tok_Q[order_Q]
    ma_Q, mg_Q = ghost_rows(x_ND[tok_sorted_Q].to(dt), g_ND[tok_sorted_Q].to(dt), *_weights(layer, dt), mm=groups.mm)
    # back to the caller's pair order
    return torch.empty_like(ma_Q).index_copy_(0, order_Q, ma_Q), torch.empty_like(mg_Q).index_copy_(0, order_Q, mg_Q)


@torch.no_grad()
def ghost_stats(layer: MoELayer, x_ND: Tensor, g_ND: Tensor, mask_NE: Tensor,
                M_A: Tensor, M_G: Tensor) -> None:
    """Fill the entries of ``M_A``/``M_G`` [N, E] where ``mask_NE`` is set."""
    dt = M_A.dtype
    dense_N = mask_NE.all(dim=1)
    # HOST SYNC (this generic entry point only; the training step's ``step_stats`` has static
    # shapes): which rows are dense and which pairs are left decides the shapes.
    rows_R = dense_N.nonzero().squeeze(1)
    if len(rows_R) == len(dense_N):
        M_A[:], M_G[:] = ghost_dense_rows(layer, x_ND, g_ND, dt)
        return
    if len(rows_R):
        M_A[rows_R], M_G[rows_R] = ghost_dense_rows(layer, x_ND[rows_R], g_ND[rows_R], dt)
    tok_Q, exp_Q = (mask_NE & ~dense_N.unsqueeze(1)).nonzero().unbind(1)  # HOST SYNC (as above)
    if len(tok_Q):
        M_A[tok_Q, exp_Q], M_G[tok_Q, exp_Q] = ghost_pairs(layer, x_ND, g_ND, tok_Q, exp_Q, dt)
