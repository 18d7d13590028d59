"""Every shipped YAML parses and instantiates (model, datamodule, trainer), so configs
cannot silently rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from smk_lightning.cli import make_cli

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smoke.yaml", "default.yaml", "gpu_100m.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(["--config", str(path), "--trainer.logger", "false", "--data.cache_dir", str(tmp_path)], run=False)
    assert cli.model.model_cfg.vocab_size == cli.datamodule.vocab_size  # the link works
    n_params = sum(p.numel() for p in cli.model.parameters())
    assert n_params > 0
    if path.name == "gpu_100m.yaml":
        assert 0.08e9 <= n_params <= 0.13e9, n_params
