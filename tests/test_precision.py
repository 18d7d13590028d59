"""Statistics under bf16 autocast and with activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from smk_lightning.model import ModelConfig, MoELayer, MoETransformer
from smk_lightning.stats import ENGINES, expert_token_stats, step_stats


def captured_stats(layer: MoELayer, x: torch.Tensor, g: torch.Tensor, scope: str, autocast: bool):
    layer.capture_stats = True
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    layer.capture.grad_scale = 1.0
    out.float().backward(g)
    M_A, M_G, mask = step_stats(layer, ENGINES["ghost"], scope)
    layer.capture_stats = False
    layer.clear_capture()
    return M_A, M_G, mask


def test_bf16_autocast_stats_match_float32():
    """bf16 matmuls, float32 norm accumulation: 99 % of entries within 2 % (median 0.5 %) of
    float32 (measured: p99 ≈ 0.5 %, max ≈ 0.7 %)."""
    torch.manual_seed(0)
    layer = MoELayer(64, 128, 8, 2)
    x = torch.randn(256, 64)
    g = torch.randn(256, 64)
    for scope in ("routed", "dense"):
        A32, G32, m32 = captured_stats(layer, x, g, scope, autocast=False)
        A16, G16, m16 = captured_stats(layer, x, g, scope, autocast=True)
        assert A16.dtype == torch.float32 and G16.dtype == torch.float32
        both = m32 & m16  # bf16 may flip a near-tie in the top-k
        assert both.sum() >= 0.95 * m32.sum()
        for a, b in ((A16, A32), (G16, G32)):
            rel = ((a[both] - b[both]).abs() / b[both]).float()
            assert rel.median() < 0.005, rel.median()
            assert torch.quantile(rel, 0.99) < 0.02, torch.quantile(rel, 0.99)


def test_activation_checkpointing_gives_the_same_stats():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, top_k=2,
                      d_ff=24)
    ref = MoETransformer(cfg).double()
    ckpt = MoETransformer(ModelConfig(**{**cfg.__dict__, "activation_checkpointing": True})).double()
    ckpt.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50, (3, 16))
    results = []
    for model in (ref, ckpt):
        model.train()
        layers = model.moe_layers()
        for layer in layers.values():
            layer.capture_stats = True
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten(), reduction="sum")
        loss.backward()
        results.append({n: step_stats(layer, ENGINES["ghost"], "dense") for n, layer in layers.items()})
        for layer in layers.values():
            layer.capture_stats = False
            layer.clear_capture()
    for name in results[0]:
        for a, b in zip(results[0][name], results[1][name]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=0, equal_nan=True)


def test_pairs_with_vanishing_weight_are_recomputed_exactly():
    """A routed pair whose combine weight underflows carries (almost) no gradient, so its
    M_G cannot come from the backward: step_stats recomputes it from scratch."""
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 3, 3, renormalize=False)  # every expert selected, raw p as weights
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = -60.0  # p ≈ e^-60 for expert 2 on tokens with x[0] ≈ 1
    x = torch.randn(16, 8)
    x[:, 0] = 1.0
    g = torch.randn(16, 8)
    M_A, M_G, mask = captured_stats(layer, x, g, "routed", autocast=False)
    assert float(torch.softmax(layer.router(x), -1)[:, 2].max()) < torch.finfo(torch.float32).tiny ** 0.5
    ref_A, ref_G = expert_token_stats(layer, x, g, engine="loop", scope="routed")
    torch.testing.assert_close(M_A, ref_A, rtol=1e-4, atol=0)
    torch.testing.assert_close(M_G, ref_G, rtol=1e-4, atol=0)


@pytest.mark.parametrize("gap, g_scale", [(30, 1e-4), (36, 1e-4), (40, 1e-4), (42, 1e-5), (43, 1e-6)])
def test_small_weights_with_small_gradients_stay_exact(gap, g_scale):
    """A weight above the 1e-19 cut can still make the captured gradients' squares fall
    below float32's smallest normal number (w = 2e-18 and mean-loss gradients of 1e-4 made
    M_G 9 % off, w = 3e-19 and 1e-5 100 %): such pairs are recomputed too, so every pair
    equals the float64 loop; tokens whose ḡ is zero (M_G = 0 exactly) are not recomputed:
    with no recompute budget none is dropped."""
    import smk_lightning.stats.ghost as ghost_mod

    torch.manual_seed(0)
    layer = MoELayer(8, 12, 3, 3, renormalize=False)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = -float(gap)
    x = torch.randn(16, 8)
    x[:, 0] = 1.0
    g = torch.randn(16, 8) * g_scale
    M_A, M_G, mask = captured_stats(layer, x, g, "routed", autocast=False)
    ref_A, ref_G = expert_token_stats(layer, x, g, engine="loop", scope="routed")
    torch.testing.assert_close(M_A, ref_A, rtol=1e-4, atol=0)
    torch.testing.assert_close(M_G, ref_G, rtol=1e-4, atol=0)

    g[:, :] = 0.0  # every ḡ zero: nothing to recompute, nothing dropped without a budget
    budget = ghost_mod.LOST_PAIR_BUDGET
    try:
        ghost_mod.LOST_PAIR_BUDGET = 0
        M_A, M_G, mask = captured_stats(layer, x, g, "routed", autocast=False)
    finally:
        ghost_mod.LOST_PAIR_BUDGET = budget
    assert bool(mask.all()) and bool((M_G == 0).all())


def _lost_and_fine_layers():
    """Layer ``lost``: every expert selected with raw probabilities, expert 2's ≈ e^-60 on
    every token (16 lost pairs); layer ``fine``: an ordinary top-2 layer."""
    torch.manual_seed(0)
    lost = MoELayer(8, 12, 3, 3, renormalize=False)
    with torch.no_grad():
        lost.router.weight.zero_()
        lost.router.weight[2, 0] = -60.0
    fine = MoELayer(8, 12, 3, 2)
    x = torch.randn(16, 8)
    x[:, 0] = 1.0
    return {"lost": lost, "fine": fine}, x, (torch.randn(16, 8), torch.randn(16, 8))


@pytest.mark.parametrize("scope", ["routed", "probe"])
def test_vanishing_weight_fixups_need_no_host_sync(scope):
    """Lost pairs (within the recompute budget) are recomputed without any op that syncs on a
    GPU; both layers equal the loop, and nothing is dropped."""
    from smk_lightning.stats import StatsCapture
    from tests.syncs import HostSyncs

    layers, x, (g1, g2) = _lost_and_fine_layers()
    with StatsCapture(layers) as cap:
        ((layers["lost"](x) * g1).sum() + (layers["fine"](x) * g2).sum()).backward()
        cap.set_grad_scale(1.0)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        with HostSyncs() as syncs:
            out = cap.stats(ENGINES["ghost"], scope, 0.25, lambda i: gens[i])
            dropped = cap.dropped_pairs()
    assert syncs.hits == []
    assert int(dropped) == 0
    for (name, layer), g in zip(layers.items(), (g1, g2)):
        M_A, M_G, mask = out[name]
        ref_A, ref_G = expert_token_stats(layer, x, g, engine="loop", scope="dense")
        nan = torch.tensor(float("nan"))
        torch.testing.assert_close(M_A, torch.where(mask, ref_A, nan), rtol=1e-4, atol=0, equal_nan=True)
        torch.testing.assert_close(M_G, torch.where(mask, ref_G, nan), rtol=1e-4, atol=0, equal_nan=True)


@pytest.mark.parametrize("scope", ["routed", "probe", "dense"])
def test_layers_of_one_shape_together_equal_each_alone(monkeypatch, scope):
    """Layers of one shape are computed together (``layers_stats``: one ``ghost_step`` over
    ``[L, N, E]``): with lost pairs in one layer only and a budget of 5, each layer equals
    itself computed alone — statistics, mask and dropped count — and the loop."""
    import smk_lightning.stats.ghost as ghost_mod
    from smk_lightning.stats import StatsCapture

    monkeypatch.setattr(ghost_mod, "LOST_PAIR_BUDGET", 5)
    torch.manual_seed(0)
    layers = {name: MoELayer(8, 12, 3, 3, renormalize=False) for name in ("lost", "fine", "fine2")}
    with torch.no_grad():
        layers["lost"].router.weight.zero_()
        layers["lost"].router.weight[2, 0] = -60.0
    xs, gs = {}, {}
    for name in layers:
        xs[name], gs[name] = torch.randn(16, 8), torch.randn(16, 8)
        xs[name][:, 0] = 1.0
    results = []
    for together in (True, False):
        groups = [layers] if together else [{n: lay} for n, lay in layers.items()]
        out, dropped = {}, {}
        for group in groups:
            with StatsCapture(group) as cap:
                sum((lay(xs[n]) * gs[n]).sum() for n, lay in group.items()).backward()
                cap.set_grad_scale(1.0)
                gens = [torch.Generator().manual_seed(list(layers).index(n)) for n in group]
                out |= cap.stats(ENGINES["ghost"], scope, 0.25, gens.__getitem__)
                dropped |= {n: int(lay.capture.dropped_pairs) for n, lay in group.items()}
        results.append((out, dropped))
    (together, d_together), (alone, d_alone) = results
    assert d_together == d_alone
    lost = {"routed": 16 - 5, "probe": 16 - 4 - 5, "dense": 0}[scope]  # probe: 4 rows of 16 exact anyway
    assert d_together == {"lost": lost, "fine": 0, "fine2": 0}
    for name, layer in layers.items():
        for a, b in zip(together[name], alone[name]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)
        M_A, M_G, mask = together[name]
        ref_A, ref_G = expert_token_stats(layer, xs[name], gs[name], engine="loop", scope="dense")
        torch.testing.assert_close(M_A[mask], ref_A[mask], rtol=1e-4, atol=0)
        torch.testing.assert_close(M_G[mask], ref_G[mask], rtol=1e-4, atol=0)


@pytest.mark.parametrize("scope, dropped", [("routed", 16 - 5), ("probe", 16 - 4 - 5)])
def test_lost_pairs_beyond_the_budget_are_dropped_and_counted(monkeypatch, scope, dropped):
    """Beyond ``LOST_PAIR_BUDGET`` a lost pair is left out: its mask entry is cleared, its M_G
    is NaN, it is counted; every other pair still equals the loop. In probe scope the 4 probe
    rows' lost pairs are exact without the budget."""
    import smk_lightning.stats.ghost as ghost_mod

    monkeypatch.setattr(ghost_mod, "LOST_PAIR_BUDGET", 5)
    layers, x, (g, _) = _lost_and_fine_layers()
    layer = layers["lost"]
    layer.capture_stats = True
    (layer(x) * g).sum().backward()
    layer.capture.grad_scale = 1.0
    M_A, M_G, mask = step_stats(layer, ENGINES["ghost"], scope, 0.25, torch.Generator().manual_seed(0))
    counted = layer.capture.dropped_pairs
    layer.capture_stats = False
    assert int(counted) == dropped
    assert int((~mask[:, 2]).sum()) == dropped and bool(mask[:, :2].all())
    assert bool(M_G[~mask].isnan().all())
    ref_A, ref_G = expert_token_stats(layer, x, g, engine="loop", scope="dense")
    torch.testing.assert_close(M_G[mask], ref_G[mask], rtol=1e-4, atol=0)
    torch.testing.assert_close(M_A[mask], ref_A[mask], rtol=1e-4, atol=0)


@pytest.mark.parametrize("budget", [0, 5, 100])
@pytest.mark.parametrize("scope", ["routed", "probe"])
def test_two_lost_pairs_per_token_any_budget(monkeypatch, scope, budget):
    """Tokens with two lost pairs each (experts 2 and 3), budgets from none to all: the
    recomputed and the ordinary pairs equal the loop, and exactly the lost pairs beyond the
    budget (those not on a probe row) are dropped, with M_A and M_G NaN."""
    import smk_lightning.stats.ghost as ghost_mod

    monkeypatch.setattr(ghost_mod, "LOST_PAIR_BUDGET", budget)
    torch.manual_seed(1)
    layer = MoELayer(8, 12, 4, 4, renormalize=False)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0], layer.router.weight[3, 0] = -60.0, -70.0
    x, g = torch.randn(12, 8), torch.randn(12, 8)
    x[:, 0] = 1.0
    layer.capture_stats = True
    (layer(x) * g).sum().backward()
    layer.capture.grad_scale = 1.0
    gen = torch.Generator().manual_seed(0)
    M_A, M_G, mask = step_stats(layer, ENGINES["ghost"], scope, 0.25, gen)
    counted = int(layer.capture.dropped_pairs)
    layer.capture_stats = False
    lost = 2 * 12 - (2 * 3 if scope == "probe" else 0)  # probe: 3 rows of 12 are exact anyway
    assert counted == max(0, lost - budget) == int((~mask).sum())
    assert bool(mask[:, :2].all()) and bool(M_A[~mask].isnan().all()) and bool(M_G[~mask].isnan().all())
    ref_A, ref_G = expert_token_stats(layer, x, g, engine="loop", scope="dense")
    torch.testing.assert_close(M_A[mask], ref_A[mask], rtol=1e-4, atol=0)
    torch.testing.assert_close(M_G[mask], ref_G[mask], rtol=1e-4, atol=0)


# -- the whole training step under the trainer's precision (docs/design.md, precision) ----------------
def one_step_stats(precision: str, scope: str, engine: str, accelerator: str = "cpu"):
    """Statistics of one real training step (Lightning runs training_step under autocast)."""
    import lightning as L

    from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
    from smk_lightning.training.module import SMKModule
    from tests.helpers import RandomDataModule, tiny_model
    from tests.test_training_step import Recorder

    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(d_model=32, d_ff=48), optim=OptimConfig(warmup_steps=1),
                       stats=StatsConfig(scope=scope, engine=engine, val_batches=0, probe_fraction=0.5),
                       router=RouterConfig(loss="smk", balance_weight=0.1))
    rec = Recorder()
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[rec], limit_val_batches=0, accelerator=accelerator,
              precision=precision).fit(module, datamodule=RandomDataModule())
    return rec.step_stats, module


@pytest.mark.parametrize("engine", ["ghost", "vmap", "loop"])
@pytest.mark.parametrize("scope", ["routed", "dense", "probe"])
def test_bf16_mixed_training_step_matches_float32(scope, engine):
    """bf16-mixed autocast over the whole step (model, loss, backward): the statistics come
    out in float32 and within bf16 rounding of a float32 step (measured on this case, ghost:
    median relative difference ≤ 0.31 %, 99th percentile ≤ 1.1 %, max 1.35 %; tolerances
    are about 3× and 4.5× that); entries whose routing flipped under bf16 are compared only
    where both are defined."""
    s32, _ = one_step_stats("32-true", scope, engine)
    s16, module = one_step_stats("bf16-mixed", scope, engine)
    assert set(s16) == set(s32) == set(module.moe_layers)
    for name in s32:
        (A32, G32, m32), (A16, G16, m16) = s32[name], s16[name]
        assert A16.dtype == G16.dtype == torch.float32
        both = m32 & m16
        assert both.sum() >= 0.9 * m32.sum()
        assert torch.isfinite(A16[m16]).all() and torch.isfinite(G16[m16]).all()
        for a, b in ((A16, A32), (G16, G32)):
            rel = ((a[both] - b[both]).abs() / b[both].abs())
            assert rel.median() < 0.01, (name, rel.median())
            assert torch.quantile(rel, 0.99) < 0.05, (name, torch.quantile(rel, 0.99))


def test_loss_scale_is_divided_out():
    """16-mixed: the sinks get ḡ × the GradScaler's scale; StatsCapture divides it out, so
    the statistics equal those of an unscaled backward (CPU has no fp16 autocast in
    Lightning, so the scale is applied by hand here, exactly as the precision plugin does)."""
    from smk_lightning.stats import StatsCapture

    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, 2).double()
    x, g = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    results = []
    for scale in (1.0, 2.0**12):
        with StatsCapture({"l": layer}) as cap:
            (layer(x) * g).sum().mul(scale / 8).backward()  # loss / accum × loss scale
            cap.set_grad_scale(torch.tensor(1.0, dtype=torch.float64), accum=8, loss_scale=torch.tensor(scale))
            results.append(cap.stats(ENGINES["ghost"], "dense", None, lambda i: None)["l"])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    ref_A, ref_G = expert_token_stats(layer, x, g, engine="loop", scope="dense")
    torch.testing.assert_close(results[1][0], ref_A, rtol=1e-9, atol=0)
    torch.testing.assert_close(results[1][1], ref_G, rtol=1e-9, atol=0)


def test_a_pruned_backward_is_caught():
    """A backward that does not reach the capture's sinks (autograd.grad to w2 only, or a
    backward to one sink only) leaves their gradients None: the capture names them instead
    of returning wrong M_G."""
    from smk_lightning.stats import StatsCapture

    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, 2)
    x = torch.randn(16, 8)
    with StatsCapture({"l": layer}) as cap:
        torch.autograd.grad(layer(x).square().sum(), [layer.w2])
        with pytest.raises(RuntimeError, match="sink_ND, sink_PS of MoE layer l"):
            cap.check()
    with StatsCapture({"l": layer}) as cap:
        layer(x).square().sum().backward(inputs=[layer.capture.sinks.out_ND])
        with pytest.raises(RuntimeError, match="reach sink_PS of MoE layer l"):
            cap.check()
        assert layer.capture.sinks.pre_PS.grad is None
