"""docs/design.md, randomness: validation, sanity checks and text sampling never change what
training computes. Smoke config, probe scope (probe rows drawn every step), 20 steps:

- validation (+ sanity check + samples) on vs off: the same training losses;
- with validation and samples on, 20 straight vs 10 + resume + 10: equal to 1e-6."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_resume import callbacks_arg, fit, scalars

STEPS = 20
VAL_ON = ("--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "5",
          "--trainer.num_sanity_val_steps", "2", "--samples.every_n_steps", "5", "--model.stats.val_batches", "2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("randomness")
    cache, cwd = root / "cache", Path.cwd()
    os.chdir(root)
    try:
        steps = ("--trainer.max_steps", str(STEPS))
        fit(root, cache, "val_off", callbacks_arg(root / "off.jsonl"), *steps)
        fit(root, cache, "val_on", callbacks_arg(root / "on.jsonl"), *steps, *VAL_ON)
        fit(root, cache, "first", callbacks_arg(root / "first.jsonl", STEPS // 2), *steps, *VAL_ON)
        last = root / "logs" / "first" / "version_0" / "checkpoints" / "last.ckpt"
        fit(root, cache, "second", callbacks_arg(root / "second.jsonl"), *steps, *VAL_ON, "--ckpt_path", str(last))
    finally:
        os.chdir(cwd)
    return root / "logs"


@pytest.mark.parametrize("tag", ["train/loss", "train/smk_loss"])
def test_validation_does_not_change_training(runs, tag):
    off, on = scalars(runs / "val_off" / "version_0", tag), scalars(runs / "val_on" / "version_0", tag)
    assert sorted(off) == sorted(on) == list(range(1, STEPS + 1))  # optimizer steps done
    for step in off:
        assert on[step] == pytest.approx(off[step], abs=1e-6, rel=1e-6), (tag, step)


@pytest.mark.parametrize("tag", ["train/loss", "train/smk_loss"])
def test_resume_with_validation_and_samples_is_exact(runs, tag):
    full = scalars(runs / "val_on" / "version_0", tag)
    halves = {**scalars(runs / "first" / "version_0", tag), **scalars(runs / "second" / "version_0", tag)}
    assert sorted(halves) == sorted(full) == list(range(1, STEPS + 1))
    for step in full:
        assert halves[step] == pytest.approx(full[step], abs=1e-6, rel=1e-6), (tag, step)


def test_validation_ran(runs):
    assert len(scalars(runs / "val_on" / "version_0", "val/g_acc")) >= 3
