"""`smk fit` stopped by a signal: SIGINT (GracefulInterrupt: stop at the step boundary) and
SIGTERM (Lightning + ModelCheckpoint save_on_exception) end the process with a non-zero
status and leave a loadable checkpoint; after SIGKILL every *.ckpt on disk loads
(checkpoints are never half-written). The three runs go side by side to stay fast."""

from __future__ import annotations

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

from smk_lightning.data import SMKDataModule

ROOT = Path(__file__).parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
START_TIMEOUT_S = 45
EXIT_TIMEOUT_S = 30


class Heartbeat(L.Callback):
    """Writes the global step to ``path`` after every training batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.write(str(trainer.global_step))
        os.replace(tmp, self.path)


def step_of(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return -1


def launch(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    run_dir.mkdir()
    cb = f'[{{"class_path": "tests.test_signals.Heartbeat", "init_args": {{"path": "{run_dir / "beat"}"}}}}]'
    cmd = [sys.executable, "-m", "smk_lightning.cli", "fit", "--config", SMOKE, "--data.cache_dir", str(cache),
           "--trainer.max_steps", "100000", "--trainer.enable_progress_bar", "false",
           "--samples.every_n_steps", "0", "--trainer.limit_val_batches", "0",
           "--trainer.callbacks", cb, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=(run_dir / "out.txt").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def ckpts(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    cache = root / "cache"
    # corpus + tokenizer once, here, so the three runs do not race to build them
    data = yaml.safe_load(Path(SMOKE).read_text()).get("data", {})
    SMKDataModule(**{**data, "cache_dir": str(cache)}).prepare_data()
    plan = {
        "int": (signal.SIGINT, 3, []),
        "term": (signal.SIGTERM, 3, []),  # the CLI's default: checkpoint.save_on_exception=true
        "kill": (signal.SIGKILL, 4, ["--checkpoint.every_n_train_steps", "1"]),
    }
    procs = {name: launch(root / name, cache, *extra) for name, (_, _, extra) in plan.items()}
    results = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = dict(plan)
        while pending and time.monotonic() < deadline:
            for name, (sig, at_step, _) in list(pending.items()):
                p = procs[name]
                if p.poll() is not None:
                    pending.pop(name)
                    results[name] = {"error": f"exited early with {p.returncode}"}
                elif step_of(root / name / "beat") >= at_step:
                    if sig == signal.SIGKILL:
                        time.sleep(0.15)  # land somewhere inside a step (a checkpoint is written every step)
                    sent_at = step_of(root / name / "beat")
                    p.send_signal(sig)
                    pending.pop(name)
                    results[name] = {"signal": sig, "sent_at_step": sent_at}
            time.sleep(0.05)
        for name in pending:
            results[name] = {"error": f"training did not reach step {plan[name][1]} in {START_TIMEOUT_S}s"}
        for name, p in procs.items():
            try:
                results[name]["rc"] = p.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                results[name]["rc"] = None
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name in procs:
        results[name]["out"] = (root / name / "out.txt").read_text(errors="replace")
        results[name]["dir"] = root / name
    return results


def check_graceful(res: dict, expected_rc: int) -> dict:
    assert "error" not in res, res.get("error", "") + "\n" + res["out"][-3000:]
    assert res["rc"] is not None, "the process did not exit after the signal:\n" + res["out"][-3000:]
    print(f"signal {res['signal']!r} at step {res['sent_at_step']}: exit code {res['rc']}")
    found = ckpts(res["dir"])
    assert found, "no checkpoint after the signal:\n" + res["out"][-3000:]
    loaded = {}
    for path in found:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        assert ck["global_step"] >= res["sent_at_step"] >= 1, (path.name, ck["global_step"])
        assert "smk_state" in ck and ck["state_dict"] and ck["optimizer_states"]
        loaded[path.name] = ck
    assert "last.ckpt" in loaded
    assert res["rc"] == expected_rc, f"exit code {res['rc']}\n" + res["out"][-3000:]
    return loaded


def test_sigint_exits_and_leaves_a_checkpoint(runs):
    # GracefulInterrupt: stop at the next step boundary, last.ckpt, exit 130
    check_graceful(runs["int"], expected_rc=130)
    assert "interrupted by Ctrl-C" in runs["int"]["out"]


def test_sigterm_exits_and_leaves_a_checkpoint(runs):
    # Lightning raises SIGTERMException (a SystemExit without a code) after the batch; smk
    # turns it into 143 so a scheduler sees an unfinished run
    check_graceful(runs["term"], expected_rc=143)
    assert "stopped by SIGTERM" in runs["term"]["out"]


def test_sigkill_leaves_only_loadable_checkpoints(runs):
    res = runs["kill"]
    assert "error" not in res, res.get("error", "") + "\n" + res["out"][-3000:]
    assert res["rc"] == -signal.SIGKILL
    found = ckpts(res["dir"])
    assert found, "every_n_train_steps=1 but no checkpoint on disk:\n" + res["out"][-3000:]
    for path in found:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        assert ck["global_step"] >= 1 and ck["state_dict"]
    ckpt_dir = found[0].parent
    leftovers = [p.name for p in ckpt_dir.iterdir() if p.suffix != ".ckpt"]
    print(f"SIGKILL at step {res['sent_at_step']}: {[p.name for p in found]}; other files: {leftovers}")
