"""Statistics of a training step, from what ``MoELayer`` captured in the forward and the
upstream gradient its output hook caught in the one main backward.

An engine that declares ``from_capture`` (ghost: ``stats.ghost.ghost_step``) fills the
step from the capture itself; the others recompute everything from the captured input
and gradient. The probe rows are a fixed count round(ρN), so every shape is static.

Host syncs: none on a GPU with the ghost engine (``ghost_step`` has static shapes; the
probe rows are drawn on the CPU and copied to the device without a sync). The vmap and loop engines
select their pairs with ``nonzero`` (a sync per layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from smk_lightning.model.moe import MoELayer
from smk_lightning.model.precision import acc_dtype
from smk_lightning.stats.engines import Engine
from smk_lightning.stats.scopes import probe_index, scope_mask


@torch.no_grad()
def step_stats(layer: MoELayer, engine: Engine, scope: str, probe_fraction: float | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(M_A, M_G, mask) ``[N, E]`` for the layer's captured step; ``engine`` is an
    ``Engine``; one that declares ``from_capture`` (ghost) is given the capture, and the
    count of pairs it had to leave out of ``mask`` is kept in ``capture.dropped_pairs``."""
    cap = layer.capture
    if cap is None or cap.missing_hooks():
        raise RuntimeError(
            "no complete captured forward/backward on this MoE layer "
            f"({'no capture' if cap is None else 'hooks that did not fire: ' + ', '.join(cap.missing_hooks())}): "
            "set layer.capture_stats, run the forward and a backward that reaches every expert weight, "
            "then call step_stats"
        )
    with torch.autocast(cap.x_ND.device.type, enabled=False):  # docs/design.md: float32 or wider
        return _step_stats(layer, cap, engine, scope, probe_fraction, generator)


def _step_stats(layer: MoELayer, cap, engine: Engine, scope: str, probe_fraction: float | None,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    routing, E = cap.routing, layer.num_experts
    N = routing.topi_NK.shape[0]
    rows_R = probe_index(N, probe_fraction, generator, cap.x_ND.device) if scope == "probe" else None
    mask_NE = scope_mask(routing.topi_NK, E, scope, probe_fraction, generator, rows_R=rows_R)
    dt = acc_dtype(cap.ma_P, cap.grad_ND)  # float32+ (grad_ND is bf16 under autocast)
    M_A = torch.full(mask_NE.shape, float("nan"), dtype=dt, device=mask_NE.device)
    M_G = M_A.clone()
    if engine.from_capture is not None:
        cap.dropped_pairs = engine.from_capture(layer, cap, scope, rows_R, M_A, M_G, mask_NE)
    else:
        engine.fill(layer, cap.x_ND, cap.upstream(dt), mask_NE, M_A, M_G)
    return M_A, M_G, mask_NE
