"""Statistics of a training step, from what ``MoELayer`` captured in the forward and what
the one main backward left in the capture's sinks.

An engine that declares ``from_capture`` (ghost: ``stats.ghost.ghost_step``) fills the
step from the captures themselves, every layer of one shape in one call (on a GPU each op
costs a launch, whatever its size); the others recompute everything from the captured
input and gradient, layer by layer. The probe rows are a fixed count round(ρN), so every
shape is static.

Host syncs: none on a GPU with the ghost engine (``ghost_step`` has static shapes; the
probe rows are drawn on the CPU and copied to the device without a sync). The vmap and
loop engines select their pairs with ``nonzero`` (a sync per layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from smk_lightning.model.moe import MoELayer
from smk_lightning.model.precision import acc_dtype
from smk_lightning.stats.engines import Engine
from smk_lightning.stats.scopes import probe_rows, scope_mask


@torch.no_grad()
def step_stats(layer: MoELayer, engine: Engine, scope: str, probe_fraction: float | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(M_A, M_G, mask) ``[N, E]`` for the layer's captured step (``layers_stats`` of one layer)."""
    return layers_stats([layer], engine, scope, probe_fraction, [generator])[0]


@torch.no_grad()
def layers_stats(layers: list[MoELayer], engine: Engine, scope: str, probe_fraction: float | None,
                 generators: list[torch.Generator | None]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(M_A, M_G, mask) ``[N, E]`` of each layer's captured step (``generators[i]`` draws
    layer i's probe rows). ``engine`` is an ``Engine``; one that declares ``from_capture``
    (ghost) is given the captures of all layers of one shape at once (the results are views
    of ``[L, N, E]`` tensors), and the count of pairs it had to leave out of ``mask`` is
    kept in each ``capture.dropped_pairs``."""
    for layer in layers:
        cap = layer.capture
        if cap is None or cap.missing_grads():
            raise RuntimeError(
                "no complete captured forward/backward on this MoE layer "
                f"({'no capture' if cap is None else 'sinks without a gradient: ' + ', '.join(cap.missing_grads())}): "
                "set layer.capture_stats, run the forward and a backward that reaches the capture's sinks "
                "(loss.backward(), or autograd with the sinks among its inputs), then call step_stats"
            )
    out: list = [None] * len(layers)
    if not layers:
        return out
    with torch.autocast(layers[0].capture.x_ND.device.type, enabled=False):  # docs/design.md: float32 or wider
        for idx in _groups(layers, batched=engine.from_capture is not None):
            group = [layers[i] for i in idx]
            for i, res in zip(idx, _group_stats(group, engine, scope, probe_fraction, [generators[i] for i in idx])):
                out[i] = res
    return out


def _groups(layers: list[MoELayer], batched: bool) -> list[list[int]]:
    """Indices of layers whose statistics can be computed together: one shape, dtype,
    device and loss scale (every MoE layer of a model); each layer alone unless ``batched``."""
    if not batched:
        return [[i] for i in range(len(layers))]
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        cap = layer.capture
        key = (tuple(cap.routing.topi_NK.shape), layer.num_experts, layer.d_ff, _dtype(cap), cap.x_ND.device,
               id(cap.grad_scale))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _dtype(cap) -> torch.dtype:
    return acc_dtype(cap.ma_P, cap.grad_ND)  # float32+


def _group_stats(layers: list[MoELayer], engine: Engine, scope: str, probe_fraction: float | None,
                 generators: list[torch.Generator | None]) -> list[tuple[Tensor, Tensor, Tensor]]:
    caps = [layer.capture for layer in layers]
    topi_LNK = torch.stack([cap.routing.topi_NK for cap in caps])
    L, N, _ = topi_LNK.shape
    rows_LR = probe_rows(N, probe_fraction, generators, topi_LNK.device) if scope == "probe" else None
    mask_LNE = scope_mask(topi_LNK, layers[0].num_experts, scope, probe_fraction, rows_R=rows_LR)
    dt = _dtype(caps[0])
    M_A = torch.full(mask_LNE.shape, float("nan"), dtype=dt, device=mask_LNE.device)
    M_G = M_A.clone()
    if engine.from_capture is not None:
        dropped_L = engine.from_capture(layers, topi_LNK, scope, rows_LR, M_A, M_G, mask_LNE)
        for i, cap in enumerate(caps):
            cap.dropped_pairs = dropped_L[i]
    else:
        (layer,), (cap,) = layers, caps
        engine.fill(layer, cap.x_ND, cap.upstream(dt), mask_LNE[0], M_A[0], M_G[0])
    return [(M_A[i], M_G[i], mask_LNE[i]) for i in range(L)]
