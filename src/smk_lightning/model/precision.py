"""The one precision rule of the statistics and the router (docs/design.md, precision): norms,
probabilities and losses accumulate in float32 at least, whatever the compute dtype
(bf16/fp16 → float32, float32 stays, float64 stays float64)."""

from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(*dtypes: torch.dtype | Tensor) -> torch.dtype:
    """The widest of float32 and the given dtypes (or tensors' dtypes)."""
    dt = torch.float32
    for d in dtypes:
        dt = torch.promote_types(dt, d.dtype if isinstance(d, Tensor) else d)
    return dt


def to_acc(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype (a no-op for float32 and float64)."""
    return t.to(acc_dtype(t.dtype))
