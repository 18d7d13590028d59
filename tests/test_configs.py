"""Every shipped YAML parses and instantiates (model, datamodule, trainer), so configs
cannot silently rot. Experiment arms (configs/experiments/) override only the router and
are used on top of configs/default.yaml, as smk-sweep runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from smk_lightning.cli import make_cli

ROOT = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(ROOT.glob("*.yaml"))
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smoke.yaml", "default.yaml", "gpu_100m.yaml"} <= names
    assert len(EXPERIMENTS) >= 7


def instantiate(configs: list[Path], cache: Path):
    args = [a for c in configs for a in ("--config", str(c))]
    return make_cli([*args, "--trainer.logger", "false", "--data.cache_dir", str(cache)], run=False)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(path, tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    cli = instantiate([path], cache)
    assert cli.model.model_cfg.vocab_size == cli.datamodule.vocab_size  # the link works
    n_params = sum(p.numel() for p in cli.model.parameters())
    assert n_params > 0
    if path.name == "gpu_100m.yaml":
        assert 0.08e9 <= n_params <= 0.13e9, n_params


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_arm_applies_its_router_settings(path, tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    cli = instantiate([ROOT / "default.yaml", path], cache)
    arm = yaml.safe_load(path.read_text())["model"]
    for key, value in arm["router"].items():
        assert getattr(cli.model.router_cfg, key) == value, key
    # default.yaml computes the statistics on every 10th step (instruments for its Switch
    # router); an arm whose router loss needs them must take them back to every step
    if cli.model.router_cfg.loss == "smk":
        assert cli.model.stats_cfg.every_n_steps == 1


def test_one_default_with_or_without_the_main_config(tmp_path, monkeypatch, cache):
    """`smk fit` without --config trains what configs/default.yaml trains (the Switch router,
    weight 0.01, the same steps and validation); the main job only computes its statistics
    (instruments) less often."""
    monkeypatch.chdir(tmp_path)
    bare, main_job = instantiate([], cache), instantiate([ROOT / "default.yaml"], cache)
    for cli in (bare, main_job):
        assert (cli.model.router_cfg.loss, cli.model.router_cfg.weight) == ("switch", 0.01)
    assert bare.model.router_cfg == main_job.model.router_cfg and bare.model.model_cfg == main_job.model.model_cfg
    assert (bare.trainer.max_steps, bare.trainer.val_check_interval) == (main_job.trainer.max_steps,
                                                                          main_job.trainer.val_check_interval)
    assert (bare.model.stats_cfg.every_n_steps, main_job.model.stats_cfg.every_n_steps) == (1, 10)


def test_router_weight_follows_the_loss_unless_set():
    from smk_lightning.training.config import RouterConfig

    assert RouterConfig().weight == 0.01 and RouterConfig(loss="smk").weight == 1.0
    assert RouterConfig(loss="smk", weight=0.5).weight == 0.5
