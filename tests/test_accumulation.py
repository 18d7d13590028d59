"""Gradient accumulation under manual optimisation: two half batches accumulated equal one
full batch (weights after the optimizer step), and the statistics of a micro-batch keep
the sum-loss convention of that micro-batch."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from smk_lightning.stats import expert_token_stats
from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import SMKModule
from tests.helpers import RandomTokens, tiny_model
from tests.test_training_step import Recorder, layer_inputs_and_grads


def fit(module: SMKModule, batch_size: int, steps: int, callbacks=()) -> None:
    loader = DataLoader(RandomTokens(8, 16, 64), batch_size=batch_size)
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu", precision="64-true",
              callbacks=list(callbacks)).fit(module, train_dataloaders=loader)


def make(accum: int) -> SMKModule:
    torch.manual_seed(0)
    return SMKModule(model=tiny_model(), optim=OptimConfig(accumulate_grad_batches=accum, warmup_steps=1, grad_clip=0.0),
                     stats=StatsConfig(scope="dense", val_batches=0), router=RouterConfig(loss="smk"))


def test_two_half_batches_equal_one_full_batch():
    full, halves = make(1), make(2)
    fit(full, batch_size=8, steps=1)
    fit(halves, batch_size=4, steps=1)
    assert full.global_step == halves.global_step == 1
    for (name, a), (_, b) in zip(full.named_parameters(), halves.named_parameters()):
        if ".router." in name:
            continue  # smk_loss's z-scores are per micro-batch, so the router's targets differ
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_micro_batch_stats_use_the_micro_batch_sum_loss():
    module, rec = make(2), Recorder()
    fit(module, batch_size=4, steps=1, callbacks=[rec])
    xs, gs, _ = layer_inputs_and_grads(rec.model_before, rec.batch)
    for name, layer in rec.model_before.moe_layers().items():
        M_A, M_G = expert_token_stats(layer, xs[name], gs[name], engine="loop", scope="dense")
        sA, sG, _ = rec.step_stats[name]
        torch.testing.assert_close(sA, M_A, rtol=1e-9, atol=0)
        torch.testing.assert_close(sG, M_G, rtol=1e-9, atol=0)


class StopAtMicroBatch(L.Callback):
    """Stops the fit after ``n`` micro-batches — mid-way through an accumulation cycle."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen >= self.n:
            trainer.should_stop = True


def test_resume_mid_accumulation_cycle_is_exact(tmp_path, monkeypatch):
    """4 optimizer steps of 2 micro-batches straight vs stopped after 5 micro-batches (the
    checkpoint holds the half-accumulated gradient) and resumed: the same final weights."""
    import json

    from smk_lightning.cli import main
    from tests.test_resume import SMOKE

    monkeypatch.chdir(tmp_path)

    def fit(name, *extra):
        main(["fit", "--config", SMOKE, "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "4",
              "--model.optim.accumulate_grad_batches", "2", "--trainer.limit_val_batches", "0",
              "--samples.every_n_steps", "0", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.logger.init_args.name", name,
              *extra])
        return tmp_path / "logs" / name / "version_0" / "checkpoints" / "last.ckpt"

    full = fit("full")
    stop = json.dumps([{"class_path": f"{__name__}.StopAtMicroBatch", "init_args": {"n": 5}}])
    half = fit("first", "--trainer.callbacks", stop)
    ck = torch.load(half, map_location="cpu", weights_only=True)
    assert ck["global_step"] == 2 and ck["smk_state"]["micro"] == 1 and ck["smk_state"]["grads"]
    resumed = fit("second", "--ckpt_path", str(half))
    a = torch.load(full, map_location="cpu", weights_only=True)
    b = torch.load(resumed, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_intervals_count_optimizer_steps(tmp_path, monkeypatch):
    """Under accumulation Lightning's val_check_interval / log_every_n_steps would count
    micro-batches; the CLI scales them so they count optimizer steps like max_steps."""
    from smk_lightning.cli import make_cli
    from tests.test_resume import SMOKE

    monkeypatch.chdir(tmp_path)
    cli = make_cli(["--config", SMOKE, "--trainer.logger", "false", "--data.cache_dir", str(tmp_path),
                    "--model.optim.accumulate_grad_batches", "3", "--trainer.val_check_interval", "5",
                    "--trainer.log_every_n_steps", "4"], run=False)
    assert cli.trainer.val_check_interval == 15 and cli.trainer.log_every_n_steps == 12
