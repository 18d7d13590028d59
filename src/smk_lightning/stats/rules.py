"""The closed-form ("ghost") norms of rows, for any expert kind (``model/experts.py``).

Each linear layer's per-token gradient is an outer product, so its Frobenius norm is the
product of two vector norms and no per-token gradient is ever formed (docs/design.md):

    M_A = ‖y‖,   M_G² = ‖g‖²‖h‖² + ‖x‖² Σ_pre ‖g_pre‖²      (``kind.pre_grad_sq``)

Shape legend: P rows (tokens or pairs), D d_model, F d_ff, E experts. The closed form
(``ghost_from``) is elementwise over leading dimensions: ``ghost_rows`` runs it on rows
that each have one expert (one expert's ``[D, F]`` weights, or rows sorted by expert with
``mm = ExpertGroups.mm``); ``ghost_rows_all_experts`` runs every expert on every row as
batched matmuls over the stacked ``[E, ·, ·]`` weights.
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

    Batched matmuls over experts, rows broadcast against the stacked weights
    (``[R, D] × [E, D, F] → [E, R, F]``): no copy of the weights, and the elementwise work
    runs on contiguous ``[E, R, F]``. One wide GEMM over ``[D, E·F]`` would permute-copy
    every weight on each call (slower at every row count timed, BENCHMARKS.md).
    """
    pre = tuple(torch.matmul(x_RD, w_EDF) for w_EDF in w_in)
    a_ERF, h_ERF = kind.activations(pre)
    ma_ER, mg_ER = ghost_from(kind, x_RD, g_RD, pre, a_ERF, h_ERF, torch.bmm(h_ERF, w2_EFD),
                              torch.matmul(g_RD, w2_EFD.mT))
    return ma_ER.T, mg_ER.T
