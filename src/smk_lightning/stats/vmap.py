"""vmap engine: ``torch.func.vmap(torch.func.grad(⟨ḡ_t, f_e(x_t; θ_e)⟩))``.

This materialises per-token gradients — the textbook method and the independent check
of the ghost engine. Rows whose every expert is wanted are vmapped over experts and
tokens; the other (token, expert) pairs are vmapped over pairs, each with its expert's
parameters gathered (no Python loop over experts). Work goes in chunks of ``chunk_size``
tokens or pairs, so the per-token gradients alive at once stay bounded:
chunk × (E or 1) × |θ_e| numbers.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from torch.func import grad, vmap

from smk_lightning.model.experts import ExpertKind
from smk_lightning.model.moe import MoELayer

DEFAULT_CHUNK_SIZE = 64  # the default of ``stats.vmap_chunk_size``


def check_chunk_size(chunk_size: int) -> None:
    """The one check of the chunk size (the engine and the config both call it)."""
    if chunk_size < 1:
        raise ValueError(f"stats.vmap_chunk_size={chunk_size} must be >= 1; use e.g. {DEFAULT_CHUNK_SIZE}")


def _pair_norms(kind: ExpertKind, params: tuple[Tensor, ...], x_D: Tensor, g_D: Tensor) -> tuple[Tensor, Tensor]:
    """(‖f(x)‖, ‖∇_θ ⟨g, f(x; θ)⟩‖) for one token and one expert."""
    grads = grad(lambda p: (kind.forward(p, x_D) * g_D).sum())(params)
    mg = torch.stack([gr.square().sum() for gr in grads]).sum().sqrt()
    return kind.forward(params, x_D).norm(), mg


def vmap_stats(layer: MoELayer, x_ND: Tensor, g_ND: Tensor, mask_NE: Tensor,
               M_A: Tensor, M_G: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
    """Fill the entries of ``M_A``/``M_G`` [N, E] where ``mask_NE`` is set."""
    check_chunk_size(chunk_size)
    dt = M_A.dtype
    x_ND, g_ND = x_ND.detach().to(dt), g_ND.detach().to(dt)
    pair = partial(_pair_norms, layer.kind)
    dense_N = mask_NE.all(dim=1)
    dense_idx = dense_N.nonzero().squeeze(1)
    if len(dense_idx):
        over_experts_and_tokens = vmap(vmap(pair, in_dims=(None, 0, 0)), in_dims=(0, None, None))
        stacked = layer.expert_params(dt)
        for idx in dense_idx.split(chunk_size):
            ma_EC, mg_EC = over_experts_and_tokens(stacked, x_ND[idx], g_ND[idx])
            M_A[idx], M_G[idx] = ma_EC.T, mg_EC.T
    tok_Q, exp_Q = (mask_NE & ~dense_N.unsqueeze(1)).nonzero().unbind(1)
    over_pairs = vmap(pair, in_dims=(0, 0, 0))
    for t, e in zip(tok_Q.split(chunk_size), exp_Q.split(chunk_size)):
        M_A[t, e], M_G[t, e] = over_pairs(layer.expert_params(dt, e), x_ND[t], g_ND[t])
