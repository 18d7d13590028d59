"""``model.compile: true``: the training forward compiled as one graph (fullgraph, static
shapes), with the statistics captured by the taps inside the compiled graph. The compiled training
step gives the eager step's numbers — losses, M_A, M_G, targets and every weight after a
few optimizer steps — in every scope, for smk and Switch routers, in float32 and under
bf16-mixed autocast; and a new routing never compiles a new graph."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import SMKModule
from tests.helpers import RandomDataModule, tiny_model

SMK = RouterConfig(loss="smk")
SWITCH = RouterConfig(loss="switch", weight=0.01)


class StepRecorder(L.Callback):
    """Every training step's loss, statistics and soft targets (cloned)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rec = {"loss": outputs["loss"].detach().clone() if isinstance(outputs, dict) else outputs.detach().clone()}
        for name, (M_A, M_G, mask) in pl_module.step_state.stats.items():
            rec[f"{name}/M_A"], rec[f"{name}/M_G"], rec[f"{name}/mask"] = M_A.clone(), M_G.clone(), mask.clone()
        for name, lt in pl_module.step_state.targets.items():
            rec[f"{name}/q"] = lt.targets.q_NE.clone()
        self.steps.append(rec)


def fit(compile_model: bool, router: RouterConfig, scope: str, steps: int = 3, precision: str = "32-true",
        every_n_steps: int = 1) -> tuple[SMKModule, StepRecorder]:
    torch._dynamo.reset()  # no graph of an earlier test is reused ...
    torch._dynamo.utils.counters.clear()  # ... or counted
    torch.manual_seed(0)
    module = SMKModule(model=tiny_model(compile=compile_model), optim=OptimConfig(warmup_steps=1),
                       stats=StatsConfig(scope=scope, val_batches=0, every_n_steps=every_n_steps), router=router)
    rec = StepRecorder()
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu", precision=precision,
              callbacks=[rec]).fit(module, datamodule=RandomDataModule(n=4 * steps))
    return module, rec


def assert_same_run(eager, compiled, rtol: float, atol: float) -> None:
    (m_e, r_e), (m_c, r_c) = eager, compiled
    assert len(r_e.steps) == len(r_c.steps)
    for step, (a, b) in enumerate(zip(r_e.steps, r_c.steps)):
        assert a.keys() == b.keys()
        assert len(a) > 1  # the statistics were recorded
        for key in a:
            if key.endswith("/mask"):
                assert torch.equal(a[key], b[key]), (step, key)
            else:
                torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol, equal_nan=True,
                                           msg=lambda m, step=step, key=key: f"step {step} {key}: {m}")
    for (name, p_e), p_c in zip(m_e.named_parameters(), m_c.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("router, scope", [(SMK, "routed"), (SMK, "probe"), (SMK, "dense"), (SWITCH, "probe")],
                         ids=["smk-routed", "smk-probe", "smk-dense", "switch-probe"])
def test_compiled_step_equals_eager(router, scope):
    assert_same_run(fit(False, router, scope), fit(True, router, scope), rtol=1e-5, atol=1e-6)


def test_compiled_step_equals_eager_under_bf16_autocast():
    """bf16 matmuls: the compiled graph fuses and rounds differently, so the first step's
    statistics are compared as in tests/test_precision.py (median within 0.5 %, 99 % of entries within 2 %,
    the statistics accumulated in float32 either way; 95 % of the defined entries shared, as
    bf16 may flip a near-tie in the top-k), target probabilities within 0.02, and every
    step's loss within 1 % and 99 % of the weights after three steps within bf16's 2 %."""
    (m_e, r_e), (m_c, r_c) = (fit(c, SMK, "probe", precision="bf16-mixed") for c in (False, True))
    for step, (a, b) in enumerate(zip(r_e.steps, r_c.steps)):
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-2, atol=0)
        if step:  # later steps start from weights that already differ by bf16 rounding
            continue
        for key in a:
            if key.endswith("/mask") or key == "loss":
                continue
            if key.endswith("/q"):  # probabilities: a softmax of z-scores amplifies relative noise near 0
                torch.testing.assert_close(b[key], a[key], rtol=0, atol=0.02)
                continue
            both = ~(a[key].isnan() | b[key].isnan())
            assert both.sum() >= 0.95 * (~a[key].isnan()).sum(), key
            rel = ((b[key][both] - a[key][both]).abs() / a[key][both].abs().clamp_min(1e-3)).float()
            assert rel.median() < 0.005 and torch.quantile(rel, 0.99) < 0.02, (key, rel.median(), rel.max())
    for (name, p_e), p_c in zip(m_e.named_parameters(), m_c.parameters()):
        # AdamW's first updates are about ±lr whatever the gradient's size: a gradient near
        # zero whose sign bf16 rounding flips moves a weight by 2·lr, so a few may differ more
        close = torch.isclose(p_c, p_e, rtol=2e-2, atol=2e-3)
        assert close.float().mean() >= 0.99, (name, close.float().mean())


def test_no_graph_break_and_no_recompile_when_the_routing_changes():
    """fullgraph=True would raise at a graph break (model, statistics); the targets and loss
    compile without it, so their breaks are counted. Ten steps whose routing changes (the
    weights move): the model's graph for the steps with statistics and the one for the
    steps without (every 2nd step), the statistics' (``ghost_step``) and the targets and
    smk_loss's (``targets_and_loss``) — four graphs, each compiled once, no break."""
    from torch._dynamo.utils import counters

    module, rec = fit(True, SMK, "probe", steps=10, every_n_steps=2)
    routes = [s for s in rec.steps if "layer0/mask" in s]
    assert len(routes) == 5 and not torch.equal(routes[0]["layer0/mask"], routes[-1]["layer0/mask"])
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_ddp_two_ranks_compiled_equal_eager(tmp_path):
    """2-process DDP (ddp_spawn, gloo), float32: the compiled run's losses, statistics,
    targets and weights equal the eager run's on every rank."""
    from tests.test_ddp import run

    eager = run(tmp_path, "probe", 2, compile_model=False, precision="32-true")
    compiled = run(tmp_path, "probe", 2, compile_model=True, precision="32-true")
    for e, c in zip(eager, compiled):
        for s_e, s_c in zip(e["steps"], c["steps"]):
            torch.testing.assert_close(s_c["loss"], s_e["loss"], rtol=1e-5, atol=1e-6)
            for name in s_e["stats"]:
                for a, b in zip(s_e["stats"][name] + s_e["targets"][name], s_c["stats"][name] + s_c["targets"][name]):
                    if a.dtype in (torch.bool, torch.int64):
                        assert torch.equal(a, b), name
                    else:  # ΔSC is a difference of O(1) z-scores: near 0 only the absolute error is small
                        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, equal_nan=True)
        for k, w in e["weights"].items():
            torch.testing.assert_close(c["weights"][k], w, rtol=1e-5, atol=1e-6, msg=k)


def test_accumulation_compiled_equals_eager():
    """Two micro-batches per optimizer step, compiled and eager: the same statistics and weights."""
    def accum_fit(compile_model):
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = SMKModule(model=tiny_model(compile=compile_model),
                           optim=OptimConfig(warmup_steps=1, accumulate_grad_batches=2),
                           stats=StatsConfig(scope="probe", val_batches=0), router=SMK)
        rec = StepRecorder()
        L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                  callbacks=[rec]).fit(module, datamodule=RandomDataModule(n=16, batch_size=2))
        return module, rec

    eager, compiled = accum_fit(False), accum_fit(True)
    assert len(eager[1].steps) == 4 and eager[0].global_step == 2
    assert_same_run(eager, compiled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["routed", "probe", "dense"])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_compiled_capture_and_statistics_equal_the_float64_oracle(act, scope):
    """The layer's forward compiled (fullgraph) with its taps and sinks, the backward, and the
    compiled ghost statistics: equal to the loop engine on a float64 copy of the same weights,
    input and gradient (relative 1e-4, as the eager capture in tests/test_dispatch.py)."""
    from smk_lightning.stats import ENGINES, expert_token_stats, step_stats
    from tests.test_dispatch import _case32, _with_impl

    torch._dynamo.reset()
    rho = 0.3 if scope == "probe" else None
    layer, x, g, k = _case32(7 + len(scope), act, "2", N=24, d=8, ff=12, E=4, impl="grouped")
    sinks = layer.new_sinks(24, x)
    out, aux = torch.compile(layer.compute, fullgraph=True, dynamic=False)(x, sinks)
    layer.record(aux, sinks)
    layer.capture.grad_scale = 1.0
    out.backward(g)
    M_A, M_G, mask = step_stats(layer, ENGINES["ghost"].compiled(), scope, rho, torch.Generator().manual_seed(5))
    ref_A, ref_G = expert_token_stats(_with_impl(layer, "loop").double(), x.double(), g.double(), engine="loop",
                                      scope=scope, probe_fraction=rho, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask, ~torch.isnan(ref_A)), "different defined entries"
    for got, ref, what in ((M_A, ref_A, "M_A"), (M_G, ref_G, "M_G")):
        rel = ((got[mask].double() - ref[mask]).abs() / ref[mask].abs()).max()
        assert rel <= 1e-4, f"{what} {act}/{scope}: max relative error {float(rel):.2e}"
