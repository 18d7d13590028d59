"""The closed-form ("ghost") norms of rows, for any expert kind (``model/experts.py``).

Each linear layer's per-token gradient is an outer product, so its Frobenius norm is the
product of two vector norms and no per-token gradient is ever formed (docs/design.md):

    M_A = ‖y‖,   M_G² = ‖g‖²‖h‖² + ‖x‖² Σ_pre ‖g_pre‖²      (``kind.pre_grad_sq``)

Shape legend: P rows (tokens or pairs), D d_model, F d_ff, E experts. The closed form
(``ghost_from``) is elementwise over leading dimensions: ``ghost_rows`` runs it on rows
that each have one expert (one expert's ``[D, F]`` weights, or rows sorted by expert with
``mm = ExpertGroups.mm``); ``ghost_rows_all_experts`` runs every expert on every row, with
the input projections of all experts as one wide GEMM ``[R, D] × [D, E·F]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from smk_lightning.model.experts import ExpertKind, sqnorm


def ghost_from(kind: ExpertKind, x_PD: Tensor, g_PD: Tensor, pre: tuple[Tensor, ...], a_PF: Tensor,
               h_PF: Tensor, y_PD: Tensor, gh_PF: Tensor) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) of rows from the input, upstream gradient, pre-activations, their
    ``kind.activations`` (a, h), the output y and g_h = g W2ᵀ; x and g broadcast against
    the other rows' leading dimensions."""
    xsq_P, gsq_P, hsq_P = sqnorm(x_PD), sqnorm(g_PD), sqnorm(h_PF)
    inner_P = kind.pre_grad_sq(gh_PF, pre, a_PF)
    return torch.linalg.vector_norm(y_PD, dim=-1), (gsq_P * hsq_P + inner_P * xsq_P).sqrt()


def ghost_rows(kind: ExpertKind, x_PD: Tensor, g_PD: Tensor, w_in: tuple[Tensor, ...], w2_FD: Tensor,
               mm: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) ``[P]`` of rows of x with upstream gradients g, from scratch: one expert's
    ``[D, F]`` weights, or rows sorted by expert with ``mm = ExpertGroups.mm`` and stacked
    weights."""
    pre = tuple(mm(x_PD, w) for w in w_in)
    a_PF, h_PF = kind.activations(pre)
    return ghost_from(kind, x_PD, g_PD, pre, a_PF, h_PF, mm(h_PF, w2_FD), mm(g_PD, w2_FD.mT))


def ghost_rows_all_experts(kind: ExpertKind, x_RD: Tensor, g_RD: Tensor, w_in: tuple[Tensor, ...],
                           w2_EFD: Tensor) -> tuple[Tensor, Tensor]:
    """(M_A, M_G) ``[R, E]`` of every expert on every row.

    The projections shared by all experts (the input projections and g W2ᵀ) are one wide
    GEMM each over ``[D, E·F]`` (one large matmul instead of E small ones, and a contiguous
    ``[R, E, F]`` for the elementwise work); only h W2 is a batched matmul over experts.
    """
    R, (E, D, F_) = x_RD.shape[0], w_in[0].shape

    def wide(a_RD: Tensor, w_EDF: Tensor) -> Tensor:  # a_RD @ w[e] for every e → [R, E, F]
        return (a_RD @ w_EDF.permute(1, 0, 2).reshape(D, E * F_)).view(R, E, F_)

    pre = tuple(wide(x_RD, w) for w in w_in)
    a_REF, h_REF = kind.activations(pre)
    y_ERD = torch.bmm(h_REF.transpose(0, 1), w2_EFD)
    return ghost_from(kind, x_RD.unsqueeze(1), g_RD.unsqueeze(1), pre, a_REF, h_REF,
                      y_ERD.transpose(0, 1), wide(g_RD, w2_EFD.mT))
