"""Grouped GEMM over experts, in every dtype it runs in, eager and under torch.compile.

``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` before it) multiplies the rows of
expert e (one contiguous block, ends at ``offs_E``) by ``w_EXY[e]``. Eager it runs float32
on the CPU, but its compile-time (fake) implementation accepts bf16 only, so under
torch.compile the experts go through the two custom ops below instead (``ExpertGroups.mm``
picks ``grouped_mm_op`` while compiling): each has a fake
implementation that only gives the output's shape, and the forward op carries its own
backward (input gradient: the same op on the transposed weights; weight gradient: the
second op), so the traced backward never meets the bf16-only check either. Shapes depend
only on P = N·K rows and E experts, never on the routing: a new routing never recompiles.
The custom ops serve bf16 too, where torch's op would trace: inside a compiled graph they
cost no measurable time over it (BENCHMARKS.md), and with one path the CPU tests cover
what the GPU runs.

Shape legend: P rows (sorted by expert), X in-features, Y out-features, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# On CUDA its fast kernel is bf16 on sm90/sm100; other dtypes and GPUs go to torch's own
# fallback, which copies the offsets to the host (a sync) and loops over groups.
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@torch.library.custom_op("smk::grouped_mm", mutates_args=())
def grouped_mm_op(a_PX: Tensor, w_EXY: Tensor, offs_E: Tensor) -> Tensor:
    return GROUPED_MM(a_PX, w_EXY, offs=offs_E)


@grouped_mm_op.register_fake
def _(a_PX: Tensor, w_EXY: Tensor, offs_E: Tensor) -> Tensor:
    return a_PX.new_empty(a_PX.shape[0], w_EXY.shape[-1])


@torch.library.custom_op("smk::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(a_PX: Tensor, g_PY: Tensor, offs_E: Tensor) -> Tensor:
    """``[E, X, Y]``: expert e's ``a[rows]ᵀ g[rows]`` (an expert without rows gets zeros)."""
    return GROUPED_MM(a_PX.t(), g_PY, offs=offs_E)


@_grouped_mm_wgrad.register_fake
def _(a_PX: Tensor, g_PY: Tensor, offs_E: Tensor) -> Tensor:
    return a_PX.new_empty(offs_E.shape[0], a_PX.shape[1], g_PY.shape[1])


def _setup(ctx, inputs, output) -> None:
    a_PX, w_EXY, offs_E = inputs
    ctx.save_for_backward(a_PX, w_EXY, offs_E)


def _backward(ctx, g_PY: Tensor):
    a_PX, w_EXY, offs_E = ctx.saved_tensors
    ga = grouped_mm_op(g_PY, w_EXY.transpose(-2, -1).contiguous(), offs_E) if ctx.needs_input_grad[0] else None
    gw = _grouped_mm_wgrad(a_PX, g_PY, offs_E) if ctx.needs_input_grad[1] else None
    return ga, gw, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup)
