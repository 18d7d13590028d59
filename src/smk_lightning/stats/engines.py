"""The registry of statistics engines. Each engine declares what it computes with:

- ``fill(layer, x_ND, g_ND, mask_NE, M_A, M_G, **options)`` fills the masked entries of
  ``M_A``/``M_G`` [N, E] from a layer input and its upstream gradient (every engine);
- ``from_capture(layers, topi_LNK, scope, rows_LR, M_A, M_G, mask_LNE) -> dropped_L``,
  where given, fills a training step's statistics ``[L, N, E]`` of L layers of one shape
  from what they captured in their forward and backward (ghost), instead of recomputing
  them, without a host sync; pairs it cannot compute it clears from ``mask_LNE`` and
  counts in ``dropped_L`` (a device tensor, per layer);
- ``options``: the keyword options ``fill`` takes (vmap: ``chunk_size``).

``Engine.compiled()`` is the same engine with ``from_capture`` under ``torch.compile``
(fullgraph, static shapes: it has no host sync and no data-dependent shape); an engine
without ``from_capture`` recomputes with ``nonzero``-selected pairs and runs eager.

An unknown engine name raises; there is no fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, partial

import torch

from smk_lightning.stats.ghost import ghost_stats, ghost_step
from smk_lightning.stats.loop import loop_stats
from smk_lightning.stats.vmap import vmap_stats


@dataclass(frozen=True)
class Engine:
    name: str
    fill: Callable
    from_capture: Callable | None = None
    options: tuple[str, ...] = ()

    def __call__(self, layer, x_ND, g_ND, mask_NE, M_A, M_G) -> None:
        self.fill(layer, x_ND, g_ND, mask_NE, M_A, M_G)

    def compiled(self) -> Engine:
        """This engine with its ``from_capture`` compiled (itself if it has none)."""
        return self if self.from_capture is None else replace(self, from_capture=_compile(self.from_capture))


@cache  # one compiled function per engine function: its graphs are reused by every module
def _compile(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True, dynamic=False)


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine("ghost", ghost_stats, from_capture=ghost_step),
        Engine("vmap", vmap_stats, options=("chunk_size",)),
        Engine("loop", loop_stats),
    )
}


def get_engine(name: str, **options) -> Engine:
    """The engine called ``name``, with those of ``options`` it takes bound (others ignored:
    a config carries every engine's options)."""
    try:
        engine = ENGINES[name]
    except KeyError:
        raise ValueError(f"stats engine {name!r} does not exist; use one of {tuple(ENGINES)}") from None
    mine = {k: v for k, v in options.items() if k in engine.options}
    return replace(engine, fill=partial(engine.fill, **mine)) if mine else engine
