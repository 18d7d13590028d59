"""Ghost engine: closed-form M_A, M_G (``rules.ghost_rows``), batched over experts.

No autograd graph and no per-token gradient. Two batching schemes, neither loops over
experts in Python:

- ``ghost_dense_rows``: every expert on a set of rows, as batched matmuls over
  ``[E, rows, ·]`` (``rules.ghost_rows_all_experts``; rows in fixed-size chunks, so the
  intermediates stay bounded and the shapes depend only on the row count);
- ``ghost_pairs``: arbitrary (token, expert) pairs, sorted by expert and multiplied like the
  layer's own forward (``ExpertGroups``: grouped GEMMs, or one matmul per expert in float64).

``ghost_stats`` (any mask) uses the first for rows whose every expert is wanted and the
second for the rest. ``ghost_step`` fills a training step's statistics from the layers'
captures, all layers of one shape at once: routed pairs need no new matmul (the forward
kept ‖y‖ and ‖h‖², the sinks got ḡ and the row norms of the backward's own gradients of the
pre-activations; see ``smk_lightning.model.moe.Capture``), and dense / probe rows go
through ``ghost_dense_rows``, per layer. Its shapes depend only on N, E, k and ρ, and it
reads nothing on the host, on every device (so it compiles as one graph).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smk_lightning.model.moe import (
    ExpertGroups,
    MoELayer,
    expert_counts,
    resolve_expert_impl,
)
from smk_lightning.stats.rules import ghost_rows, ghost_rows_all_experts

# Elements of one [E, rows, F] intermediate of ghost_dense_rows, by device type (about five
# are alive at once); rows are processed in equal chunks of at most DENSE_CHUNK_ELEMENTS // (E·F).
# CPU: 2 MB in float32, so a chunk's elementwise work stays in cache (the fastest of the
# sizes timed, BENCHMARKS.md); elsewhere (GPU): 64 MB, a few large kernels with bounded memory.
DENSE_CHUNK_ELEMENTS = {"cpu": 1 << 19, "default": 1 << 24}
# Routed pairs per layer and step whose M_G is recomputed when their combine weight is too
# small to divide out (see ``ghost_step``): a fixed count, so the step has no host sync; it
# costs one ``ghost_dense_rows`` call on this many rows (merged into the probe rows' call).
LOST_PAIR_BUDGET = 16


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
def ghost_step(layers: list[MoELayer], topi_LNK: Tensor, scope: str, rows_LR: Tensor | None,
               M_A: Tensor, M_G: Tensor, mask_LNE: Tensor) -> Tensor:
    """Fill ``M_A``/``M_G`` ``[L, N, E]`` of a training step in ``scope`` from the captures
    of L layers of one shape (``topi_LNK``: their routing, stacked; ``rows_LR``: their probe
    rows in scope 'probe'), with static shapes and no host sync, the same on every device.
    The routed pairs of all layers are computed at once; only the rows recomputed from
    scratch need each layer's own weights. Returns the number
    of routed pairs per layer ``[L]`` (on the device) whose M_G could not be computed (lost
    pairs beyond ``LOST_PAIR_BUDGET``, see below); they are cleared from ``mask_LNE`` and
    their M_A and M_G are NaN."""
    caps, dt = [layer.capture for layer in layers], M_A.dtype
    L, N, K = topi_LNK.shape
    E = M_A.shape[-1]
    # Routed pairs: every factor of the closed form came out of the forward and the
    # normal backward. ḡ is the output's gradient itself; the gradients of u and v carry the
    # pair's combine weight w, which is divided out here. The capture's per-pair norms are in
    # sorted-pair order: one scatter puts them back in (token, slot) order, where the
    # weights, the experts (topi_LNK) and the tokens' own norms line up without an index, and
    # one scatter per result writes them.
    slots_L4P = torch.stack([t for c in caps for t in (c.ma_P, c.hsq_P, c.gusq_P, c.gvsq_P)]).view(L, 4, -1).to(dt)
    order_L4P = torch.stack([c.routing.order_P for c in caps]).unsqueeze(1).expand(-1, 4, -1)
    ma_LNK, hsq_LNK, gu_LNK, gv_LNK = (
        torch.empty_like(slots_L4P).scatter_(2, order_L4P, slots_L4P).view(L, 4, N, K).unbind(1))
    gpre_LNK = gu_LNK + gv_LNK
    w_LNK = torch.stack([c.weights_NK for c in caps]).to(dt)
    # ‖x‖², ‖ḡ‖² per layer, then stacked: stacking x and ḡ first would copy them all (at the
    # 0.1 B config 134 MB each, in float32)
    # (norms stacked, then squared once: one op for all layers)
    xsq_LN1, gsq_LN1 = (torch.stack([torch.linalg.vector_norm(t, dim=-1, dtype=dt) for t in ts]).square().unsqueeze(-1)
                        for ts in ([c.x_ND for c in caps], [c.grad_ND for c in caps]))
    wsq_LNK = w_LNK.square().clamp_min(torch.finfo(dt).tiny)  # no 0/0 where w = 0 (a lost pair, or ḡ = 0)
    mg_LNK = (gsq_LN1 * hsq_LNK + xsq_LN1 * gpre_LNK / wsq_LNK).sqrt() * caps[0].grad_scale
    # A pair is "lost" when its M_G cannot be divided out of the captured gradients: its
    # weight is below 1e-19 in float32 (its square is no longer a normal number; a router
    # logit gap of about 44), or its gradients are so small that their squares fell below
    # the smallest normal number, each losing up to that much: below ``risk_sq`` the sum may
    # be more than 1e-6 off (w = 2e-18 with mean-loss gradients of 1e-4 made M_G 9 % off). A
    # pair whose ḡ is zero is never lost: all its gradients are zero and M_G is 0, exactly
    # (a masked token, whatever its weight). Lost pairs are rare, but which pairs are lost
    # is only known on the device, and reading it would be a host sync: so every step
    # recomputes a fixed number of pairs per layer, the LOST_PAIR_BUDGET lost pairs of
    # smallest weight, and any lost pair beyond that is left out.
    risk_sq = 2 * layers[0].d_ff * torch.finfo(caps[0].gusq_P.dtype).tiny / 1e-6
    lost_LNK = ((w_LNK < torch.finfo(dt).tiny ** 0.5) | (gpre_LNK < risk_sq)) & (gsq_LN1 > 0)
    if scope == "dense":  # every row from scratch, lost pairs included
        for layer, c, A, G in zip(layers, caps, M_A, M_G):
            A[:], G[:] = ghost_dense_rows(layer, c.x_ND, c.upstream(dt), dt)
        M_G.scatter_(2, topi_LNK, torch.where(lost_LNK, M_G.gather(2, topi_LNK), mg_LNK))
        M_A.scatter_(2, topi_LNK, ma_LNK)
        return torch.zeros(L, dtype=torch.long, device=w_LNK.device)
    if scope == "probe":  # the probe rows from scratch: their lost pairs are exact already
        probe_LN1 = torch.zeros(L, N, 1, dtype=torch.bool, device=w_LNK.device).scatter_(1, rows_LR.unsqueeze(-1), True)
        todo_LNK = lost_LNK & ~probe_LN1
    else:
        todo_LNK = lost_LNK
    C = min(N * K, LOST_PAIR_BUDGET)
    todo_LX = todo_LNK.view(L, -1)  # X = N·K (token, slot) pairs, flat
    fix_LC = torch.where(todo_LX, w_LNK.view(L, -1), float("inf")).topk(C, largest=False).indices
    # One call per layer for its probe rows and the tokens of its pairs to fix: every expert on each row.
    rows_LS = fix_LC // K if scope != "probe" else torch.cat([rows_LR, fix_LC // K], 1)
    if rows_LS.shape[1]:
        ma_LSE, mg_LSE = (torch.stack(t) for t in zip(*(
            ghost_dense_rows(layer, c.x_ND[rows], c.upstream(dt, rows), dt)
            for layer, c, rows in zip(layers, caps, rows_LS))))
        if scope == "probe":
            R = rows_LR.shape[1]
            at_LRE = rows_LR.unsqueeze(-1).expand(L, R, E)
            M_A.scatter_(1, at_LRE, ma_LSE[:, :R])
            M_G.scatter_(1, at_LRE, mg_LSE[:, :R])
            mg_LNK = torch.where(lost_LNK & probe_LN1, M_G.gather(2, topi_LNK), mg_LNK)
        exp_LC = topi_LNK.view(L, -1).gather(1, fix_LC)
        fixed_LC = mg_LSE[:, rows_LS.shape[1] - C:].gather(2, exp_LC.unsqueeze(-1)).squeeze(-1)
        mg_LX = mg_LNK.reshape(L, -1)
        mg_LNK = mg_LX.scatter(1, fix_LC, torch.where(todo_LX.gather(1, fix_LC), fixed_LC, mg_LX.gather(1, fix_LC)))
        mg_LNK = mg_LNK.view(L, N, K)
    left_LNK = todo_LX.scatter(1, fix_LC, False).view(L, N, K)
    M_A.scatter_(2, topi_LNK, torch.where(left_LNK, float("nan"), ma_LNK))  # left out: undefined, like
    M_G.scatter_(2, topi_LNK, torch.where(left_LNK, float("nan"), mg_LNK))  # any entry outside the mask
    mask_LNE.scatter_(2, topi_LNK, ~left_LNK)  # routed entries are in every scope's mask
    return left_LNK.sum((1, 2))
