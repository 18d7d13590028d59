"""Per-expert-kind rules: the expert as a pure function, and the closed-form ghost norms.

One small rule per expert kind (as Opacus has one per layer kind). Each linear layer's
per-token gradient is an outer product, so its Frobenius norm is the product of two
vector norms and no per-token gradient is ever formed (docs/design.md):

    SwiGLU:  u = x W1, v = x W3, s = silu(u), h = s ⊙ v, y = h W2
             g_h = g W2ᵀ, g_v = g_h ⊙ s, g_u = g_h ⊙ v ⊙ silu'(u)
             M_G² = ‖g‖²‖h‖² + (‖g_u‖² + ‖g_v‖²)‖x‖²
    GELU:    u = x W1, h = gelu(u), y = h W2
             g_u = g_h ⊙ gelu'(u),   M_G² = ‖g‖²‖h‖² + ‖g_u‖²‖x‖²

Shape legend: P rows (tokens or pairs), D d_model, F d_ff, E experts. The closed form
(``ghost_from``) is elementwise over leading dimensions: ``ghost_rows`` runs it on rows
that each have one expert (one expert's ``[D, F]`` weights, or rows sorted by expert with
``mm = ExpertGroups.mm``); ``ghost_rows_all_experts`` runs every expert on every row, with
the input projections of all experts as one wide GEMM ``[R, D] × [D, E·F]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def hidden(u_PF: Tensor, v_PF: Tensor | None) -> Tensor:
    """Expert hidden activation h from its pre-activations (v is None for GELU)."""
    return F.gelu(u_PF) if v_PF is None else F.silu(u_PF) * v_PF


def expert_forward(params: tuple[Tensor, ...], x_D: Tensor) -> Tensor:
    """One expert as a pure function of its parameters ``(w1, w2[, w3])``; used by vmap and loop."""
    w1, w2, *w3 = params
    u = x_D @ w1
    h = hidden(u, x_D @ w3[0] if w3 else None)
    return h @ w2


def _sqnorm(t: Tensor) -> Tensor:
    """Squared row norms in one pass over ``t``."""
    return torch.linalg.vector_norm(t, dim=-1).square()


def activations(u_PF: Tensor, v_PF: Tensor | None) -> tuple[Tensor, Tensor]:
    """(a, h): the activation a = silu(u) (SwiGLU) or gelu(u), and h = a ⊙ v or a."""
    if v_PF is None:
        a_PF = F.gelu(u_PF)
        return a_PF, a_PF
    a_PF = F.silu(u_PF)
    return a_PF, a_PF * v_PF


def ghost_from(x_PD: Tensor, g_PD: Tensor, u_PF: Tensor, v_PF: Tensor | None, a_PF: Tensor, h_PF: Tensor,
               y_PD: Tensor, gh_PF: Tensor) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) of rows from the input, upstream gradient, pre-activations u, v, their
    ``activations`` (a, h), the output y and g_h = g W2ᵀ; x and g broadcast against the
    other rows' leading dimensions.

    The activations' derivatives are the fused backward kernels autograd itself uses
    (``silu_backward(a, u) = a ⊙ silu'(u)``, ``gelu_backward`` likewise, exact erf GELU):
    one pass each instead of a chain of elementwise ops over [rows, F].
    """
    if v_PF is None:
        inner_P = _sqnorm(torch.ops.aten.gelu_backward(gh_PF, u_PF))
    else:
        inner_P = _sqnorm(torch.ops.aten.silu_backward(gh_PF * v_PF, u_PF)) + _sqnorm(gh_PF * a_PF)
    xsq_P, gsq_P, hsq_P = _sqnorm(x_PD), _sqnorm(g_PD), _sqnorm(h_PF)
    return torch.linalg.vector_norm(y_PD, dim=-1), (gsq_P * hsq_P + inner_P * xsq_P).sqrt()


def ghost_rows(x_PD: Tensor, g_PD: Tensor, w1_DF: Tensor, w2_FD: Tensor, w3_DF: Tensor | None,
               mm: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) ``[P]`` of rows of x with upstream gradients g, from scratch: one expert's
    ``[D, F]`` weights, or rows sorted by expert with ``mm = ExpertGroups.mm`` and stacked
    weights."""
    u_PF = mm(x_PD, w1_DF)
    v_PF = None if w3_DF is None else mm(x_PD, w3_DF)
    a_PF, h_PF = activations(u_PF, v_PF)
    return ghost_from(x_PD, g_PD, u_PF, v_PF, a_PF, h_PF, mm(h_PF, w2_FD), mm(g_PD, w2_FD.mT))


def ghost_rows_all_experts(x_RD: Tensor, g_RD: Tensor, w1_EDF: Tensor, w2_EFD: Tensor,
                           w3_EDF: Tensor | None) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) ``[R, E]`` of every expert on every row.

    The projections shared by all experts (x W1, x W3, g W2ᵀ) are one wide GEMM each over
    ``[D, E·F]`` (one large matmul instead of E small ones, and a contiguous ``[R, E, F]``
    for the elementwise work); only h W2 is a batched matmul over experts.
    """
    R, (E, D, F_) = x_RD.shape[0], w1_EDF.shape

    def wide(a_RD: Tensor, w_EDF: Tensor) -> Tensor:  # a_RD @ w[e] for every e → [R, E, F]
        return (a_RD @ w_EDF.permute(1, 0, 2).reshape(D, E * F_)).view(R, E, F_)

    u_REF = wide(x_RD, w1_EDF)
    v_REF = None if w3_EDF is None else wide(x_RD, w3_EDF)
    a_REF, h_REF = activations(u_REF, v_REF)
    y_ERD = torch.bmm(h_REF.transpose(0, 1), w2_EFD)
    ma_RE, mg_RE = ghost_from(x_RD.unsqueeze(1), g_RD.unsqueeze(1), u_REF, v_REF, a_REF, h_REF,
                              y_ERD.transpose(0, 1), wide(g_RD, w2_EFD.mT))
    return ma_RE, mg_RE
