"""The CUDA paths, run only where a GPU is (skipped on CPU, so never in CI): grouped_mm's
bf16 kernel against the per-expert loop and the float64 oracle, statistics captured on
the GPU against the float64 loop engine on CPU, and a bf16-mixed training step on the GPU
against a float32 step on CPU. The one-sync-per-step check on CUDA is in test_syncs.py.

Reference: ``tests/oracles.py::naive_moe_forward`` and the loop engine (docs/design.md)."""

from __future__ import annotations

import pytest
import torch

from smk_lightning.stats import ENGINES, expert_token_stats, step_stats
from tests import oracles
from tests.test_dispatch import IMPLS, _case32, _with_impl, grouped_calls  # noqa: F401 (fixture)
from tests.test_precision import one_step_stats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ACTS = ("swiglu", "gelu")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the reference's largest entry."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("act", ACTS)
def test_grouped_bf16_on_cuda_matches_the_loop_and_the_oracle(act, grouped_calls):  # noqa: F811
    """bf16 autocast on the GPU (grouped_mm's fast kernel on sm90): output and every gradient
    within bf16 rounding (2 %) of the loop path and of the float64 oracle. Tokens whose top-k
    the bf16 router logits flip get no upstream gradient and are not compared (the loss is
    linear in the output, so they add nothing to any gradient)."""
    layer, x, G, k = _case32(7, act, "2", N=512, d=64, ff=128, E=8)
    lay_bf = {impl: _with_impl(layer, impl).cuda() for impl in IMPLS}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lay_bf["loop"](x.cuda())
    topi_bf = lay_bf["loop"].last_topi_NK.cpu().sort(-1).values
    topi_64 = (x.double() @ layer.router.weight.double().T).topk(k, -1).indices.sort(-1).values
    agree_N = (topi_bf == topi_64).all(-1)
    assert agree_N.float().mean() > 0.9, "bf16 flipped the routing of too many tokens to compare"
    G = G * agree_N[:, None]
    names = ("router",) + oracles.expert_param_names(act)
    P = {n: (layer.router.weight if n == "router" else getattr(layer, n)).detach().double().requires_grad_(True)
         for n in names}
    x64 = x.double().requires_grad_(True)
    out64 = oracles.naive_moe_forward(layer, x64, top_k=k, activation=act, params=P)
    refs = (out64[agree_N], *torch.autograd.grad((out64 * G.double()).sum(), [x64, *P.values()]))
    results = {}
    for impl, lay in lay_bf.items():
        before = len(grouped_calls)
        xi = x.cuda().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = lay(xi)
        assert (len(grouped_calls) > before) == (impl == "grouped")
        params = [lay.router.weight if n == "router" else getattr(lay, n) for n in names]
        grads = torch.autograd.grad((out.float() * G.cuda()).sum(), [xi, *params])
        results[impl] = (out[agree_N.cuda()], *grads)
    for what, g, lp, ref in zip(("output", "x", *names), results["grouped"], results["loop"], refs):
        assert _rel(g, lp) < 2e-2, (what, _rel(g, lp))
        assert _rel(g, ref) < 2e-2, (what, _rel(g, ref))


@pytest.mark.parametrize("scope", ["routed", "dense", "probe"])
@pytest.mark.parametrize("act", ACTS)
def test_captured_stats_on_cuda_equal_the_float64_loop_engine(act, scope):
    """float32 on the GPU: ghost M_A, M_G equal the loop engine on a float64 CPU copy to 1e-4."""
    layer, x, g, k = _case32(11, act, "2", N=96, d=32, ff=48, E=4)
    lay = _with_impl(layer, "auto").cuda()
    rho = 0.3 if scope == "probe" else None
    lay.capture_stats = True
    try:
        out = lay(x.cuda())
        lay.capture.grad_scale = 1.0
        out.backward(g.cuda())
        M_A, M_G, mask = step_stats(lay, ENGINES["ghost"], scope, rho, torch.Generator().manual_seed(5))
    finally:
        lay.capture_stats = False
        lay.clear_capture()
    ref_A, ref_G = expert_token_stats(_with_impl(layer, "loop").double(), x.double(), g.double(), engine="loop",
                                      scope=scope, probe_fraction=rho, generator=torch.Generator().manual_seed(5))
    mask = mask.cpu()
    assert torch.equal(mask, ~torch.isnan(ref_A)), "different defined entries"
    for got, ref, what in ((M_A, ref_A, "M_A"), (M_G, ref_G, "M_G")):
        got = got.cpu().double()
        rel = ((got[mask] - ref[mask]).abs() / ref[mask].abs()).max()
        assert rel <= 1e-4, f"{what} {act}/{scope}: max relative error {float(rel):.2e}"


@pytest.mark.parametrize("scope", ["routed", "dense", "probe"])
def test_bf16_mixed_step_on_gpu_matches_float32_on_cpu(scope):
    """A whole Lightning training step in bf16-mixed on the GPU (grouped experts, fused
    kernels) against float32 on CPU: statistics finite and within bf16 rounding, with the
    tolerances of test_precision's CPU-autocast twin."""
    s32, _ = one_step_stats("32-true", scope, "ghost")
    s16, module = one_step_stats("bf16-mixed", scope, "ghost", accelerator="gpu")
    assert set(s16) == set(s32) == set(module.moe_layers)
    for name in s32:
        (A32, G32, m32), (A16, G16, m16) = s32[name], (t.cpu() for t in s16[name])
        assert A16.dtype == G16.dtype == torch.float32
        both = m32 & m16
        assert both.sum() >= 0.9 * m32.sum()
        assert torch.isfinite(A16[m16]).all() and torch.isfinite(G16[m16]).all()
        for a, b in ((A16, A32), (G16, G32)):
            rel = (a[both] - b[both]).abs() / b[both].abs()
            assert rel.median() < 0.01, (name, rel.median())
            assert torch.quantile(rel, 0.99) < 0.05, (name, torch.quantile(rel, 0.99))
