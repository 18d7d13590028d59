"""SystemMonitor: ``memory/peak_mb`` and ``throughput/tokens_per_s``."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated on GPU; process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class SystemMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int = 10) -> None:
        """Memory and throughput.

        Args:
            log_every_n_steps: Log every n training steps (throughput is averaged over them).
        """
        self.log_every = log_every_n_steps
        self._t0: float | None = None
        self._tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch["input_ids"].numel()
        if trainer.global_step % self.log_every:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._t0
        pl_module.log("throughput/tokens_per_s", self._tokens * trainer.world_size / max(elapsed, 1e-9),
                      prog_bar=True)
        pl_module.log("memory/peak_mb", peak_memory_mb(pl_module.device))
        self._t0, self._tokens = time.perf_counter(), 0
