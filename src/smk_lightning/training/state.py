"""The state a training step keeps between micro-batches and shows the callbacks.

``StepState``: what the last training micro-batch left for the callbacks — the one typed
record they read (``pl_module.step_state``), instead of reaching into the module.
``Accumulation``: the optimizer step being summed over micro-batches (its finite flag,
expert loads and logged sums), checkpointed mid-way so a resume continues it exactly.

Shape legend: N tokens of the micro-batch, E experts, K = top_k, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from smk_lightning.losses import smk_metrics


@dataclass
class LayerTargets:
    """One MoE layer's router against its ΔSC targets, for the metrics."""

    logits_NE: Tensor
    """The router's logits (detached) that smk_loss compared with the targets."""
    targets: tuple
    """The ΔSC targets (``losses.smk_targets``' per-layer tuple)."""
    top_k: int
    topi_NK: Tensor
    """The experts each token was routed to."""


@dataclass
class StepState:
    """What the last training micro-batch leaves for the callbacks. Filled only on a
    micro-batch that computed statistics (``stats`` and ``targets`` are empty otherwise, and
    validation never touches them)."""

    boundary: bool = True
    """The micro-batch ended an optimizer step: the callbacks act then, once per step."""
    stats: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    """(M_A, M_G, mask) ``[N, E]`` per MoE layer."""
    targets: dict[str, LayerTargets] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, Tensor]]:
        """g_acc, g_acc_dense, kl_div, topk_overlap, agreement per MoE layer; computed on
        demand (the callbacks log them every few steps, not every step)."""
        return {name: smk_metrics(t.logits_NE, t.targets, t.top_k, t.topi_NK) for name, t in self.targets.items()}


@dataclass
class Accumulation:
    """The optimizer step being accumulated over ``accum`` micro-batches."""

    accum: int
    micro: int = 0
    """Index of the current micro-batch within the step."""
    finite: Tensor | None = None
    """Every micro-batch loss of the step so far was finite (a 0-d bool on the device)."""
    load_LE: Tensor | None = None
    """Aux-free balancing: the step's expert loads so far, per layer."""
    logs: dict[str, tuple[Tensor, int]] = field(default_factory=dict)
    """train/* sums over the step's micro-batches, with their counts."""
    restored_grads: dict[str, Tensor] | None = None
    """Gradients of a mid-step checkpoint, put back by the next micro-batch (``restore``)."""

    @property
    def first(self) -> bool:
        return self.micro == 0

    @property
    def last(self) -> bool:
        return self.micro == self.accum - 1

    def add(self, finite: Tensor, load_LE: Tensor | None, logs: dict[str, Tensor]) -> None:
        """Fold one micro-batch in."""
        self.finite = finite if self.finite is None else self.finite & finite
        if load_LE is not None:
            self.load_LE = load_LE if self.load_LE is None else self.load_LE + load_LE
        for key, v in logs.items():
            total, n = self.logs.get(key, (0.0, 0))
            self.logs[key] = (total + v.detach(), n + 1)

    def advance(self) -> None:
        self.micro = 0 if self.last else self.micro + 1

    def take_finite(self) -> Tensor:
        finite, self.finite = self.finite, None
        return finite

    def take_load(self) -> Tensor | None:
        load, self.load_LE = self.load_LE, None
        return load

    def take_logs(self) -> dict[str, tuple[Tensor, int]]:
        logs, self.logs = self.logs, {}
        return logs

    def state_dict(self, named_params) -> dict:
        """What a checkpoint keeps: mid-way through a step, what was accumulated."""
        state: dict = {"micro": self.micro}
        if self.micro:
            state["finite"] = self.finite.cpu()
            state["grads"] = {n: p.grad.cpu() for n, p in named_params if p.grad is not None}
            if self.load_LE is not None:
                state["load"] = self.load_LE.cpu()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.micro = state.get("micro", 0)
        if self.micro:
            self.finite = state["finite"]
            self.load_LE = state.get("load")
            # Applied by the next training_step: the trainer's restore order would drop .grad set now.
            self.restored_grads = state["grads"]

    def restore(self, named_params, device: torch.device) -> None:
        """After a mid-step resume: put back what the first micro-batches accumulated."""
        if self.restored_grads is None:
            return
        grads, self.restored_grads = self.restored_grads, None
        params = dict(named_params)
        for n, g in grads.items():
            params[n].grad = g.to(params[n].device, params[n].dtype)
        self.finite = self.finite.to(device)
        if self.load_LE is not None:
            self.load_LE = self.load_LE.to(device)
