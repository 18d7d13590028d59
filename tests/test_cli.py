"""End to end through the command line: smk fit / validate on the smoke config, the
TensorBoard tags, and training on a user's plain-text file."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from smk_lightning.cli import main

SMOKE = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")

TAGS = {
    "scalars": ["train/loss", "train/aux_loss", "train/smk_loss", "train/g_acc", "train/kl_div", "val/loss",
                "val/ppl", "val/g_acc", "val/kl_div", "routing/load_max_share", "routing/entropy",
                "routing/dead_experts", "routing/layer0/domain_nmi", "memory/peak_mb",
                "throughput/tokens_per_s", "stats/layer0/M_A_mean", "stats/layer0/M_G_mean"],
    "histograms": ["routing/layer0/load"],
    "images": ["routing/layer0/expert_domain", "stats/layer0/M_G_expert_domain"],
    "tensors": ["samples/text_summary", "custom_scalars__config__"],  # the latter: the CUSTOM SCALARS layout
}
OFF = ["train/z_loss"]  # router.z_loss_weight is 0 in the smoke config: not logged


def event_tags(run_dir: Path) -> dict:
    ea = EventAccumulator(str(next(run_dir.glob("events.out.tfevents.*"))),
                          size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea.Tags()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    cwd = Path.cwd()
    import os

    os.chdir(root)
    try:
        main(["fit", "--config", SMOKE, "--data.cache_dir", str(root / "cache")])
    finally:
        os.chdir(cwd)
    return root


def test_fit_writes_checkpoint_and_tags(smoke_run):
    run_dir = smoke_run / "lightning_logs" / "smoke" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    tags = event_tags(run_dir)
    for kind, names in TAGS.items():
        missing = set(names) - set(tags[kind])
        assert not missing, f"missing {kind}: {missing}"
    assert not set(OFF) & set(tags["scalars"])


def test_custom_scalars_layout_names_logged_tags(smoke_run):
    """Every chart of the layout names tags the smoke run logged (a renamed tag would leave an
    empty chart), or a term that is off there."""
    import re

    from smk_lightning.cli.logger import LAYOUT

    known = set(event_tags(smoke_run / "lightning_logs" / "smoke" / "version_0")["scalars"]) | set(OFF)
    for section in LAYOUT.values():
        for kind, patterns in section.values():
            assert kind == "Multiline"
            for pat in patterns:
                assert any(re.fullmatch(pat.strip("^$"), tag) for tag in known), pat


def test_validate_from_checkpoint(smoke_run, monkeypatch):
    monkeypatch.chdir(smoke_run)
    ckpt = smoke_run / "lightning_logs" / "smoke" / "version_0" / "checkpoints" / "last.ckpt"
    main(["validate", "--config", SMOKE, "--data.cache_dir", str(smoke_run / "cache"), "--ckpt_path", str(ckpt)])
    tags = event_tags(smoke_run / "lightning_logs" / "smoke" / "version_1")
    assert "val/loss" in tags["scalars"] and "val/g_acc" in tags["scalars"]


def test_fit_on_a_plain_text_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [f"the {w} sat on the mat number {i} and looked at the {w}s." for i in range(400)
             for w in ("cat", "dog", "bird")]
    (tmp_path / "my.txt").write_text("\n".join(lines), encoding="utf-8")
    main(["fit", "--config", SMOKE, "--data.data_files", str(tmp_path / "my.txt"), "--data.cache_dir",
          str(tmp_path / "cache"), "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
          "--samples.every_n_steps", "0"])
    run_dir = tmp_path / "lightning_logs" / "smoke" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "val/loss" in event_tags(run_dir)["scalars"]


@pytest.mark.parametrize("args, name", [
    (["--config", SMOKE], "smoke"),  # the last --config's file name
    (["--config", SMOKE, "--model.router.loss", "switch", "--model.router.weight", "0.01"], "smoke"),
    (["--config", SMOKE, "--trainer.logger.init_args.name", "mine"], "mine"),  # an explicit name stays
    (["--model.model.d_model", "32", "--model.router.loss", "switch"], "switch"),  # no config: the router
])
def test_runs_are_named_by_what_they_are(tmp_path, monkeypatch, args, name):
    from smk_lightning.cli import make_cli

    monkeypatch.chdir(tmp_path)
    cli = make_cli([*args, "--data.cache_dir", str(tmp_path / "cache")], run=False)
    assert Path(cli.trainer.log_dir) == Path("lightning_logs") / name / "version_0"


def test_fit_prints_the_run_directory_at_start_and_end(smoke_run, capsys):
    """The module-scoped run printed before capsys; run a second, shorter fit to see it."""
    import os

    cwd = Path.cwd()
    os.chdir(smoke_run)
    try:
        main(["fit", "--config", SMOKE, "--data.cache_dir", str(smoke_run / "cache"), "--trainer.max_steps", "1",
              "--trainer.logger.init_args.name", "printed", "--trainer.enable_progress_bar", "false"])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    where = str(Path("lightning_logs") / "printed" / "version_0")
    assert f"smk: run directory {where}" in out and f"smk: done; run directory {where}" in out


def test_help_shows_the_project_options_first_and_only_accepted_precisions(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    first_own = next(i for i, ln in enumerate(lines) if "--model.model.d_model" in ln)
    trainer = next(i for i, ln in enumerate(lines) if ln.startswith("Lightning's Trainer"))
    assert first_own < 40 < trainer, (first_own, trainer)  # not after Lightning's hundreds of lines
    assert len(lines[0]) < 200  # a usage line, not every option
    precision = out[out.index("--trainer.precision PRECISION"):].split("\n  --")[0]
    assert "bf16-mixed" in precision and "transformer-engine" not in precision and "16-true" not in precision
