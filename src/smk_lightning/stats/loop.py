"""Loop engine: one ``torch.autograd.grad`` call per (token, expert). The slow, obvious
reference the other engines are tested against."""

from __future__ import annotations

import torch
from torch import Tensor

from smk_lightning.model.moe import MoELayer


def loop_stats(layer: MoELayer, x_ND: Tensor, g_ND: Tensor, mask_NE: Tensor,
               M_A: Tensor, M_G: Tensor) -> None:
    """Fill the entries of ``M_A``/``M_G`` [N, E] where ``mask_NE`` is set."""
    dt = M_A.dtype
    with torch.enable_grad():
        for t, e in mask_NE.nonzero().tolist():
            params = tuple(w.requires_grad_(True) for w in layer.expert_params(dt, e))
            y = layer.kind.forward(params, x_ND[t].detach().to(dt))
            grads = torch.autograd.grad((y * g_ND[t].detach().to(dt)).sum(), params)
            M_A[t, e] = y.detach().norm()
            M_G[t, e] = torch.stack([gr.square().sum() for gr in grads]).sum().sqrt()
