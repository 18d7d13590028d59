"""SystemMonitor: ``memory/peak_mb``, ``throughput/tokens_per_s`` and ``throughput/data_wait_frac``."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch

from smk_lightning.callbacks.routing import log_now


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated on GPU; process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def data_wait_s(trainer) -> float | None:
    """Seconds the training loop has waited for batches so far, from a train loader that
    counts them (``wait_s``, as ``EpochStatefulDataLoader`` does); None otherwise.

    Timed inside the loader's ``next()`` rather than as the gap between two batch hooks: that
    gap also holds validation, checkpointing and other callbacks' work (text samples, figures).
    """
    wait = getattr(trainer.train_dataloader, "wait_s", None)
    return float(wait) if isinstance(wait, (int, float)) else None


class SystemMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int = 10) -> None:
        """Memory, throughput and time spent waiting for data.

        Args:
            log_every_n_steps: Log every n optimizer steps (throughput and data wait are averaged over them).
        """
        self.log_every = log_every_n_steps
        self._t0: float | None = None
        self._wait0: float | None = None
        self._tokens = 0

    def _start_interval(self, trainer) -> None:
        self._t0, self._wait0, self._tokens = time.perf_counter(), data_wait_s(trainer), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._start_interval(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch["input_ids"].numel()  # every micro-batch's tokens
        if not pl_module.step_state.boundary or trainer.global_step % self.log_every:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        logs = {"throughput/tokens_per_s": self._tokens * trainer.world_size / elapsed,
                "memory/peak_mb": peak_memory_mb(pl_module.device)}
        wait = data_wait_s(trainer)
        if wait is not None and self._wait0 is not None:
            logs["throughput/data_wait_frac"] = (wait - self._wait0) / elapsed
        log_now(trainer, logs, trainer.global_step)  # see routing.py: no stale repeats
        pl_module.log("throughput/tokens_per_s", logs["throughput/tokens_per_s"], prog_bar=True, logger=False)
        self._start_interval(trainer)
