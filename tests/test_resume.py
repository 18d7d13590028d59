"""Exact resume (docs/design.md): a run of 2n steps and a run stopped after n steps then
resumed from its checkpoint give the same losses at every step and see the same batches
(CPU, float32, deterministic algorithms on; equal to 1e-6), eager and with
``model.compile: true``. Probe scope: the probe rows
are a pure function of the step, so nothing random needs to be checkpointed."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from smk_lightning.cli import main

SMOKE = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")
N_STEPS = 6


class StopAtStep(L.Callback):
    """Stops the fit after ``step`` optimizer steps; saves ``explicit.ckpt`` there too."""

    def __init__(self, step: int, explicit_dir: str | None = None) -> None:
        self.step = step
        self.explicit_dir = explicit_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not trainer.should_stop:
            trainer.should_stop = True
            if self.explicit_dir:
                trainer.save_checkpoint(str(Path(self.explicit_dir) / "explicit.ckpt"))


class RecordBatches(L.Callback):
    """Appends (global_step before the batch, a fingerprint of the batch) to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = batch["input_ids"].to(torch.int64)
        w = torch.arange(1, ids.numel() + 1, dtype=torch.int64).reshape(ids.shape)
        fp = [int(ids.sum()), int((ids * w).sum() % 1_000_000_007)]
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step, fp]) + "\n")


def callbacks_arg(record: Path, stop: int | None = None, explicit_dir: Path | None = None) -> str:
    cbs = [{"class_path": f"{__name__}.RecordBatches", "init_args": {"path": str(record)}}]
    if stop is not None:
        cbs.append({"class_path": f"{__name__}.StopAtStep",
                    "init_args": {"step": stop, "explicit_dir": str(explicit_dir) if explicit_dir else None}})
    return json.dumps(cbs)


def fit(root: Path, cache: Path, name: str, callbacks: str, *extra: str) -> None:
    main(["fit", "--config", SMOKE, "--data.cache_dir", str(cache),
          "--trainer.max_steps", str(2 * N_STEPS), "--trainer.deterministic", "true",
          "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.val_check_interval", "1000", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--samples.every_n_steps", "0",
          "--trainer.logger.init_args.save_dir", str(root / "logs"), "--trainer.logger.init_args.name", name,
          "--model.stats.scope", "probe", "--model.stats.probe_fraction", "0.25",
          "--trainer.callbacks", callbacks, *extra])


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    events = ea.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag} logged twice at a step in {run_dir}: {steps}"
    return {e.step: e.value for e in events}


def batches(path: Path) -> list[tuple[int, list[int]]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "compiled"])
def runs(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("resume")
    compiled = ("--model.model.compile", "true") if request.param else ()
    cache = root / "cache"
    cwd = Path.cwd()
    import os

    os.chdir(root)
    try:
        torch.use_deterministic_algorithms(False)
        fit(root, cache, "full", callbacks_arg(root / "full.jsonl"), *compiled)
        fit(root, cache, "first", callbacks_arg(root / "first.jsonl", N_STEPS, root), *compiled)
        first_dir = root / "logs" / "first" / "version_0"
        last = first_dir / "checkpoints" / "last.ckpt"
        resume_from = last if last.is_file() else root / "explicit.ckpt"
        fit(root, cache, "second", callbacks_arg(root / "second.jsonl"), "--ckpt_path", str(resume_from), *compiled)
    finally:
        os.chdir(cwd)
        torch.use_deterministic_algorithms(False)
    return root


def test_stopping_writes_last_ckpt_at_the_stop_step(runs):
    last = runs / "logs" / "first" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "should_stop at step n left no last.ckpt (ModelCheckpoint save_last)"
    ck = torch.load(last, map_location="cpu", weights_only=False)
    assert ck["global_step"] == N_STEPS
    assert "smk_state" in ck and ck["smk_state"]["micro"] == 0
    # the checkpoint written on stop holds the same state as one saved explicitly at that step
    explicit = torch.load(runs / "explicit.ckpt", map_location="cpu", weights_only=False)
    for k, v in explicit["state_dict"].items():
        assert torch.equal(v, ck["state_dict"][k]), k


def test_same_batches_no_skip_no_repeat(runs):
    full = batches(runs / "full.jsonl")
    halves = batches(runs / "first.jsonl") + batches(runs / "second.jsonl")
    assert [s for s, _ in full] == list(range(2 * N_STEPS))
    assert [s for s, _ in halves] == list(range(2 * N_STEPS)), "steps of the stopped + resumed run"
    assert [fp for _, fp in halves] == [fp for _, fp in full], "batches differ after resume"


@pytest.mark.parametrize("tag", ["train/loss", "train/smk_loss", "train/lr"])
def test_losses_equal_at_every_step(runs, tag):
    full = scalars(runs / "logs" / "full" / "version_0", tag)
    first = scalars(runs / "logs" / "first" / "version_0", tag)
    second = scalars(runs / "logs" / "second" / "version_0", tag)
    assert len(full) == 2 * N_STEPS, sorted(full)
    assert not set(first) & set(second), f"steps logged by both halves: {sorted(set(first) & set(second))}"
    halves = {**first, **second}
    assert sorted(halves) == sorted(full)
    for step in sorted(full):
        assert halves[step] == pytest.approx(full[step], abs=1e-6, rel=1e-6), (
            f"{tag} differs at step {step}: full {full[step]!r} vs resumed {halves[step]!r}")
