"""The non-finite guard: the one host sync of a training step.

At each optimizer step every rank contributes whether its loss (and, without a GradScaler,
its gradients) stayed finite, and how many routed pairs its statistics had to leave out
(``stats.ghost.ghost_step``); one all-reduce and one read give every rank the same
decision — step, or skip and count — and the run's dropped-pair count for its warning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smk_lightning.training.distributed import all_reduce_sum


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps; ``limit`` in a row (0: never) means the run must stop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.skipped = 0
        self.consecutive = 0

    @staticmethod
    def decide(local_finite: Tensor, dropped: Tensor | None) -> tuple[bool, int]:
        """(every rank finite, pairs left out of the statistics on all ranks this step)."""
        # One value, so one read: the ranks with a non-finite step count in the high bits, the
        # dropped pairs (at most layers × tokens × top_k, far below 2^40) in the low ones.
        code = (~local_finite).to(torch.int64) * (1 << 40)
        if dropped is not None:
            code = code + dropped.to(torch.int64)
        code = int(all_reduce_sum(code).item())  # HOST SYNC: the one of the step
        return code >> 40 == 0, code & ((1 << 40) - 1)

    def stepped(self) -> None:
        self.consecutive = 0

    def skipped_one(self) -> bool:
        """Count a skipped step; True when the limit of skips in a row is reached."""
        self.skipped += 1
        self.consecutive += 1
        return bool(self.limit) and self.consecutive >= self.limit

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped, "consecutive_skips": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = state["skipped_steps"], state["consecutive_skips"]


def grads_finite(params, device: torch.device) -> Tensor:
    """Whether every gradient is finite (a 0-d bool on ``device``; no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack(torch._foreach_norm(grads)).isfinite().all()
