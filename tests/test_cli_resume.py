"""A killed run keeps its progress and ``--ckpt_path last`` continues it where smk says it can.

SIGKILL after the first validation (which writes ``last.ckpt``) leaves a checkpoint that
loads with ``weights_only=True``; ``smk fit ... --ckpt_path last`` resumes from its step, in
the same run directory (one event directory, each step logged once, the killed process's
later events purged), validates the final step, and finishes. An explicit checkpoint of that
run continues it too. Also: the time trigger, and that a failed write leaves the old file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from smk_lightning.callbacks.checkpoint import AtomicCheckpointIO
from smk_lightning.cli import main
from smk_lightning.data import SMKDataModule

ROOT = Path(__file__).parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
VAL_EVERY = 4
START_TIMEOUT_S = 120


class RecordSteps(L.Callback):
    """Appends ``["start", global_step]`` at the first training batch and ``["save", global_step]``
    at every checkpoint write to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._started = False

    def _write(self, *item) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(item) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._started:
            self._started = True
            self._write("start", trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._write("save", trainer.global_step)


def recorded(path: Path) -> list[tuple[str, int]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


def callbacks_arg(path: Path) -> str:
    return json.dumps([{"class_path": f"{__name__}.RecordSteps", "init_args": {"path": str(path)}}])


def common(cache: Path) -> list[str]:
    return ["--config", SMOKE, "--data.cache_dir", str(cache), "--samples.every_n_steps", "0",
            "--trainer.val_check_interval", str(VAL_EVERY), "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1"]


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # every event file, purges applied
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A subprocess fit killed with SIGKILL once last.ckpt exists; returns (root, cache, run_dir)."""
    root = tmp_path_factory.mktemp("killed")
    cache = root / "cache"
    data = yaml.safe_load(Path(SMOKE).read_text()).get("data", {})
    SMKDataModule(**{**data, "cache_dir": str(cache)}).prepare_data()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "smk_lightning.cli", "fit", *common(cache), "--trainer.max_steps", "100000"]
    run_dir = root / "lightning_logs" / "smoke" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(root / "out.txt", "w") as out:
        p = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not last.is_file() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # into the next steps: the kill lands anywhere, maybe mid-write
            assert p.poll() is None, "exited early:\n" + (root / "out.txt").read_text()[-3000:]
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert last.is_file(), "no last.ckpt after the first validation:\n" + (root / "out.txt").read_text()[-3000:]
    return root, cache, run_dir


def test_sigkill_leaves_a_safe_loadable_checkpoint(killed):
    _, _, run_dir = killed
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] >= VAL_EVERY and ck["global_step"] % VAL_EVERY == 0, ck["global_step"]
    assert ck["state_dict"] and ck["optimizer_states"] and "smk_state" in ck


@pytest.fixture(scope="module")
def resumed(killed):
    root, cache, run_dir = killed
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    final = saved + VAL_EVERY - 1  # not a multiple of the validation interval
    cwd = Path.cwd()
    os.chdir(root)
    try:
        main(["fit", *common(cache), "--trainer.max_steps", str(final), "--ckpt_path", "last",
              "--trainer.callbacks", callbacks_arg(root / "resume.jsonl")])
        # an explicit checkpoint of this run continues it as well
        main(["fit", *common(cache), "--trainer.max_steps", str(final + 2),
              "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
              "--trainer.callbacks", callbacks_arg(root / "explicit.jsonl")])
    finally:
        os.chdir(cwd)
    return root, run_dir, saved, final


def test_resume_last_continues_from_the_killed_step(resumed):
    root, run_dir, saved, final = resumed
    events = recorded(root / "resume.jsonl")
    assert events[0] == ("start", saved)
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == final + 2  # after the explicit-path fit
    assert recorded(root / "explicit.jsonl")[0] == ("start", final)


def test_resumed_runs_log_into_the_same_run_directory(resumed):
    root, run_dir, saved, final = resumed
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 3
    # one value per optimizer step, none missing: the killed process's events after the
    # checkpoint are purged (whatever step axis the module logs on)
    steps = scalar_steps(run_dir, "train/loss")
    assert len(steps) == final + 2 and steps == list(range(steps[0], steps[0] + final + 2)), steps
    assert list(run_dir.glob("checkpoints/*.ckpt")) == [run_dir / "checkpoints" / "last.ckpt"]


def test_final_step_is_validated(resumed):
    _, run_dir, _, final = resumed
    train_steps = scalar_steps(run_dir, "train/loss")  # one per optimizer step 1 .. final + 2
    val_steps = scalar_steps(run_dir, "val/loss")
    # at the step where each fit's last train/loss is logged, though final is no multiple of VAL_EVERY
    assert train_steps[final - 1] in val_steps and val_steps[-1] == train_steps[-1]
    assert val_steps == sorted(set(val_steps))


def test_time_interval_writes_last_ckpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", SMOKE, "--data.cache_dir", str(tmp_path / "cache"), "--samples.every_n_steps", "0",
          "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false",
          "--checkpoint.train_time_interval", "0:00:00", "--trainer.callbacks", callbacks_arg(tmp_path / "r.jsonl")])
    # every step boundary (interval 0), and nothing more at the end: step 3 is already saved
    assert [s for kind, s in recorded(tmp_path / "r.jsonl") if kind == "save"] == [1, 2, 3]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
