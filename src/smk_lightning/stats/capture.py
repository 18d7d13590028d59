"""``StatsCapture``: owns the statistics capture of one forward/backward pass.

In the spirit of Opacus's ``GradSampleModule``, one object is responsible for
everything the per-token statistics depend on besides the weights:

- **lifetime** — it switches capture on for the MoE layers on entry and drops every
  captured tensor on exit (also on an exception), so nothing outlives the step;
- **loss reduction** — the sinks get ∂(loss / accum · loss_scale)/∂o with a mean loss
  over the rank's ``n_tokens``; docs/design.md wants ḡ of the *sum* loss, so the captured
  gradients are multiplied by ``n_tokens · accum / loss_scale`` (``loss_scale`` is the
  16-mixed GradScaler's scale, 1 otherwise). ``n_tokens`` is a tensor: no host sync;
- **completeness** — every sink of every layer must have a gradient after the backward,
  otherwise ``check()`` names the layer and the sinks without one (validation, which must
  not touch ``.grad`` of the weights, differentiates with ``inputs=sinks()``);
- **precision and randomness** — ``stats()`` runs with autocast off (float32 or wider,
  whatever the trainer's precision) and draws the probe rows of each layer from
  ``probe_generator``, a pure function of (seed, stream, step, micro-batch, layer, rank).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from smk_lightning.model.moe import MoELayer
from smk_lightning.stats.engines import Engine
from smk_lightning.stats.step import layers_stats

# Streams of probe draws: training and validation never share one (docs/design.md, randomness).
TRAIN_STREAM, VAL_STREAM = 0, 1


def probe_generator(seed: int, stream: int, step: int, micro: int, layer: int, rank: int) -> torch.Generator:
    """A CPU generator seeded by a pure function of its arguments (no state to checkpoint)."""
    # hash() of a tuple of ints is deterministic across processes (only str hashing is salted).
    key = hash((seed, stream, step, micro, layer, rank)) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator().manual_seed(key)


class StatsCapture:
    """Context manager over a forward + backward whose statistics are wanted.

    Usage::

        with StatsCapture(layers) as cap:
            loss = lm_loss(model(x), y)
            loss.backward()
            cap.set_grad_scale(n_tokens=..., accum=1, loss_scale=1.0)
            for name, (M_A, M_G, mask) in cap.stats(engine, scope, rho, generator_of).items():
                ...
    """

    def __init__(self, layers: Mapping[str, MoELayer]) -> None:
        self.layers = dict(layers)

    def __enter__(self) -> StatsCapture:
        for layer in self.layers.values():
            layer.clear_capture()
            layer.capture_stats = True
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers.values():
            layer.capture_stats = False
            layer.clear_capture()

    def sinks(self) -> list[Tensor]:
        """Every captured layer's sink leaves (for ``loss.backward(inputs=...)``)."""
        return [t for layer in self.layers.values() if layer.capture is not None for t in layer.capture.sinks.tensors()]

    def set_grad_scale(self, n_tokens: Tensor | float, accum: int = 1, loss_scale: Tensor | float = 1.0) -> None:
        """The sinks got the gradient of ``mean loss / accum × loss_scale``: undo both."""
        scale = n_tokens * accum / loss_scale
        for layer in self.layers.values():
            if layer.capture is not None:
                layer.capture.grad_scale = scale

    def check(self) -> None:
        """Raise if a layer was not captured or one of its sinks got no gradient."""
        for name, layer in self.layers.items():
            cap = layer.capture
            if cap is None:
                raise RuntimeError(f"statistics capture: MoE layer {name} was not run with capture on")
            missing = cap.missing_grads()
            if missing:
                raise RuntimeError(
                    f"statistics capture: the backward did not reach {', '.join(missing)} of MoE layer {name}; "
                    "call loss.backward(), or pass the capture's sinks() as its inputs"
                )

    def stats(self, engine: Engine, scope: str, probe_fraction: float | None,
              generator_of: Callable[[int], torch.Generator]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """{name: (M_A, M_G, mask)} per layer (``layers_stats`` runs with autocast off);
        ``generator_of(i)`` gives the probe generator of the i-th MoE layer."""
        self.check()
        gens = [generator_of(i) if scope == "probe" else None for i in range(len(self.layers))]
        return dict(zip(self.layers, layers_stats(list(self.layers.values()), engine, scope, probe_fraction, gens)))

    def dropped_pairs(self) -> Tensor | None:
        """Routed pairs of all layers left out of this step's statistics (``ghost_step``: a
        weight too small to divide out, beyond the recompute budget), as a device tensor; None
        when ``stats()`` has not run or its engine drops none."""
        counts = [layer.capture.dropped_pairs for layer in self.layers.values()
                  if layer.capture is not None and layer.capture.dropped_pairs is not None]
        return torch.stack(counts).sum() if counts else None
