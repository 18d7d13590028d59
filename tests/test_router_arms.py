"""The research grid's arms and instruments: the frozen control's router never moves, the
route-stability instrument on a hand-built case (and across a checkpoint), and the
grouped report's columns."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from smk_lightning.callbacks import RouterMonitor
from smk_lightning.errors import ConfigError
from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import SMKModule
from tests.helpers import RandomDataModule, tiny_model
from tests.test_callbacks import FakeLogger


@pytest.mark.parametrize("scope", ["routed", "probe"])
def test_frozen_router_weights_stay_equal_while_the_rest_trains(scope):
    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(), optim=OptimConfig(warmup_steps=1, router_lr=1.0),
                       stats=StatsConfig(scope=scope), router=RouterConfig(loss="frozen"))
    before = copy.deepcopy(module.state_dict())
    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(
        module, datamodule=RandomDataModule())
    after = module.state_dict()
    routers = [k for k in before if ".router." in k]
    assert len(routers) == 2
    for k in routers:
        assert torch.equal(before[k], after[k]), k
    moved = [k for k in before if k not in routers and not torch.equal(before[k], after[k])]
    assert any(".w1" in k for k in moved) and any("embed" in k for k in moved)
    assert not any(p.requires_grad for k, p in module.named_parameters() if ".router." in k)


def test_frozen_router_with_z_loss_is_refused():
    with pytest.raises(ConfigError, match="z_loss_weight"):
        RouterConfig(loss="frozen", z_loss_weight=0.001)


def _route_trainer(step: int):
    return SimpleNamespace(sanity_checking=False, global_step=step, loggers=[FakeLogger()],
                           precision_plugin=SimpleNamespace(forward_context=nullcontext))


def test_route_change_hand_built():
    """Validation 1 only records; validation 2 with the same weights: 0 changed. Then the last
    layer's router rows are rolled by one expert, so every token's top-1 in that layer moves (e → e+1)
    and layer 0's (below it, so its input is unchanged) stays: half the (layer, token) pairs changed. A monitor restored from the
    first one's state continues the comparison."""
    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(), router=RouterConfig(loss="switch", weight=0.01)).eval()
    batch = {"input_ids": torch.randint(0, 64, (3, 16))}
    other = {"input_ids": torch.randint(0, 64, (3, 16))}
    mon = RouterMonitor()
    for step, b in ((10, batch), (20, other)):  # a later validation's first batch is not the fixed one
        trainer = _route_trainer(step)
        mon.on_validation_batch_end(trainer, module, None, b, 0)
    assert trainer.loggers[0].rows == [(20, {"val/route_change": 0.0})]
    mon.on_validation_batch_end(trainer, module, None, batch, 1)  # not the first batch: nothing
    assert len(trainer.loggers[0].rows) == 1

    state = copy.deepcopy(mon.state_dict())
    last = list(module.moe_layers.values())[-1]
    with torch.no_grad():
        last.router.weight.copy_(last.router.weight.roll(1, 0))
    for m in (mon, RouterMonitor()):
        if m is not mon:
            m.load_state_dict(state)
        trainer = _route_trainer(30)
        m.on_validation_batch_end(trainer, module, None, batch, 0)
        assert trainer.loggers[0].rows == [(30, {"val/route_change": pytest.approx(0.5)})]


def test_route_change_skips_the_sanity_check():
    torch.manual_seed(0)
    module = SMKModule(model=tiny_model()).eval()
    mon = RouterMonitor()
    trainer = _route_trainer(0)
    trainer.sanity_checking = True
    mon.on_validation_batch_end(trainer, module, None, {"input_ids": torch.randint(0, 64, (2, 8))}, 0)
    assert mon.state_dict()["route_ids"] is None
