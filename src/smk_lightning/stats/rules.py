"""Per-expert-kind rules: the expert as a pure function, and the closed-form ghost norms.

One small rule per expert kind (as Opacus has one per layer kind). Each linear layer's
per-token gradient is an outer product, so its Frobenius norm is the product of two
vector norms and no per-token gradient is ever formed (DESIGN §2):

    SwiGLU:  u = x W1, v = x W3, s = silu(u), h = s ⊙ v, y = h W2
             g_h = g W2ᵀ, g_v = g_h ⊙ s, g_u = g_h ⊙ v ⊙ silu'(u)
             M_G² = ‖g‖²‖h‖² + (‖g_u‖² + ‖g_v‖²)‖x‖²
    GELU:    u = x W1, h = gelu(u), y = h W2
             g_u = g_h ⊙ gelu'(u),   M_G² = ‖g‖²‖h‖² + ‖g_u‖²‖x‖²

Shape legend: P rows (tokens or pairs), D d_model, F d_ff.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gelu_grad(u: Tensor) -> Tensor:
    """Derivative of the exact (erf) GELU."""
    return 0.5 * (1 + torch.erf(u / math.sqrt(2))) + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)


def hidden(u_PF: Tensor, v_PF: Tensor | None) -> Tensor:
    """Expert hidden activation h from its pre-activations (v is None for GELU)."""
    return F.gelu(u_PF) if v_PF is None else F.silu(u_PF) * v_PF


def expert_forward(params: tuple[Tensor, ...], x_D: Tensor) -> Tensor:
    """One expert as a pure function of its parameters ``(w1, w2[, w3])``; used by vmap and loop."""
    w1, w2, *w3 = params
    u = x_D @ w1
    h = hidden(u, x_D @ w3[0] if w3 else None)
    return h @ w2


def ghost_mg(xsq_P: Tensor, gsq_P: Tensor, gh_PF: Tensor, u_PF: Tensor, v_PF: Tensor | None,
             hsq_P: Tensor) -> Tensor:
    """M_G of rows from ‖x‖², ‖g‖², g_h = g W2ᵀ, the pre-activations and ‖h‖²."""
    if v_PF is None:
        inner_P = (gh_PF * gelu_grad(u_PF)).square().sum(-1)
    else:
        sig_PF = torch.sigmoid(u_PF)  # silu(u) = u·σ(u), silu'(u) = σ(u)(1 + u(1 − σ(u)))
        gv_PF = gh_PF * (u_PF * sig_PF)
        gu_PF = gh_PF * v_PF * (sig_PF * (1 + u_PF * (1 - sig_PF)))
        inner_P = gu_PF.square().sum(-1) + gv_PF.square().sum(-1)
    return (gsq_P * hsq_P + inner_P * xsq_P).sqrt()


def ghost_rows(x_PD: Tensor, g_PD: Tensor, w1_DF: Tensor, w2_FD: Tensor,
               w3_DF: Tensor | None) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) of one expert on rows of x with upstream gradients g, from scratch."""
    if w3_DF is None:
        u_PF, v_PF = x_PD @ w1_DF, None
    else:  # one matmul for both input projections
        u_PF, v_PF = (x_PD @ torch.cat([w1_DF, w3_DF], dim=1)).chunk(2, dim=1)
    h_PF = hidden(u_PF, v_PF)
    ma_P = (h_PF @ w2_FD).norm(dim=-1)
    mg_P = ghost_mg(x_PD.square().sum(-1), g_PD.square().sum(-1), g_PD @ w2_FD.T, u_PF, v_PF,
                    h_PF.square().sum(-1))
    return ma_P, mg_P
