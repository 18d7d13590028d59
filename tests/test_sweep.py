"""smk-sweep: argument handling and resume decisions (no training), and one real tiny
sweep (2 arms × 2 seeds of the smoke config, a few steps each) that is run again to
check that finished runs are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from smk_lightning.tools.sweep import fit_command, main, parse_sets, plan, thread_env

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
# every run: 2 steps, logged every step, one validation at the end, no text samples
TINY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "samples.every_n_steps=0",
        "router_monitor.log_every_n_steps=1", "system_monitor.log_every_n_steps=1"]


def _rows(md: str) -> dict[str, dict[str, str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ")]
    header, *body = rows
    return {r[0]: dict(zip(header, r)) for r in body}


def test_sweep_runs_reports_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the data cache of the runs lands here
    out = tmp_path / "sweep"
    argv = [str(SMOKE), str(SMOKE), "--names", "a", "b", "--seeds", "2", "--out", str(out),
            "--set", *TINY, "--set", "b:model.router.balance_weight=0", "--jobs", "2"]
    main(argv)
    out_lines = capsys.readouterr().out.splitlines()
    # two runs side by side: the second starts before the first finishes
    assert [line.split(":", 1)[1].split()[0] for line in out_lines[:2]] == ["running", "running"], out_lines

    rows = _rows((out / "report.md").read_text())
    assert set(rows) == {"a", "b"}
    for row in rows.values():
        assert row["n"] == "2"
        assert "±" in row["val loss"] and "±" in row["val ppl"], row
        # the report reads the tags training logs (g_acc_dense and domain NMI may be absent)
        for col in ("kl_div", "load max share", "dead experts", "tokens/s", "router entropy", "agreement"):
            assert "±" in row[col] and "of" not in row[col], (col, row)
        assert len(row["per run"].split()) == 2  # seed 0's and seed 1's val loss
        assert row["route change"] == "—"  # one validation: nothing to compare with
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # the arm override reached b's runs only
    cfg = {arm: yaml.safe_load((out / "runs" / arm / "seed1" / "config.yaml").read_text())
           for arm in ("a", "b")}
    assert cfg["a"]["model"]["router"]["balance_weight"] == 1.0
    assert cfg["b"]["model"]["router"]["balance_weight"] == 0.0
    assert cfg["b"]["seed_everything"] == 1 and cfg["b"]["model"]["stats"]["seed"] == 1

    events = {p: p.stat().st_mtime_ns for p in out.rglob("events.out.tfevents.*")}
    assert len(events) == 4
    capsys.readouterr()
    main(argv)  # everything finished: nothing is run again
    assert capsys.readouterr().out.count("skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("events.out.tfevents.*")} == events
    assert set(_rows((out / "report.md").read_text())) == {"a", "b"}


def _state(run_dir: Path, command: list[str], done: bool, ckpt: bool) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "sweep.json").write_text(json.dumps({"command": command, "done": done}))
    if ckpt:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")


def test_plan(tmp_path):
    cmd = fit_command([SMOKE], 0, tmp_path, "a", ["--trainer.max_steps", "6"])
    assert cmd[-2:] == ["--trainer.max_steps", "6"] and "--model.stats.seed" in cmd
    assert plan(tmp_path / "none", cmd) == "fresh"
    _state(tmp_path / "done", cmd, done=True, ckpt=True)
    assert plan(tmp_path / "done", cmd) == "skip"
    _state(tmp_path / "cut", cmd, done=False, ckpt=True)
    assert plan(tmp_path / "cut", cmd) == "resume"
    _state(tmp_path / "early", cmd, done=False, ckpt=False)
    assert plan(tmp_path / "early", cmd) == "fresh"
    assert plan(tmp_path / "done", cmd[:-1] + ["12"]) == "conflict"
    (tmp_path / "foreign").mkdir()  # someone else's files: never deleted
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    assert plan(tmp_path / "foreign", cmd) == "conflict"


def test_thread_env_shares_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert thread_env(1) is None
    assert thread_env(2)["OMP_NUM_THREADS"] == "4"
    assert thread_env(16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the caller's choice wins
    assert thread_env(2) is None


def test_parse_sets():
    got = parse_sets(["trainer.max_steps=6", "b:model.router.loss=switch", "--x=a=b"], ["a", "b"])
    assert got["a"] == ["--trainer.max_steps", "6", "--x", "a=b"]
    assert got["b"] == ["--trainer.max_steps", "6", "--model.router.loss", "switch", "--x", "a=b"]


@pytest.mark.parametrize("args, words", [
    ([], "required: CONFIG"),
    ([str(SMOKE), "--seeds", "two"], "invalid int value"),
    ([str(SMOKE), str(SMOKE), "--names", "a"], "--names got 1 names for 2 configs"),
    (["nope.yaml"], "nope.yaml: no such config file"),
    ([str(SMOKE), str(SMOKE)], "arm names must differ"),
    ([str(SMOKE), "--names", "x/y"], "not a plain file name"),
    ([str(SMOKE), "--seeds", "0"], "--seeds=0"),
    ([str(SMOKE), "--jobs", "0"], "--jobs=0"),
    ([str(SMOKE), "--set", "trainer.max_steps"], "expected key=value"),
    ([str(SMOKE), "--set", "c:trainer.max_steps=3"], "no arm named 'c'"),
])
def test_bad_input(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smk-sweep: error:") and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_conflicting_run_dir(tmp_path, capsys):
    out = tmp_path / "out"
    _state(out / "runs" / "smoke" / "seed0", ["fit", "something else"], done=True, ckpt=False)
    with pytest.raises(SystemExit) as exc:
        main([str(SMOKE), "--seeds", "1", "--out", str(out)])
    assert exc.value.code == 2
    assert "made by a different command" in capsys.readouterr().err


def test_steps_validate_often_enough_for_a_curve():
    """--steps N validates at least 5 times, at a divisor of N (so also at the last step)."""
    from smk_lightning.tools.sweep import val_interval

    for steps, every in ((600, 120), (150, 30), (1200, 240), (7, 1), (2, 1), (1, 1), (101, 1)):
        assert val_interval(steps) == every and steps % every == 0 and steps // every >= min(steps, 5)
