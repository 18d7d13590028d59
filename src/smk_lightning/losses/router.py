"""Standard router regularisers: Switch load-balancing loss and router z-loss.

Shape legend: N tokens, E experts, K top_k.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch_aux_loss(probs_NE: Tensor, topi_NK: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_e f_e · P_e``: f_e the share of
    routed (token, slot) pairs sent to e, P_e the mean router probability of e.
    Equals 1 for perfectly uniform routing."""
    E = probs_NE.shape[-1]
    f_E = torch.bincount(topi_NK.reshape(-1), minlength=E).to(probs_NE.dtype) / topi_NK.numel()
    return E * (f_E * probs_NE.mean(0)).sum()


def router_z_loss(logits_NE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the router logits."""
    logits_NE = logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32))
    return torch.logsumexp(logits_NE, dim=-1).square().mean()
