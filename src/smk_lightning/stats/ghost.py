"""Ghost engine: closed-form M_A, M_G (``rules.ghost_rows``), batched over experts.

No autograd graph and no per-token gradient. Two batching schemes, neither loops over
experts in Python:

- ``ghost_dense_rows``: every expert on a set of rows, as batched matmuls over
  ``[E, rows, ·]`` (``rules.ghost_rows_all_experts``; rows in fixed-size chunks, so the
  intermediates stay bounded and the shapes depend only on the row count);
- ``ghost_pairs``: arbitrary (token, expert) pairs, sorted by expert and multiplied like the
  layer's own forward (``ExpertGroups``: grouped GEMMs, or one matmul per expert in float64).

``ghost_stats`` (any mask) uses the first for rows whose every expert is wanted and the
second for the rest. ``ghost_step`` fills a training step's statistics from the layer's
capture: routed pairs need no new matmul (the forward kept ‖y‖ and ‖h‖², hooks kept the
row norms of the backward's own gradients of y and the pre-activations; see
``smk_lightning.model.moe.Capture``), and dense / probe rows go through ``ghost_dense_rows``.
On a GPU its shapes depend only on N, E, k and ρ, and it reads nothing on the host; on
the CPU, where a read costs nothing, it skips the lost pairs' recompute when none is lost.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smk_lightning.model.experts import sqnorm
from smk_lightning.model.moe import (
    Capture,
    ExpertGroups,
    MoELayer,
    expert_counts,
    resolve_expert_impl,
)
from smk_lightning.stats.rules import ghost_rows, ghost_rows_all_experts

# Elements of one [E, rows, F] intermediate of ghost_dense_rows, by device type (about five
# are alive at once); rows are processed in equal chunks of at most DENSE_CHUNK_ELEMENTS // (E·F).
# CPU: 4 MB in float32, so a chunk's elementwise work stays in cache (measured, 1 thread,
# N=2048, E=8, F=256: 2^20 vs 2^24 elements → 96 vs 153 ms dense, 24 vs 29 ms probe 0.25);
# elsewhere (GPU): 64 MB, a few large kernels with bounded memory.
DENSE_CHUNK_ELEMENTS = {"cpu": 1 << 20, "default": 1 << 24}
# Routed pairs per layer and step whose M_G is recomputed when their combine weight is too
# small to divide out (see ``ghost_step``): a fixed count, so the step has no host sync; it
# costs one ``ghost_dense_rows`` call on this many rows (merged into the probe rows' call).
LOST_PAIR_BUDGET = 16
# Device types where reading a value on the host costs nothing, there being no device to
# wait for: there ``ghost_step`` looks whether any routed pair was lost and, if none was
# (nearly always), skips the budget's recompute (on the CPU it was ~6 ms of a ~290 ms step
# at configs/default.yaml, 2 threads). The results are the same either way (in probe scope
# to float rounding: the probe rows share a matmul with the recomputed ones). tests/syncs.py
# empties this set while it counts the syncs a GPU would make, so CPU tests see the GPU's path.
FREE_HOST_READS = {"cpu"}


@torch.no_grad()
def ghost_dense_rows(layer: MoELayer, x_RD: Tensor, g_RD: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) ``[R, E]`` of every expert on every given row, in dtype ``dt``."""
    *w_in, w2_EFD = layer.expert_params(dt)
    x_RD, g_RD = x_RD.to(dt), g_RD.to(dt)
    budget = DENSE_CHUNK_ELEMENTS.get(x_RD.device.type, DENSE_CHUNK_ELEMENTS["default"])
    max_rows = max(1, budget // (layer.num_experts * layer.d_ff))
    n_chunks = max(1, math.ceil(len(x_RD) / max_rows))
    chunk = max(1, math.ceil(len(x_RD) / n_chunks))  # equal chunks of at most max_rows
    parts = [ghost_rows_all_experts(layer.kind, x, g, tuple(w_in), w2_EFD)
             for x, g in zip(x_RD.split(chunk), g_RD.split(chunk))]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([ma for ma, _ in parts]), torch.cat([mg for _, mg in parts])


@torch.no_grad()
def ghost_pairs(layer: MoELayer, x_ND: Tensor, g_ND: Tensor, tok_Q: Tensor, exp_Q: Tensor,
                dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) ``[Q]`` of the pairs (token tok_Q[q], expert exp_Q[q]), in dtype ``dt``."""
    order_Q = exp_Q.argsort(stable=True)
    counts_E = expert_counts(exp_Q, layer.num_experts)
    grouped = resolve_expert_impl("auto", dt, layer.d_model, layer.d_ff) and len(exp_Q) > 0
    groups = ExpertGroups.of(counts_E, grouped)
    tok_sorted_Q = tok_Q[order_Q]
    *w_in, w2_EFD = layer.expert_params(dt)
    ma_Q, mg_Q = ghost_rows(layer.kind, x_ND[tok_sorted_Q].to(dt), g_ND[tok_sorted_Q].to(dt), tuple(w_in), w2_EFD,
                            mm=groups.mm)
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


@torch.no_grad()
def ghost_step(layer: MoELayer, cap: Capture, scope: str, rows_R: Tensor | None,
               M_A: Tensor, M_G: Tensor, mask_NE: Tensor) -> Tensor:
    """Fill ``M_A``/``M_G`` [N, E] of a training step in ``scope`` from the layer's capture
    (``rows_R``: the probe rows in scope 'probe'), with static shapes and no host sync on a
    GPU (see ``FREE_HOST_READS`` for the CPU). Returns the number of routed pairs (0-d, on
    the device) whose M_G could not be computed (lost pairs beyond ``LOST_PAIR_BUDGET``, see
    below); they are cleared from ``mask_NE`` and their M_A and M_G are NaN."""
    routing, dt = cap.routing, M_A.dtype
    topi_NK = routing.topi_NK
    N, K = topi_NK.shape
    # Routed pairs: every factor of the closed form came out of the forward and the
    # normal backward. ḡ is the output's gradient itself; the gradients of u and v carry the
    # pair's combine weight w, which is divided out here. The capture's per-pair norms are in
    # sorted-pair order: one copy puts them back in (token, slot) order, where the weights,
    # the experts (topi_NK) and the tokens' own norms line up without an index, and one
    # scatter per result writes them.
    slots_3P = torch.stack([cap.ma_P, cap.hsq_P, cap.gusq_P + cap.gvsq_P]).to(dt)
    ma_NK, hsq_NK, gpre_NK = (
        torch.empty_like(slots_3P).index_copy_(1, routing.order_P, slots_3P).view(3, N, K).unbind(0))
    w_NK = cap.weights_NK.to(dt)
    xsq_N1 = sqnorm(cap.x_ND.to(dt)).unsqueeze(1)
    gsq_N1 = sqnorm(cap.grad_ND.to(dt)).unsqueeze(1)
    wsq_NK = w_NK.square().clamp_min(torch.finfo(dt).tiny)  # no 0/0 where w = 0 (a lost pair, or ḡ = 0)
    mg_NK = (gsq_N1 * hsq_NK + xsq_N1 * gpre_NK / wsq_NK).sqrt() * cap.grad_scale
    # A pair is "lost" when its M_G cannot be divided out of the captured gradients: its
    # weight is below 1e-19 in float32 (its square is no longer a normal number; a router
    # logit gap of about 44), or its gradients are so small that their squares fell below
    # the smallest normal number, each losing up to that much: below ``risk_sq`` the sum may
    # be more than 1e-6 off (w = 2e-18 with mean-loss gradients of 1e-4 made M_G 9 % off). A
    # pair whose ḡ is zero is never lost: all its gradients are zero and M_G is 0, exactly
    # (a masked token, whatever its weight). Lost pairs are rare, but which pairs are lost
    # is only known on the device, and reading it would be a host sync: so every step
    # recomputes a fixed number of pairs, the LOST_PAIR_BUDGET lost pairs of smallest
    # weight, and any lost pair beyond that is left out.
    fin = torch.finfo(cap.gusq_P.dtype)
    risk_sq = 2 * layer.d_ff * fin.tiny / 1e-6
    lost_NK = ((w_NK < torch.finfo(dt).tiny ** 0.5) | (gpre_NK < risk_sq)) & (gsq_N1 > 0)
    if scope == "dense":  # every row from scratch, lost pairs included
        M_A[:], M_G[:] = ghost_dense_rows(layer, cap.x_ND, cap.upstream(dt), dt)
        M_G.scatter_(1, topi_NK, torch.where(lost_NK, M_G.gather(1, topi_NK), mg_NK))
        M_A.scatter_(1, topi_NK, ma_NK)
        return torch.zeros((), dtype=torch.long, device=w_NK.device)
    if scope == "probe":  # the probe rows from scratch: their lost pairs are exact already
        probe_N1 = torch.zeros(N, 1, dtype=torch.bool, device=w_NK.device).index_fill_(0, rows_R, True)
        todo_NK = lost_NK & ~probe_N1
    else:
        todo_NK = lost_NK
    C = min(N * K, LOST_PAIR_BUDGET)
    if C and w_NK.device.type in FREE_HOST_READS and not todo_NK.any():  # host read: free here (see above)
        C = 0
    fix_C = torch.where(todo_NK, w_NK, float("inf")).view(-1).topk(C, largest=False).indices  # (token, slot) flat
    # One call for the probe rows and the tokens of the pairs to fix: every expert on each row.
    rows = fix_C // K if scope != "probe" else torch.cat([rows_R, fix_C // K])
    if len(rows):
        ma_RE, mg_RE = ghost_dense_rows(layer, cap.x_ND[rows], cap.upstream(dt, rows), dt)
        if scope == "probe":
            R = len(rows_R)
            M_A.index_copy_(0, rows_R, ma_RE[:R])
            M_G.index_copy_(0, rows_R, mg_RE[:R])
            mg_NK = torch.where(lost_NK & probe_N1, M_G.gather(1, topi_NK), mg_NK)
        fixed_C = mg_RE[len(rows) - C:].gather(1, topi_NK.view(-1)[fix_C].unsqueeze(1)).squeeze(1)
        mg_flat = mg_NK.reshape(-1)
        mg_NK = mg_flat.index_copy(0, fix_C, torch.where(todo_NK.view(-1)[fix_C], fixed_C, mg_flat[fix_C])).view(N, K)
    left_NK = todo_NK.reshape(-1).index_fill(0, fix_C, False).view(N, K)
    M_A.scatter_(1, topi_NK, torch.where(left_NK, float("nan"), ma_NK))  # left out: undefined, like
    M_G.scatter_(1, topi_NK, torch.where(left_NK, float("nan"), mg_NK))  # any entry outside the mask
    mask_NE.scatter_(1, topi_NK, ~left_NK)  # routed entries are in every scope's mask
    return left_NK.sum()
