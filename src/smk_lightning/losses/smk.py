"""smk_loss: route each token to the expert with the best synergy score ΔSC (DESIGN §2).

Shape legend: N tokens, E experts, K top_k. ``mask_NE`` marks the entries where both
statistics are defined; only rows with at least two defined experts take part.
Nothing here carries gradient except the router logits passed to ``smk_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DELTA_SC = ("zscore", "sigmoid", "surprise")
TARGETS = ("hard", "soft")


def _zscore(M_NE: Tensor, mask_NE: Tensor) -> Tensor:
    vals = M_NE[mask_NE]
    std = vals.std(unbiased=False) if vals.numel() > 1 else vals.new_tensor(0.0)
    return (M_NE - vals.mean()) / std.clamp_min(1e-12)


def delta_sc(M_A: Tensor, M_G: Tensor, mask_NE: Tensor, kind: str = "zscore") -> Tensor:
    """Synergy score [N, E]; -inf where undefined. z-scores are over all defined entries."""
    if kind == "zscore":
        d = _zscore(M_A, mask_NE) - _zscore(M_G, mask_NE)
    elif kind == "sigmoid":
        d = torch.sigmoid(M_A) - torch.sigmoid(M_G)
    elif kind == "surprise":
        d = -M_G
    else:
        raise ValueError(f"delta_sc {kind!r} does not exist; use one of {DELTA_SC}")
    return d.masked_fill(~mask_NE, float("-inf"))


@dataclass
class SMKTargets:
    rows_N: Tensor  # rows with ≥ 2 defined experts
    hard_N: Tensor  # argmax ΔSC (valid on rows_N)
    soft_NE: Tensor  # softmax(ΔSC / τ), zero where undefined
    dsc_NE: Tensor


def _acc(t: Tensor) -> Tensor:
    """float32 at least (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def smk_targets(M_A: Tensor, M_G: Tensor, mask_NE: Tensor, kind: str, tau: float) -> SMKTargets:
    """Targets from the statistics; detached, so they never carry gradient."""
    dsc_NE = delta_sc(_acc(M_A.detach()), _acc(M_G.detach()), mask_NE, kind)
    rows_N = mask_NE.sum(1) >= 2
    safe_NE = torch.where(rows_N.unsqueeze(1), dsc_NE, torch.zeros_like(dsc_NE))
    return SMKTargets(rows_N, safe_NE.argmax(1), (safe_NE / tau).softmax(1), dsc_NE)


def smk_loss(logits_NE: Tensor, t: SMKTargets, target: Literal["hard", "soft"]) -> Tensor:
    """CE to the argmax target (hard) or KL(Q ‖ p) (soft), averaged over valid rows."""
    if not t.rows_N.any():
        return logits_NE.sum() * 0.0
    z_ME = _acc(logits_NE[t.rows_N])
    if target == "hard":
        return F.cross_entropy(z_ME, t.hard_N[t.rows_N])
    if target == "soft":
        return kl_q_p(t.soft_NE[t.rows_N], z_ME).mean()
    raise ValueError(f"smk target {target!r} does not exist; use one of {TARGETS}")


def kl_q_p(q_ME: Tensor, logits_ME: Tensor) -> Tensor:
    """KL(Q ‖ softmax(logits)) per row; 0·log 0 = 0."""
    return (torch.xlogy(q_ME, q_ME) - q_ME * logits_ME.log_softmax(-1)).sum(-1)


@torch.no_grad()
def smk_metrics(logits_NE: Tensor, t: SMKTargets, top_k: int) -> dict[str, Tensor]:
    """g_acc and kl_div (with the configured τ) over rows with ≥ 2 defined experts;
    topk_overlap over rows with more than top_k defined experts (on the others it is 1 by
    construction). NaN where no row qualifies."""
    nan = _acc(logits_NE.new_tensor(float("nan")))
    rows = t.rows_N
    if not rows.any():
        return {"g_acc": nan, "kl_div": nan, "topk_overlap": nan}
    z_ME = _acc(logits_NE[rows])
    g_acc = (z_ME.argmax(1) == t.hard_N[rows]).float().mean()
    kl = kl_q_p(t.soft_NE[rows], z_ME).mean()
    wide = torch.isfinite(t.dsc_NE).sum(1) > top_k
    overlap = nan
    if wide.any():
        z_WE, dsc_WE = _acc(logits_NE[wide]), t.dsc_NE[wide]
        sel = torch.zeros_like(z_WE, dtype=torch.bool).scatter_(1, z_WE.topk(top_k, 1).indices, True)
        best = torch.zeros_like(sel).scatter_(1, dsc_WE.topk(top_k, 1).indices, True)
        overlap = (sel & best).sum(1).float().div(top_k).mean()
    return {"g_acc": g_acc, "kl_div": kl, "topk_overlap": overlap}
