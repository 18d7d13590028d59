"""Ghost engine: closed-form M_A, M_G (``rules.ghost_rows``), one expert at a time.

No autograd graph and no per-token gradient: memory is O(N·E) for the results plus
one expert's activations on its tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smk_lightning.model.moe import MoELayer
from smk_lightning.stats.rules import ghost_rows


@torch.no_grad()
def ghost_stats(layer: MoELayer, x_ND: Tensor, g_ND: Tensor, mask_NE: Tensor,
                M_A: Tensor, M_G: Tensor) -> None:
    """Fill the entries of ``M_A``/``M_G`` [N, E] where ``mask_NE`` is set."""
    dt = M_A.dtype
    x_ND, g_ND = x_ND.to(dt), g_ND.to(dt)
    for e in range(layer.num_experts):
        col = mask_NE[:, e]
        full = bool(col.all())
        if not full and not bool(col.any()):
            continue
        idx = None if full else col.nonzero().squeeze(1)
        x, g = (x_ND, g_ND) if full else (x_ND[idx], g_ND[idx])
        w1, w2, w3 = (None if w is None else w.detach().to(dt) for w in layer.expert_weights(e))
        ma, mg = ghost_rows(x, g, w1, w2, w3)
        if full:
            M_A[:, e], M_G[:, e] = ma, mg
        else:
            M_A[idx, e], M_G[idx, e] = ma, mg
