"""smk_loss: route each token to the expert with the best synergy score ΔSC (docs/design.md).

Shape legend: N tokens, E experts; every function also takes leading batch dimensions
(``[L, N, E]``: the MoE layers of a step at once, each with its own moments, so the
training step runs these few kernels once, not once per layer). ``mask_NE`` marks the entries where both statistics
are defined; ``D_t`` is row t's defined set. Only rows with ``|D_t| ≥ 2`` take part, and
the router distribution is restricted to ``D_t`` (``p̃ = softmax`` of the logits over
``D_t``): a routed row orders only the experts it has evidence for and never pushes down
an expert it knows nothing about (the gradient on an undefined logit is exactly zero).

Batch-level moments (z-score means/stds, Sinkhorn column sums, the count of rows the
loss averages over) are sums over the *global* batch: ``all_reduce`` sums a tensor over
the ranks (identity on one process). No boolean indexing: every reduction is a masked
sum, so nothing here waits for the device.
Nothing here carries gradient except the router logits passed to ``smk_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch
from torch import Tensor

from smk_lightning.model.precision import to_acc

# The variants, each listed once: the config's field types are these Literals, the tuples
# name them in error messages, and a test checks that every name has an implementation.
DeltaSC = Literal["zscore", "zscore_expert", "sigmoid", "surprise", "log1p"]
Target = Literal["hard", "soft", "balanced"]
DELTA_SC: tuple[str, ...] = get_args(DeltaSC)
TARGETS: tuple[str, ...] = get_args(Target)

AllReduce = Callable[[Tensor], Tensor]


def _no_reduce(t: Tensor) -> Tensor:
    return t


def _zscore(M_NE: Tensor, mask_NE: Tensor, dim: int | None, all_reduce: AllReduce) -> Tensor:
    """(M − mean) / std over the defined entries of each ``[N, E]``: all of them (dim None)
    or per column (dim -2)."""
    dims = (-2, -1) if dim is None else (dim,)
    vals_NE = torch.where(mask_NE, M_NE, 0.0)
    sums = all_reduce(torch.stack([vals_NE.sum(dims, keepdim=True),
                                   mask_NE.sum(dims, keepdim=True).to(M_NE.dtype)]))
    count = sums[1].clamp_min(1.0)
    mean = sums[0] / count
    sqdev = all_reduce(torch.where(mask_NE, (M_NE - mean).square(), 0.0).sum(dims, keepdim=True))
    std = (sqdev / count).sqrt()
    return (M_NE - mean) / std.clamp_min(1e-12)


def delta_sc(M_A: Tensor, M_G: Tensor, mask_NE: Tensor, kind: str = "zscore",
             all_reduce: AllReduce = _no_reduce) -> Tensor:
    """Synergy score [N, E]; -inf where undefined.

    zscore: z-scores over all defined entries of the (global) batch; zscore_expert: each
    expert column standardised over the tokens where it is defined; sigmoid: σ(M_A) − σ(M_G);
    surprise: −M_G; log1p: log1p(M_A) − log1p(M_G) (no batch moments, so no outlier
    sensitivity)."""
    if kind in ("zscore", "zscore_expert"):
        dim = None if kind == "zscore" else -2
        d = _zscore(M_A, mask_NE, dim, all_reduce) - _zscore(M_G, mask_NE, dim, all_reduce)
    elif kind == "sigmoid":
        d = torch.sigmoid(M_A) - torch.sigmoid(M_G)
    elif kind == "surprise":
        d = -M_G
    elif kind == "log1p":
        d = torch.log1p(M_A) - torch.log1p(M_G)
    else:
        raise ValueError(f"delta_sc {kind!r} does not exist; use one of {DELTA_SC}")
    return d.masked_fill(~mask_NE, float("-inf"))


def sinkhorn(logits_NE: Tensor, rows_N: Tensor, iters: int, all_reduce: AllReduce = _no_reduce) -> Tensor:
    """Sinkhorn–Knopp projection of ``exp(logits)`` on the rows ``rows_N``: every row sums
    to 1 and every column to (global row count)/E, up to the iterations' convergence (the
    last step normalises rows, so row sums are exact). Zero on the other rows."""
    E = logits_NE.shape[-1]
    safe_NE = torch.where(rows_N.unsqueeze(-1), logits_NE, 0.0)
    q_NE = (safe_NE - safe_NE.amax(-1, keepdim=True)).exp() * rows_N.unsqueeze(-1)
    n_rows = all_reduce(rows_N.sum(-1, keepdim=True).unsqueeze(-1).to(q_NE.dtype))
    for _ in range(iters):
        col_E = all_reduce(q_NE.sum(-2, keepdim=True))
        q_NE = q_NE * (n_rows / E / col_E.clamp_min(torch.finfo(q_NE.dtype).tiny))
        q_NE = q_NE / q_NE.sum(-1, keepdim=True).clamp_min(torch.finfo(q_NE.dtype).tiny)
    return q_NE


@dataclass
class SMKTargets:
    mask_NE: Tensor  # defined entries (D_t per row)
    rows_N: Tensor  # rows with ≥ 2 defined experts
    dense_N: Tensor  # rows where every expert is defined
    hard_N: Tensor  # argmax_{D_t} ΔSC (valid on rows_N)
    q_NE: Tensor  # target distribution Q (soft or balanced), zero outside D_t (uniform on rows with no D_t)
    dsc_NE: Tensor  # ΔSC, -inf outside D_t

    def __getitem__(self, i: int) -> SMKTargets:
        """Layer i of targets computed for ``[L, N, E]`` statistics."""
        return SMKTargets(*(getattr(self, f.name)[i] for f in fields(self)))


def smk_targets(M_A: Tensor, M_G: Tensor, mask_NE: Tensor, kind: str, tau: float,
                target: Target = "soft", sinkhorn_iters: int = 20,
                all_reduce: AllReduce = _no_reduce) -> SMKTargets:
    """Targets from the statistics; detached, so they never carry gradient."""
    dsc_NE = delta_sc(to_acc(M_A.detach()), to_acc(M_G.detach()), mask_NE, kind, all_reduce)
    counts_N = mask_NE.sum(-1)
    rows_N, dense_N = counts_N >= 2, counts_N == mask_NE.shape[-1]
    # Rows with no defined entry get 0 instead of -inf so that nothing below is NaN.
    safe_NE = torch.where(counts_N.unsqueeze(-1) > 0, dsc_NE, torch.zeros_like(dsc_NE))
    q_NE = (safe_NE / tau).softmax(-1)
    if target == "balanced":
        q_bal = sinkhorn(safe_NE / tau, dense_N, sinkhorn_iters, all_reduce)
        q_NE = torch.where(dense_N.unsqueeze(-1), q_bal, q_NE)
    return SMKTargets(mask_NE, rows_N, dense_N, safe_NE.argmax(-1), q_NE, dsc_NE)


def _masked_log_softmax(logits_NE: Tensor, t: SMKTargets) -> Tensor:
    """log p̃: log-softmax over D_t (−inf elsewhere); rows with < 2 defined experts use all
    logits (they are excluded from every mean, and must not make NaN gradients)."""
    keep_NE = t.mask_NE | ~t.rows_N.unsqueeze(-1)
    return to_acc(logits_NE).masked_fill(~keep_NE, float("-inf")).log_softmax(-1)


def _kl_rows(t: SMKTargets, logp_NE: Tensor) -> Tensor:
    """KL(Q_t ‖ p̃_t) per row (0·log 0 = 0; entries outside D_t contribute nothing)."""
    q_NE = t.q_NE.to(logp_NE.dtype)
    return torch.where(t.mask_NE, torch.xlogy(q_NE, q_NE) - q_NE * logp_NE, 0.0).sum(-1)


def smk_loss_sum(logits_NE: Tensor, t: SMKTargets, target: Target) -> Tensor:
    """Σ over the valid rows of CE to the argmax target (hard) or KL(Q ‖ p̃) (soft, balanced)
    (one sum per ``[N, E]``)."""
    logp_NE = _masked_log_softmax(logits_NE, t)
    if target == "hard":
        per_row = -logp_NE.gather(-1, t.hard_N.unsqueeze(-1)).squeeze(-1)
    elif target in ("soft", "balanced"):
        per_row = _kl_rows(t, logp_NE)
    else:
        raise ValueError(f"smk target {target!r} does not exist; use one of {TARGETS}")
    return torch.where(t.rows_N, per_row, 0.0).sum(-1)


def smk_loss(logits_NE: Tensor, t: SMKTargets, target: Target,
             all_reduce: AllReduce = _no_reduce) -> Tensor:
    """Mean over the valid rows of the global batch of this rank's share: summed over the
    ranks it is the global mean (0 with gradient 0 when no row is valid); one per ``[N, E]``."""
    total = smk_loss_sum(logits_NE, t, target)  # float32 or wider: counts stay exact
    return total / all_reduce(t.rows_N.sum(-1).to(total.dtype)).clamp_min(1.0)


def _masked_mean(vals_N: Tensor, rows_N: Tensor) -> Tensor:
    """Mean of ``vals_N`` over ``rows_N``; NaN when no row qualifies."""
    n = rows_N.sum()
    return torch.where(rows_N, vals_N, 0.0).sum() / torch.where(n > 0, n, torch.nan)


@torch.no_grad()
def smk_metrics(logits_NE: Tensor, t: SMKTargets, top_k: int, topi_NK: Tensor | None = None) -> dict[str, Tensor]:
    """Per MoE layer, NaN where no row qualifies:

    g_acc: share of rows with |D_t| ≥ 2 whose argmax_{D_t} logit equals argmax_{D_t} ΔSC;
    g_acc_dense: the same over rows where every expert is defined (chance 1/E);
    kl_div: mean KL(Q ‖ p̃) over rows with |D_t| ≥ 2 (with the configured τ);
    topk_overlap: |S_t ∩ topk(ΔSC_t)| / k over rows with more than k defined experts, S_t
    the router's own selection (``topi_NK``; the logits' top-k when not given);
    agreement: target–router agreement, the Pearson correlation over D_t of the router's p̃_t
    and ΔSC_t, averaged over rows with |D_t| ≥ 3 (two points only give the sign of the
    order, which g_acc already counts) where neither is constant."""
    logp_NE = _masked_log_softmax(logits_NE, t)
    hit_N = (logp_NE.argmax(1) == t.hard_N).to(logp_NE.dtype)
    wide_N = t.mask_NE.sum(1) > top_k
    if topi_NK is None:
        topi_NK = logits_NE.topk(top_k, 1).indices
    best_NK = torch.where(wide_N.unsqueeze(1), t.dsc_NE, 0.0).topk(top_k, 1).indices
    sel_NE = torch.zeros_like(t.mask_NE).scatter_(1, topi_NK, True)
    best_NE = torch.zeros_like(t.mask_NE).scatter_(1, best_NK, True)
    overlap_N = (sel_NE & best_NE).sum(1).to(logp_NE.dtype) / top_k
    return {
        "g_acc": _masked_mean(hit_N, t.rows_N),
        "g_acc_dense": _masked_mean(hit_N, t.dense_N & t.rows_N),
        "kl_div": _masked_mean(_kl_rows(t, logp_NE), t.rows_N),
        "topk_overlap": _masked_mean(overlap_N, wide_N),
        "agreement": _agreement(logp_NE.exp(), t),
    }


def _agreement(p_NE: Tensor, t: SMKTargets) -> Tensor:
    """Mean over rows with |D_t| ≥ 3 of corr_{D_t}(p̃_t, ΔSC_t); rows where either is
    constant on D_t (no correlation defined) are left out. NaN when no row qualifies."""
    m_NE = t.mask_NE.to(p_NE.dtype)
    n_N = m_NE.sum(-1)
    dsc_NE = torch.where(t.mask_NE, t.dsc_NE.to(p_NE.dtype), 0.0)

    def centred(x_NE: Tensor) -> Tensor:
        return (x_NE - (x_NE * m_NE).sum(-1, keepdim=True) / n_N.clamp_min(1).unsqueeze(-1)) * m_NE

    a_NE, b_NE = centred(p_NE), centred(dsc_NE)
    var_a_N, var_b_N = a_NE.square().sum(-1), b_NE.square().sum(-1)
    tiny = torch.finfo(p_NE.dtype).tiny
    ok_N = (n_N >= 3) & (var_a_N > tiny) & (var_b_N > tiny)
    corr_N = (a_NE * b_NE).sum(-1) / (var_a_N * var_b_N).clamp_min(tiny).sqrt()
    return _masked_mean(corr_N, ok_N)
