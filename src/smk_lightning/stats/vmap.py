"""vmap engine: ``torch.func.vmap(torch.func.grad(⟨ḡ_t, f_e(x_t; θ_e)⟩))`` over tokens
(and over experts where a whole token chunk is dense).

This materialises per-token gradients — the textbook method and the independent
check of the ghost engine. Tokens are processed in chunks of ``chunk_size`` so the
per-token gradients alive at once stay bounded: chunk × (E or 1) × |θ_e| numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, vmap

from smk_lightning.model.moe import MoELayer
from smk_lightning.stats.rules import expert_forward

DEFAULT_CHUNK_SIZE = 64


def _pair_norms(params: tuple[Tensor, ...], x_D: Tensor, g_D: Tensor) -> tuple[Tensor, Tensor]:
    """(‖f(x)‖, ‖∇_θ ⟨g, f(x; θ)⟩‖) for one token and one expert."""
    grads = grad(lambda p: (expert_forward(p, x_D) * g_D).sum())(params)
    mg = torch.stack([gr.square().sum() for gr in grads]).sum().sqrt()
    return expert_forward(params, x_D).norm(), mg


_over_tokens = vmap(_pair_norms, in_dims=(None, 0, 0))
_over_experts_and_tokens = vmap(_over_tokens, in_dims=(0, None, None))


def _params(layer: MoELayer, dt: torch.dtype, e: int | None = None) -> tuple[Tensor, ...]:
    ws = [layer.w1, layer.w2] + ([] if layer.w3 is None else [layer.w3])
    return tuple((w if e is None else w[e]).detach().to(dt) for w in ws)


def vmap_stats(layer: MoELayer, x_ND: Tensor, g_ND: Tensor, mask_NE: Tensor,
               M_A: Tensor, M_G: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
    """Fill the entries of ``M_A``/``M_G`` [N, E] where ``mask_NE`` is set."""
    dt = M_A.dtype
    x_ND, g_ND = x_ND.detach().to(dt), g_ND.detach().to(dt)
    dense_N = mask_NE.all(dim=1)
    dense_idx = dense_N.nonzero().squeeze(1)
    if len(dense_idx):
        stacked = _params(layer, dt)
        for idx in dense_idx.split(chunk_size):
            ma_EC, mg_EC = _over_experts_and_tokens(stacked, x_ND[idx], g_ND[idx])
            M_A[idx], M_G[idx] = ma_EC.T, mg_EC.T
    rest_NE = mask_NE & ~dense_N.unsqueeze(1)
    for e in range(layer.num_experts):
        params = _params(layer, dt, e)
        for idx in rest_NE[:, e].nonzero().squeeze(1).split(chunk_size):
            M_A[idx, e], M_G[idx, e] = _over_tokens(params, x_ND[idx], g_ND[idx])
