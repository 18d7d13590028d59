"""Expert kinds: each kind is defined once, here, and everything that computes with an
expert takes it from here — the MoE layer's forward, the dense FFN baseline, the ghost
engine's closed form and the pure function the vmap and loop engines differentiate.

An expert is ``y = h(x W_in…) W2``: one or more input projections (``in_names``, each
``[D, F]`` per expert), an activation that makes the hidden ``h`` from their outputs
(the pre-activations), and the output projection W2 ``[F, D]``. Every linear layer's
per-token gradient is an outer product, so its Frobenius norm is a product of two vector
norms (docs/design.md) and a kind only has to say how the gradient reaches each
pre-activation:

    SwiGLU:  u = x W1, v = x W3, a = silu(u), h = a ⊙ v, y = h W2
             g_h = g W2ᵀ, g_v = g_h ⊙ a, g_u = g_h ⊙ v ⊙ silu'(u)
    GELU:    u = x W1, a = h = gelu(u), y = h W2
             g_u = g_h ⊙ gelu'(u)

    M_G² = ‖g‖²‖h‖² + ‖x‖² Σ_pre ‖g_pre‖²        (``pre_grad_sq``)

Shape legend: P rows (any leading dimensions), D d_model, F d_ff.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sqnorm(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Squared norms over the last dimension, in one pass (accumulated in ``dtype`` if given)."""
    return torch.linalg.vector_norm(t, dim=-1, dtype=dtype).square()


class ExpertKind:
    """One kind of expert. ``pre`` is the tuple of pre-activations, in ``in_names`` order."""

    name: str
    in_names: tuple[str, ...]  # input projections, each [E, D, F] in the MoE layer

    def activations(self, pre: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(a, h): the activation a of the first pre-activation, and the hidden h."""
        raise NotImplementedError

    def pre_grad_sq(self, gh_PF: Tensor, pre: tuple[Tensor, ...], a_PF: Tensor) -> Tensor:
        """Σ over pre-activations of ‖∂⟨g, y⟩/∂pre‖², from g_h = g W2ᵀ: ``[P]``.

        The activations' derivatives are the fused backward kernels autograd itself uses
        (``silu_backward(g, u) = g ⊙ silu'(u)``, ``gelu_backward`` likewise, exact erf
        GELU): one pass each instead of a chain of elementwise ops over [P, F].
        """
        raise NotImplementedError

    def forward(self, params: tuple[Tensor, ...], x_PD: Tensor) -> Tensor:
        """The expert as a pure function of its parameters ``(*w_in, w2)`` (what vmap and
        the loop engine differentiate): ``[..., D] → [..., D]``."""
        *w_in, w2_FD = params
        return self.activations(tuple(x_PD @ w for w in w_in))[1] @ w2_FD


class SwiGLU(ExpertKind):
    name, in_names = "swiglu", ("w1", "w3")

    def activations(self, pre):
        u_PF, v_PF = pre
        a_PF = F.silu(u_PF)
        return a_PF, a_PF * v_PF

    def pre_grad_sq(self, gh_PF, pre, a_PF):
        u_PF, v_PF = pre
        return sqnorm(torch.ops.aten.silu_backward(gh_PF * v_PF, u_PF)) + sqnorm(gh_PF * a_PF)


class GELU(ExpertKind):
    name, in_names = "gelu", ("w1",)

    def activations(self, pre):
        a_PF = F.gelu(pre[0])
        return a_PF, a_PF

    def pre_grad_sq(self, gh_PF, pre, a_PF):
        return sqnorm(torch.ops.aten.gelu_backward(gh_PF, pre[0]))


EXPERT_KINDS: dict[str, ExpertKind] = {k.name: k for k in (SwiGLU(), GELU())}


def get_expert_kind(name: str) -> ExpertKind:
    """The kind called ``name``; an unknown name raises (no fallback)."""
    try:
        return EXPERT_KINDS[name]
    except KeyError:
        raise ValueError(f"activation={name!r} is not supported; use one of {tuple(EXPERT_KINDS)}") from None
