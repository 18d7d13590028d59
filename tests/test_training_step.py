"""The statistics and router gradients produced inside a real training step, checked
against independent autograd computations on a copy of the pre-step model."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from smk_lightning.losses import smk_loss, smk_targets, switch_aux_loss
from smk_lightning.stats import expert_token_stats
from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import SMKModule
from tests.helpers import RandomDataModule, tiny_model


class Recorder(L.Callback):
    """Keeps the first step's batch, the pre-step model and the gradients before the update."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = {k: v.clone() for k, v in batch.items()}
            self.model_before = copy.deepcopy(pl_module.model)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not hasattr(self, "grads"):
            self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.step_stats = {k: tuple(t.clone() for t in v) for k, v in pl_module.step_state.stats.items()}


def run_one_step(router: RouterConfig, stats: StatsConfig) -> tuple[SMKModule, Recorder]:
    """One real training step (float64) on random tokens, recorded by ``Recorder``."""
    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(), optim=OptimConfig(grad_clip=0.0, warmup_steps=1), stats=stats,
                       router=router).double()
    rec = Recorder()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[rec], limit_val_batches=0, accelerator="cpu",
                        precision="64-true")
    trainer.fit(module, datamodule=RandomDataModule())
    return module, rec


def layer_inputs_and_grads(model, batch):
    """x and ∂L_sum/∂o of every MoE layer: the model's forward written out here (each block
    is x + attn(norm(x)), then + ffn(norm(·))), keeping each MoE layer's input and output,
    and torch.autograd.grad."""
    xs, outs = {}, {}
    moe = {id(layer): name for name, layer in model.moe_layers().items()}
    x = model.embed(batch["input_ids"])
    for block in model.blocks:
        x = x + block.attn(block.attn_norm(x), model.rot_TC2)
        h = block.ffn_norm(x)
        o = block.ffn(h)
        if id(block.ffn) in moe:
            xs[moe[id(block.ffn)]] = h.detach().reshape(-1, h.shape[-1])
            outs[moe[id(block.ffn)]] = o
        x = x + o
    logits = model.head(model.norm(x))
    loss_sum = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum")
    names = list(outs)
    grads = torch.autograd.grad(loss_sum, [outs[n] for n in names], retain_graph=True)
    return xs, {n: g.reshape(-1, g.shape[-1]) for n, g in zip(names, grads)}, loss_sum / batch["targets"].numel()


@pytest.mark.parametrize("scope", ["routed", "dense", "probe"])
def test_step_stats_equal_independent_computation(scope):
    rho = 0.25
    _, rec = run_one_step(RouterConfig(loss="smk", balance_weight=0.0),
                          StatsConfig(scope=scope, engine="ghost", val_batches=0, probe_fraction=rho))
    model = rec.model_before
    xs, gs, _ = layer_inputs_and_grads(model, rec.batch)
    for name, layer in model.moe_layers().items():
        sA, sG, mask = rec.step_stats[name]
        routed = ~expert_token_stats(layer, xs[name], gs[name], engine="loop", scope="routed")[0].isnan()
        M_A, M_G = expert_token_stats(layer, xs[name], gs[name], engine="loop", scope="dense")
        if scope == "probe":  # routed everywhere, plus round(ρN) rows dense
            assert (mask & routed).equal(routed)
            assert int(mask.all(1).sum()) == round(rho * len(mask))
            assert (mask.all(1) | (mask == routed).all(1)).all()
        else:
            assert torch.equal(mask, routed if scope == "routed" else torch.ones_like(mask))
        torch.testing.assert_close(sA[mask], M_A[mask], rtol=1e-9, atol=0)
        torch.testing.assert_close(sG[mask], M_G[mask], rtol=1e-9, atol=0)


@pytest.mark.parametrize("decoupled,balance", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_router_and_expert_gradients_come_from_the_right_losses(decoupled, balance):
    """Experts get the main loss only; the router gets smk_loss (+ the balance term, from
    logits of the detached input) and, unless decoupled, the main loss."""
    rcfg = RouterConfig(loss="smk", weight=0.5, decoupled=decoupled, target="soft", balance_weight=balance)
    module, rec = run_one_step(rcfg, StatsConfig(scope="dense", engine="ghost", val_batches=0))
    model = rec.model_before
    xs, gs, loss_mean = layer_inputs_and_grads(model, rec.batch)
    named = dict(model.named_parameters())
    routers = [n for n in named if ".router." in n]
    others = [n for n in named if ".router." not in n]
    main_grads = torch.autograd.grad(loss_mean, [named[n] for n in named], allow_unused=True)
    main = dict(zip(named, main_grads))
    # smk_loss from independently computed statistics, on logits from the detached input.
    smk_terms, aux_terms = [], []
    for name, layer in model.moe_layers().items():
        M_A, M_G = expert_token_stats(layer, xs[name], gs[name], engine="loop", scope="dense")
        t = smk_targets(M_A, M_G, ~M_A.isnan(), rcfg.delta_sc, rcfg.tau)
        logits = layer.router(xs[name])
        smk_terms.append(smk_loss(logits, t, rcfg.target))
        aux_terms.append(switch_aux_loss(logits.softmax(-1), logits.topk(layer.top_k, -1).indices))
    smk_total = rcfg.weight * torch.stack(smk_terms).mean() + balance * torch.stack(aux_terms).mean()
    smk_grads = dict(zip(routers, torch.autograd.grad(smk_total, [named[n] for n in routers])))
    for n in others:
        torch.testing.assert_close(rec.grads[n], main[n], rtol=1e-9, atol=1e-12)
    for n in routers:
        expected = smk_grads[n] + (0 if decoupled else main[n])
        torch.testing.assert_close(rec.grads[n], expected, rtol=1e-9, atol=1e-12)
        assert smk_grads[n].abs().sum() > 0


def test_routed_top1_warns():
    with pytest.warns(UserWarning, match="g_acc"):
        torch.manual_seed(0)
        module = SMKModule(model=tiny_model(top_k=1), stats=StatsConfig(scope="routed", val_batches=0),
                           router=RouterConfig(loss="smk"))
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
        trainer.fit(module, datamodule=RandomDataModule())


def test_step_stats_are_fresh_or_absent():
    """stats.every_n_steps=2: the callbacks see statistics on steps 0 and 2 only (never a
    previous step's or a validation batch's), and the step boundary on every step (accum 1)."""

    class Seen(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append((bool(pl_module.step_state.stats), bool(pl_module.step_state.metrics()), pl_module.step_state.boundary))

    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(), stats=StatsConfig(every_n_steps=2, val_batches=1),
                       router=RouterConfig(loss="smk"))
    seen = Seen()
    L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[seen], val_check_interval=1, limit_val_batches=1,
              accelerator="cpu").fit(module, datamodule=RandomDataModule())
    assert seen.seen == [(True, True, True), (False, False, True), (True, True, True), (False, False, True)]


@pytest.mark.parametrize("every", [1, 2])
def test_dropped_pairs_are_logged_and_warned_once(monkeypatch, every):
    """An extremely confident router (second choice's weight underflows) with no recompute
    budget: the pairs left out of the statistics are logged as train/stats_dropped_pairs and
    warned about, once — also when statistics and the log cadence fall on different steps
    (every 2nd step each: statistics on 0-based steps 0, 2, 4, the read after steps 2, 4)."""
    import smk_lightning.stats.ghost as ghost_mod

    monkeypatch.setattr(ghost_mod, "LOST_PAIR_BUDGET", 0)
    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(), stats=StatsConfig(scope="routed", val_batches=0, every_n_steps=every),
                       router=RouterConfig(loss="switch"))
    with torch.no_grad():
        for layer in module.moe_layers.values():
            layer.router.weight.mul_(1e5)
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", log_every_n_steps=every)
    with pytest.warns(UserWarning, match="left .* routed pairs out") as seen:
        trainer.fit(module, datamodule=RandomDataModule())
    assert sum("routed pairs out" in str(w.message) for w in seen) == 1
    assert float(trainer.callback_metrics["train/stats_dropped_pairs"]) > 0  # the last step computed statistics


def test_smk_loss_on_some_steps_only_warns():
    """router.loss=smk on top of a config that computes statistics every 10th step (as
    configs/default.yaml does for its Switch router) says that smk_loss is applied that rarely."""
    with pytest.warns(UserWarning, match="every_n_steps=10: smk_loss trains the router on one step in 10"):
        SMKModule(model=tiny_model(), stats=StatsConfig(every_n_steps=10), router=RouterConfig(loss="smk"))


def test_self_log_only_on_steps_lightning_writes(tmp_path):
    """The module calls self.log only where Lightning writes to the loggers (every
    log_every_n_steps) and on the last step: the written rows are each step's own loss and
    step, callback_metrics end with the last step's values, and no other step logs."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    class Losses(L.Callback):
        def __init__(self):
            self.loss, self.logged = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss.append(float(outputs["loss"]))
            self.logged.append(float(trainer.callback_metrics.get("step", -1)))

    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(), optim=OptimConfig(warmup_steps=1),
                       stats=StatsConfig(val_batches=0), router=RouterConfig(loss="switch"))
    rec = Losses()
    trainer = L.Trainer(max_steps=7, logger=CSVLogger(tmp_path), log_every_n_steps=3, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accelerator="cpu", callbacks=[rec])
    trainer.fit(module, datamodule=RandomDataModule())
    rows = [r for r in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if r.get("train/loss")]
    assert [int(float(r["step"])) for r in rows] == [3, 6]
    for r in rows:
        assert float(r["train/loss"]) == pytest.approx(rec.loss[int(float(r["step"])) - 1], rel=1e-6)
    assert rec.logged == [-1, -1, 3, 3, 3, 6, 7]  # callback_metrics' step: set on steps 3, 6 and the last
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(rec.loss[-1], rel=1e-6)


def test_fused_adamw_equals_the_default_to_rounding():
    """optim.fused: the fused AdamW kernel, the same updates as the default (foreach) one."""
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        module = SMKModule(model=tiny_model(), optim=OptimConfig(warmup_steps=1, fused=fused),
                           stats=StatsConfig(val_batches=0), router=RouterConfig(loss="smk"))
        L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(
            module, datamodule=RandomDataModule())
        assert bool(module.optimizers().optimizer.defaults["fused"]) == fused
        weights.append([p.detach().clone() for p in module.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
