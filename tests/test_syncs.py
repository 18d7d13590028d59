"""Host–device syncs of a training step: one per optimizer step (the skip decision), logging
aside. On the CPU the ``HostSyncs`` detector (tests/syncs.py) records every op that would
make the host wait on a GPU; on a GPU, ``torch.cuda.set_sync_debug_mode`` counts the real ones."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from smk_lightning.callbacks import RouterMonitor, SystemMonitor
from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import SMKModule
from tests.helpers import RandomDataModule, tiny_model
from tests.syncs import HostSyncs

# The callbacks log every 1000 steps: logging reads values on the host by design ("logging aside").
QUIET = 1000


def _module(scope: str, loss: str, accum: int = 1) -> SMKModule:
    torch.manual_seed(0)
    return SMKModule(model=tiny_model(d_model=16, d_ff=32), optim=OptimConfig(accumulate_grad_batches=accum),
                     stats=StatsConfig(scope=scope, val_batches=0), router=RouterConfig(loss=loss))


class RecordSteps(L.Callback):
    """The would-be syncs of each training batch, from batch start to batch end (the module's
    training_step with its optimizer step, Lightning's loop around it, the callbacks' hooks)."""

    def __init__(self, detector) -> None:
        self.detector, self.per_batch, self._on = detector, [], None

    def on_train_batch_start(self, *args) -> None:
        self._on = self.detector()
        self._on.__enter__()

    def on_train_batch_end(self, *args) -> None:
        self._on.__exit__(None, None, None)
        self.per_batch.append(self._on.hits)


def _fit(module: SMKModule, detector, steps: int, accelerator: str = "cpu", precision: str = "32-true"):
    rec = RecordSteps(detector)
    # the recorder first: its batch-end hook closes the window after the other callbacks' hooks
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, precision=precision,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=QUIET,
                        callbacks=[RouterMonitor(QUIET, QUIET), SystemMonitor(QUIET), rec])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, RandomDataModule(n=32))
    return rec.per_batch


def _not_optimizer(hits):
    # torch.optim's Adam reads its step counters with .item(): CPU tensors on a GPU too
    # (unless capturable/fused), so no device sync there. Lightning registers each key the
    # module self.logs the first time it is logged (a state made from a Python float, once per
    # run; self.log runs on the last step here, log_every_n_steps being QUIET).
    return [h for h in hits if "optim/adam" not in h[1] and "optim/optimizer" not in h[1]
            and not (h[0].startswith("aten.lift_fresh") and "logger_connector/result.py" in h[1])]


@pytest.mark.parametrize("loss", ["smk", "switch", "auxfree"])
@pytest.mark.parametrize("scope", ["probe", "routed", "dense"])
def test_one_host_sync_per_training_step(scope, loss):
    per_batch = [_not_optimizer(h) for h in _fit(_module(scope, loss), HostSyncs, steps=3)]
    for hits in per_batch[1:]:  # step 0 may set up state
        assert len(hits) == 1, hits
        assert "guard.py" in hits[0][1] and "module.py" in hits[0][1], hits  # the skip decision


def test_one_host_sync_per_optimizer_step_with_accumulation():
    per_batch = [_not_optimizer(h) for h in _fit(_module("probe", "smk", accum=2), HostSyncs, steps=3)]
    micro = [len(h) for h in per_batch]
    assert micro[2:] == [0, 1, 0, 1], per_batch  # the skip decision at each step's last micro-batch


class CudaSyncs:
    """``torch.cuda.set_sync_debug_mode('warn')`` over a window; ``hits``: its warnings."""

    def __enter__(self):
        torch.cuda.synchronize()
        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        # Lightning's own code (its loops, progress tracking) is not ours to count; the
        # project's code — smk_lightning/, which contains "lightning" too — is.
        self.hits = [(str(w.message), f"{w.filename}:{w.lineno}") for w in self._seen
                     if "synchroniz" in str(w.message)
                     and not any(k in w.filename for k in ("/lightning/pytorch/", "/lightning/fabric/"))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scope", ["probe", "routed", "dense"])
def test_one_cuda_sync_per_training_step_on_gpu(scope):
    """The same on a GPU in bf16-mixed (grouped_mm's bf16 path), counted by CUDA itself."""
    try:
        per_batch = _fit(_module(scope, "smk"), CudaSyncs, steps=3, accelerator="gpu", precision="bf16-mixed")
    finally:
        torch.cuda.set_sync_debug_mode("default")  # also when a step raised inside the window
    for hits in per_batch[1:]:
        assert len(hits) == 1 and "guard.py" in hits[0][1], hits  # the skip decision
