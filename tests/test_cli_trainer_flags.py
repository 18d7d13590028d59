"""Lightning trainer flags a user reaches for, through ``smk fit``: each runs as Lightning
means it, or is refused in one line (``tests/test_bad_input.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smk_lightning.cli import main
from smk_lightning.cli import smk as cli

SMOKE = str(Path(__file__).parents[1] / "configs" / "smoke.yaml")
SHORT = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--samples.every_n_steps", "0"]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit(here: Path, *args: str) -> None:
    main(["fit", "--config", SMOKE, "--data.cache_dir", str(here / "cache"), *SHORT, *args])


def test_fast_dev_run(here, capsys):
    """One step and one validation batch, with Lightning's stand-in logger (whose every
    attribute is a function: the progress lines must not take it for ours)."""
    fit(here, "--trainer.fast_dev_run", "true")
    out = capsys.readouterr().out
    assert "step 1/1" in out and "val loss" in out
    assert not list(here.rglob("*.ckpt")), "fast_dev_run saves no checkpoint"


def test_enable_checkpointing_false_saves_nothing(here, capsys, monkeypatch):
    """No ``checkpoint`` callback then (Lightning would refuse the pair): the run trains and
    logs, and writes no checkpoint; an interrupted run says so instead of 'resume'."""
    fit(here, "--trainer.enable_checkpointing", "false")
    assert list(here.glob("lightning_logs/smoke/version_0/events.out.tfevents.*"))
    assert not list(here.rglob("*.ckpt"))
    assert cli._saved() == "without a checkpoint (--trainer.enable_checkpointing false)"
    fit(here)  # the next run checkpoints again
    assert (here / "lightning_logs/smoke/version_1/checkpoints/last.ckpt").is_file()
    assert cli._saved().endswith("resume with --ckpt_path last")


def test_default_root_dir_holds_the_run_and_ckpt_path_last_finds_it(here):
    """``--trainer.default_root_dir D``: logs and checkpoints under ``D/lightning_logs`` (as
    Lightning's own default logger), and ``--ckpt_path last`` looks there."""
    fit(here, "--trainer.default_root_dir", "runs")
    run = here / "runs" / "lightning_logs" / "smoke" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("events.out.tfevents.*"))
    assert not (here / "lightning_logs").exists()
    fit(here, "--trainer.default_root_dir", "runs", "--ckpt_path", "last", "--trainer.max_steps", "4")
    assert not (here / "runs" / "lightning_logs" / "smoke" / "version_1").exists(), "a resumed run continues its directory"
    # an explicit save_dir is the user's choice and stays
    fit(here, "--trainer.default_root_dir", "runs", "--trainer.logger.init_args.save_dir", "elsewhere")
    assert (here / "elsewhere" / "smoke" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_validate_without_a_checkpoint_warns(here):
    """A forgotten --ckpt_path would evaluate untrained weights in silence."""
    args = ["validate", "--config", SMOKE, "--data.cache_dir", str(here / "cache"), "--trainer.limit_val_batches", "1"]
    with pytest.warns(UserWarning, match="without --ckpt_path evaluates freshly initialised weights"):
        main(args)
    fit(here)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        main([*args, "--ckpt_path", "last"])
    assert not [w for w in seen if "without --ckpt_path" in str(w.message)]
