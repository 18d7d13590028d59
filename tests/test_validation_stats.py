"""Validation statistics of EVERY MoE layer equal the float64 oracle (the lowest layer's
hooks used to be pruned by a backward to one weight), and validation leaves the training
state alone."""

from __future__ import annotations

import pytest
import torch

from smk_lightning.stats import expert_token_stats
from smk_lightning.training.config import RouterConfig, StatsConfig
from smk_lightning.training.module import SMKModule
from tests.helpers import RandomTokens, tiny_model
from tests.test_training_step import layer_inputs_and_grads


@pytest.mark.parametrize("n_layers", [2, 3])
def test_validation_stats_equal_the_loop_oracle_in_every_layer(n_layers):
    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(n_layers=n_layers), stats=StatsConfig(scope="dense"),
                       router=RouterConfig(loss="smk")).double()
    module.eval()
    ds = RandomTokens(3, 16, 64, seed=5)
    batch = {k: torch.stack([ds[i][k] for i in range(3)]) for k in ("input_ids", "targets")}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():  # as Lightning runs validation_step
        stats, targets = module.val_stats(batch, 0)
    assert set(stats) == set(module.moe_layers) and len(stats) == n_layers
    xs, gs, _ = layer_inputs_and_grads(module.model, batch)
    for name, layer in module.moe_layers.items():
        M_A, M_G = expert_token_stats(layer, xs[name], gs[name], engine="loop", scope="dense")
        sA, sG, mask = stats[name]
        assert mask.all()
        torch.testing.assert_close(sA, M_A, rtol=1e-9, atol=0, msg=name)
        torch.testing.assert_close(sG, M_G, rtol=1e-9, atol=0, msg=name)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in module.parameters())
    assert module.step_state.stats == {} and module.step_state.targets == {}
