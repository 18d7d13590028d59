"""Standard router regularisers: Switch load-balancing loss and router z-loss.

Shape legend: N tokens, E experts, K top_k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from smk_lightning.model.moe import expert_counts
from smk_lightning.model.precision import to_acc


def _no_reduce(t: Tensor) -> Tensor:
    return t


def switch_aux_loss(probs_NE: Tensor, topi_NK: Tensor, all_reduce: Callable[[Tensor], Tensor] = _no_reduce,
                    world_size: int = 1) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_e f_e · P_e`` over the global batch:
    f_e the share of routed (token, slot) pairs sent to e, P_e the mean router probability
    of e. Equals 1 for perfectly uniform routing.

    Under DDP (``all_reduce`` sums over ranks) it returns ``world_size`` × this rank's
    additive share, so that the mean over ranks — what DDP does to gradients — is the
    global loss and its gradient."""
    E = probs_NE.shape[-1]
    counts_E = expert_counts(topi_NK, E).to(probs_NE.dtype)
    tokens = probs_NE.new_full((1,), probs_NE.shape[0])  # not new_tensor: a blocking host→device copy
    glob = all_reduce(torch.cat([counts_E, tokens]))
    f_E = glob[:E] / (glob[E] * topi_NK.shape[1])
    return world_size * E * (f_E * probs_NE.sum(0) / glob[E]).sum()


@torch.no_grad()
def auxfree_update_(bias_E: Tensor, load_E: Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): nudge each expert's routing bias by ``rate``
    against the sign of its load error (overloaded experts down, underloaded up)."""
    load_E = load_E.to(bias_E.dtype)
    bias_E += rate * torch.sign(load_E.mean() - load_E)


def router_z_loss(logits_NE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the router logits."""
    logits_NE = to_acc(logits_NE)
    return torch.logsumexp(logits_NE, dim=-1).square().mean()
