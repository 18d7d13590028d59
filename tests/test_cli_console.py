"""What ``smk fit`` prints: plain progress lines when stdout is piped, a step-counting bar on a
terminal, no third-party noise on stderr, no placeholder TensorBoard tags; and the final
step is validated when max_steps is not a multiple of val_check_interval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from smk_lightning.callbacks.console import format_duration
from smk_lightning.cli import main

ROOT = Path(__file__).parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
MAX_STEPS, VAL_EVERY, LOG_EVERY = 7, 5, 2


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    root = tmp_path_factory.mktemp("piped")
    cmd = [sys.executable, "-m", "smk_lightning.cli", "fit", "--config", SMOKE, "--data.cache_dir", str(root / "cache"),
           "--trainer.max_steps", str(MAX_STEPS), "--trainer.val_check_interval", str(VAL_EVERY),
           "--trainer.log_every_n_steps", str(LOG_EVERY), "--trainer.limit_val_batches", "1",
           "--samples.every_n_steps", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return root / "lightning_logs" / "smoke" / "version_0", p.stdout, p.stderr


def test_piped_stdout_gets_plain_progress_lines(piped):
    _, out, _ = piped
    lines = out.splitlines()
    train = [ln for ln in lines if re.fullmatch(r"step \d+/7 \| loss \d+\.\d{3} .*\| ETA \S+", ln)]
    assert [int(ln.split()[1].split("/")[0]) for ln in train] == [2, 4, 6, 7], out
    assert "tok/s" in train[-1] and "val loss" in train[-1] and "g_acc_dense" in train[-1] and "(chance 0.25)" in train[-1]
    val = [ln for ln in lines if re.match(r"step \d+/7 \| val loss \d+\.\d{3} \| val ppl", ln)]
    assert [ln.split()[1] for ln in val] == ["5/7", "7/7"], out
    assert "\r" not in out and "Epoch" not in out and "v_num" not in out  # no progress bar in a file


def test_no_third_party_noise(piped):
    _, _, err = piped
    for noise in ("Traceback", "litlogger", "💡", "FLOPs", "deprecated", "Trainer already configured"):
        assert noise not in err, f"{noise!r} on stderr:\n{err}"
    assert re.search(r"model: [\d.]+ K parameters", err)


def test_no_placeholder_tags_and_the_last_step_is_validated(piped):
    run_dir, _, _ = piped
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert "hp_metric" not in tags and "epoch" not in tags
    train_steps = [e.step for e in ea.Scalars("train/loss")]  # one per optimizer step (log_every_n_steps 2)
    val_steps = [e.step for e in ea.Scalars("val/loss")]
    # validated at step 5 and at the final step 7 (not a multiple of 5), logged at the final step's position
    assert len(val_steps) == 2 and val_steps[-1] == train_steps[-1]


def test_terminal_bar_counts_optimizer_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bar = json.dumps([{"class_path": "smk_lightning.callbacks.StepProgressBar"}])
    main(["fit", "--config", SMOKE, "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "3",
          "--trainer.limit_val_batches", "0", "--samples.every_n_steps", "0", "--trainer.callbacks", bar])
    out = capsys.readouterr().out
    assert re.search(r"step\s.*3/3", out), out
    assert "Epoch" not in out and "v_num" not in out
    assert not re.search(r"^step \d+/3 \|", out, re.M), "plain lines printed although a bar is shown"


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59, "59s"), (312, "5m12s"), (3725, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
