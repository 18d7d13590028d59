"""smk-report on two fake runs written with SummaryWriter (no training)."""

from __future__ import annotations

import pytest
from torch.utils.tensorboard import SummaryWriter

from smk_lightning.tools.report import main

SMK_CONFIG = "model:\n  router:\n    loss: smk\n  stats:\n    scope: probe\n    engine: ghost\n"


def _write_run(run_dir, smk: bool, final_val_loss: float, extra: dict | None = None) -> None:
    run_dir.mkdir(parents=True)
    w = SummaryWriter(log_dir=str(run_dir))
    for step in range(0, 101, 10):
        w.add_scalar("train/loss", 5.0 - step / 50, step)
        w.add_scalar("routing/load_max_share", 0.5 if step >= 80 else 0.9, step)
        w.add_scalar("routing/dead_experts", 1.0 if step >= 80 else 3.0, step)
        w.add_scalar("throughput/tokens_per_s", 1000.0 + step, step)
        w.add_scalar("memory/peak_mb", 100.0 + step, step)
        if smk:
            w.add_scalar("train/g_acc_dense", 0.25 + step / 400, step)
            w.add_scalar("train/kl_div", 1.0 - step / 200, step)
    for step, loss in [(50, 4.0), (100, final_val_loss)]:
        w.add_scalar("val/loss", loss, step)
        w.add_scalar("val/ppl", 2.0**loss, step)
    w.add_scalar("routing/layer0/domain_nmi", 0.25, 100)
    w.add_scalar("routing/layer1/domain_nmi", 0.5, 100)
    for tag, value in (extra or {}).items():
        w.add_scalar(tag, value, 100)
    w.close()
    if smk:
        (run_dir / "config.yaml").write_text(SMK_CONFIG)


def _rows(md: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ")]
    header, *body = rows
    return {r[0]: dict(zip(header, r)) for r in body}


def test_report_two_runs(tmp_path):
    _write_run(tmp_path / "logs" / "smk" / "version_3", smk=True, final_val_loss=2.25)
    _write_run(tmp_path / "logs" / "switch" / "version_0", smk=False, final_val_loss=3.5)
    out = tmp_path / "out"
    # the switch run is passed by its parent dir: the version dir below is found
    main([str(tmp_path / "logs" / "smk" / "version_3"), str(tmp_path / "logs" / "switch"),
          "--out", str(out)])

    md = (out / "report.md").read_text()
    rows = _rows(md)
    assert set(rows) == {"smk/version_3", "switch/version_0"}
    smk, switch = rows["smk/version_3"], rows["switch/version_0"]
    assert smk["router loss"] == "smk (probe/ghost)"
    assert switch["router loss"] == "—"
    assert smk["steps"] == "100"
    assert smk["val loss"] == "2.25" and switch["val loss"] == "3.5"
    assert smk["val ppl"] == "4.757"  # 2 ** 2.25
    assert smk["g_acc_dense"] == "0.5" and smk["kl_div"] == "0.5"
    assert switch["g_acc_dense"] == "—" and switch["kl_div"] == "—"
    assert smk["load max share"] == "0.5"  # steps 80..100 are the last 20%
    assert smk["dead experts"] == "1"
    assert smk["domain NMI"] == "0.375"
    assert smk["tokens/s"] == "1050"
    assert smk["peak memory MB"] == "200"
    assert "`routing/load_max_share`" in md  # legend

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_of_the_same_version_name_stay_apart(tmp_path):
    """Two experiments' ``lightning_logs/smk/version_0`` are two rows, named by as much of
    their paths as tells them apart (they were averaged as one arm, silently)."""
    for exp, loss in (("exp_a", 2.0), ("exp_b", 3.0)):
        _write_run(tmp_path / exp / "lightning_logs" / "smk" / "version_0", smk=True, final_val_loss=loss)
    main([str(tmp_path / "exp_a"), str(tmp_path / "exp_b"), "--out", str(tmp_path)])
    rows = _rows((tmp_path / "report.md").read_text())
    assert set(rows) == {"exp_a/lightning_logs/smk/version_0", "exp_b/lightning_logs/smk/version_0"}
    assert rows["exp_a/lightning_logs/smk/version_0"]["val loss"] == "2"


def test_report_names(tmp_path):
    _write_run(tmp_path / "a" / "version_0", smk=True, final_val_loss=2.5)
    main([str(tmp_path / "a"), "--names", "mine", "--out", str(tmp_path)])
    assert "mine" in _rows((tmp_path / "report.md").read_text())


def test_report_groups_seeds_by_name(tmp_path):
    """Runs sharing a name are one row: mean ± sample std, n, "(k of n)" for partial tags."""
    logs = tmp_path / "runs"
    _write_run(logs / "a" / "seed0", smk=True, final_val_loss=2.0,
               extra={"val/g_acc_dense": 0.5, "val/kl_div": 0.25})
    _write_run(logs / "a" / "seed1", smk=True, final_val_loss=3.0, extra={"val/kl_div": 0.75})
    _write_run(logs / "b" / "seed0", smk=False, final_val_loss=3.5)
    out = tmp_path / "out"
    # one name per RUN_DIR: both seeds below runs/a are arm "a"
    main([str(logs / "a"), str(logs / "b"), "--names", "a", "b", "--out", str(out)])
    md = (out / "report.md").read_text()
    rows = _rows(md)
    assert set(rows) == {"a", "b"}
    a, b = rows["a"], rows["b"]
    assert a["n"] == "2" and b["n"] == "1"
    assert a["val loss"] == "2.5 ± 0.71"  # stdev(2, 3) = 0.707
    assert a["g_acc_dense"] == "0.5 (1 of 2)"
    assert a["kl_div"] == "0.5 ± 0.35"
    assert b["g_acc_dense"] == "—" and b["val loss"] == "3.5"
    assert a["load max share"] == "0.5 ± 0" and a["domain NMI"] == "0.375 ± 0"
    assert a["tokens/s"] == "1050 ± 0" and a["steps"] == "100"
    assert a["router loss"] == "smk (probe/ghost)"
    assert "`val/g_acc_dense`" in md and "sample std" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"

    # --group without names: one row per parent dir (arm), even for a single run
    main([str(logs), "--group", "--out", str(tmp_path / "out2")])
    rows = _rows((tmp_path / "out2" / "report.md").read_text())
    assert {k: r["n"] for k, r in rows.items()} == {"a": "2", "b": "1"}


def test_names_count_mismatch(tmp_path, capsys):
    _write_run(tmp_path / "a" / "seed0", smk=True, final_val_loss=2.0)
    _write_run(tmp_path / "a" / "seed1", smk=True, final_val_loss=2.0)
    _write_run(tmp_path / "b" / "seed0", smk=True, final_val_loss=2.0)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "a"), str(tmp_path / "b"), "--names", "x", "y", "z", "w", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--names got 4 names for 3 runs in 2 RUN_DIRs" in err[0], err


@pytest.mark.parametrize("make", [False, True])
def test_bad_run_dir(tmp_path, capsys, make):
    bad = tmp_path / "nope"
    if make:
        bad.mkdir()  # exists but holds no event file
    with pytest.raises(SystemExit) as exc:
        main([str(bad), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(bad) in err[0] and "lightning_logs" in err[0]
    assert not (tmp_path / "report.md").exists()


def test_figure_plots_the_training_loss_when_validation_ran_once(tmp_path):
    """A short run with one validation still gets a curve: train/loss is a panel of its own."""
    from smk_lightning.tools.report import figure, load_run

    run = tmp_path / "run"
    run.mkdir()
    w = SummaryWriter(log_dir=str(run))
    for step in range(0, 50, 10):
        w.add_scalar("train/loss", 5.0 - step / 50, step)
        w.add_scalar("train/g_acc_dense", 0.2 + step / 500, step)
    w.add_scalar("val/loss", 4.0, 40)
    w.close()
    plotted = figure([("a", [load_run(run)])], tmp_path / "report.png")
    assert plotted == ["train/loss", "val/loss", "train/g_acc_dense"]
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_settings_column_shows_what_differs_between_arms(tmp_path):
    """Two smk arms that differ only in delta_sc read "smk (probe/ghost)" in the router column;
    the settings column tells them apart (and leaves out what they share, and the seed)."""
    for arm, delta, seed in (("a", "zscore", 0), ("a", "zscore", 1), ("b", "log1p", 0)):
        run = tmp_path / arm / f"seed{seed}"
        _write_run(run, smk=True, final_val_loss=2.0)
        (run / "config.yaml").write_text(f"model:\n  router:\n    loss: smk\n    delta_sc: {delta}\n    tau: 1.0\n"
                                         f"  stats:\n    scope: probe\n    engine: ghost\n    seed: {seed}\n")
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--names", "a", "a", "b", "--out", str(tmp_path / "out")])
    rows = _rows((tmp_path / "out" / "report.md").read_text())
    assert rows["a"]["router loss"] == rows["b"]["router loss"] == "smk (probe/ghost)"
    assert rows["a"]["settings"] == "router.delta_sc=zscore" and rows["b"]["settings"] == "router.delta_sc=log1p"


def test_budget_curve_from_sweeps_at_several_step_counts(tmp_path):
    """--budget: each arm's final val/loss against its tokens (last step × batch × seq_len),
    a column per budget with mean ± std over the seeds there and their count."""
    cfg = "model:\n  router:\n    loss: {loss}\ndata:\n  batch_size: 4\n  seq_len: 8\n"
    for steps in (10, 20):
        for arm, loss, seeds in (("switch", "switch", 2), ("frozen", "frozen", 1)):
            for seed in range(seeds):
                run = tmp_path / f"budget{steps}" / "runs" / arm / f"seed{seed}"
                run.mkdir(parents=True)
                w = SummaryWriter(log_dir=str(run))
                for step in (0, steps):
                    w.add_scalar("train/loss", 5.0, step)
                w.add_scalar("val/loss", 3.0 - steps / 20 + seed * 0.1 + (loss == "frozen"), steps)
                w.close()
                (run / "config.yaml").write_text(cfg.format(loss=loss))
    out = tmp_path / "out"
    main([str(tmp_path / "budget10"), str(tmp_path / "budget20"), "--budget", "--out", str(out)])
    md = (out / "budget.md").read_text()
    header, *rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert header == "| arm | 320 tokens | 640 tokens |"  # 10 and 20 steps of 4 × 8 tokens
    cells = {r.split(" | ")[0].strip("| "): r.strip("| ").split(" | ")[1:] for r in rows}
    assert cells["switch"] == ["2.55 ± 0.071 (n=2)", "2.05 ± 0.071 (n=2)"] and cells["frozen"] == ["3.5 (n=1)", "3 (n=1)"]
    assert (out / "budget.png").stat().st_size > 0
