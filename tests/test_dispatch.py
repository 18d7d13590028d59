"""MoELayer dispatch: forward output and gradients (w.r.t. the input, the router weight and
the stacked expert weights) equal a naive per-token Python-loop reference (float64), on
both expert paths (grouped GEMMs in float32, the per-expert loop in float32 and float64),
and the statistics captured on either path equal the loop engine's.

Reference: ``tests/oracles.py::naive_moe_forward`` (docs/design.md definitions)."""

from __future__ import annotations

import random

import pytest
import torch

from smk_lightning.errors import ConfigError
from smk_lightning.model import ModelConfig, moe
from smk_lightning.stats import ENGINES, expert_token_stats, step_stats
from tests import oracles
from tests.helpers import make_layer, starved_case

ACTS = ("swiglu", "gelu")
KS = ("1", "2", "E")
TOL = 1e-10


def _close(got, ref, what, tol=TOL):
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got = got.detach().to(torch.float64)
    scale = max(1.0, float(ref.abs().max()))
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(
        got, ref, rtol=tol, atol=tol * scale,
        msg=lambda m: f"{what}: max abs err {err:.3e} (scale {scale:.3g})\n{m}",
    )


def compare_with_naive(layer, x, G, k, act, renormalize=True, tol=TOL):
    """Runs layer and naive reference on x, loss <out, G>, compares output and grads.
    Returns the project's parameter gradients (dict)."""
    names = ("router",) + oracles.expert_param_names(act)

    def project_param(n):
        return layer.router.weight if n == "router" else getattr(layer, n)

    # project
    x_p = x.detach().clone().requires_grad_(True)
    out_p = layer(x_p)
    assert isinstance(out_p, torch.Tensor), f"layer(x) returned {type(out_p)}, expected a tensor"
    L_p = (out_p * G).sum()
    grads_p = torch.autograd.grad(L_p, [x_p] + [project_param(n) for n in names])

    # reference on float64 leaf copies
    P = {n: project_param(n).detach().to(torch.float64).clone().requires_grad_(True) for n in names}
    x_r = x.detach().to(torch.float64).clone().requires_grad_(True)
    out_r = oracles.naive_moe_forward(layer, x_r, top_k=k, activation=act,
                                      renormalize=renormalize, params=P)
    L_r = (out_r * G.to(torch.float64)).sum()
    grads_r = torch.autograd.grad(L_r, [x_r] + [P[n] for n in names])

    _close(out_p, out_r.detach(), "output", tol)
    _close(grads_p[0], grads_r[0], "grad x", tol)
    for n, gp, gr in zip(names, grads_p[1:], grads_r[1:]):
        _close(gp, gr, f"grad {n}", tol)
    return dict(zip(names, grads_p[1:]))


def _draw(seed, act, k_label):
    rng = random.Random(seed)
    d, ff, E, N = rng.randint(4, 16), rng.randint(4, 24), rng.randint(3, 6), rng.randint(5, 40)
    k = E if k_label == "E" else int(k_label)
    layer = make_layer(d, ff, E, k, act, seed)
    gen = torch.Generator().manual_seed(seed + 777)
    for _ in range(50):
        x = torch.randn(N, d, generator=gen, dtype=torch.float64)
        if oracles.routing_margin(layer.router.weight, x, k) > 1e-9:
            break
    G = torch.randn(N, d, generator=gen, dtype=torch.float64)
    return layer, x, G, k


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("k_label", KS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_and_grads_match_naive(seed, act, k_label):
    layer, x, G, k = _draw(1000 * seed + 10 * ACTS.index(act) + KS.index(k_label), act, k_label)
    compare_with_naive(layer, x, G, k, act)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("act", ACTS)
def test_expert_without_tokens(act, k):
    layer, x, G, starved = starved_case(act, k)
    grads = compare_with_naive(layer, x, G, k, act)
    for n in oracles.expert_param_names(act):
        assert torch.equal(grads[n][starved], torch.zeros_like(grads[n][starved])), \
            f"expert {starved} got no tokens but grad {n}[{starved}] is non-zero"


@pytest.mark.parametrize("k_label", KS)
@pytest.mark.parametrize("act", ACTS)
def test_single_token(act, k_label):
    d, ff, E = 6, 10, 4
    k = E if k_label == "E" else int(k_label)
    layer = make_layer(d, ff, E, k, act, seed=11)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, d, generator=gen, dtype=torch.float64)
    G = torch.randn(1, d, generator=gen, dtype=torch.float64)
    compare_with_naive(layer, x, G, k, act)


@pytest.mark.parametrize("act", ACTS)
def test_batched_3d_input(act):
    B, T, d, ff, E, k = 3, 5, 8, 12, 4, 2
    layer = make_layer(d, ff, E, k, act, seed=21)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    G = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    compare_with_naive(layer, x, G, k, act)
    # and the 3-D result is exactly the 2-D result reshaped
    with torch.no_grad():
        o3 = layer(x)
        o2 = layer(x.reshape(B * T, d))
    _close(o3.reshape(B * T, d), o2.to(torch.float64), "3-D vs flattened output")


def test_renormalize_default_on():
    layer = make_layer(6, 8, 4, 2, "swiglu", seed=2)
    if hasattr(layer, "renormalize"):
        assert bool(layer.renormalize) is True


@pytest.mark.parametrize("k_label", ["1", "2", "E"])
@pytest.mark.parametrize("act", ACTS)
def test_renormalize_off(act, k_label):
    d, ff, E, N = 7, 10, 4, 15
    k = E if k_label == "E" else int(k_label)
    try:
        layer = make_layer(d, ff, E, k, act, seed=31, renormalize=False)
    except TypeError:
        pytest.skip("MoELayer has no `renormalize` argument")
    if hasattr(layer, "renormalize"):
        assert bool(layer.renormalize) is False
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    G = torch.randn(N, d, generator=gen, dtype=torch.float64)
    compare_with_naive(layer, x, G, k, act, renormalize=False)


# --------------------------------------------------------------------------- expert paths
# The grouped path (torch grouped_mm) runs in float32/bf16 only, with row widths a multiple
# of 16 bytes: it is compared with the float64 oracle at float32 tolerances, and with the
# per-expert loop path in float32 tightly.

IMPLS = ("grouped", "loop")
TOL32 = 2e-5  # float32 vs the float64 oracle (relative to the largest entry)
TOL_PATHS = 2e-6  # grouped vs loop, both float32


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts grouped_mm calls, so a test can assert which expert path ran."""
    calls = []
    real = moe._GROUPED_MM

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(moe, "_GROUPED_MM", spy)
    return calls


def _case32(seed, act, k_label, N=None, d=None, ff=None, E=None, impl="auto", lead=None):
    """A float32 layer with widths grouped_mm takes, inputs whose routing is decided by a clear
    margin in float32, and an upstream gradient."""
    rng = random.Random(seed)
    d = d or 4 * rng.randint(1, 4)
    ff = ff or 4 * rng.randint(1, 6)
    E = E or rng.randint(3, 6)
    N = N or rng.randint(5, 40)
    k = E if k_label == "E" else int(k_label)
    layer = make_layer(d, ff, E, k, act, seed, dtype=torch.float32, expert_impl=impl)
    gen = torch.Generator().manual_seed(seed + 99)
    shape = (*lead, d) if lead else (N, d)
    for _ in range(50):
        x = torch.randn(shape, generator=gen).float()
        if oracles.routing_margin(layer.router.weight, x, k) > 1e-5:
            break
    else:  # pragma: no cover
        raise RuntimeError("could not draw a well-separated routing")
    return layer, x, torch.randn(shape, generator=gen), k


def _with_impl(layer, impl):
    """A fresh layer with the same weights and settings and expert path ``impl``."""
    other = moe.MoELayer(layer.d_model, layer.d_ff, layer.num_experts, layer.top_k, layer.activation,
                         layer.renormalize, expert_impl=impl).to(layer.w1.dtype)
    other.load_state_dict(layer.state_dict())
    return other


def compare_paths(layer, x, G, k, act, grouped_calls):
    """Both expert paths vs the float64 oracle (float32 tolerances) and vs each other (tight)."""
    results = {}
    for impl in IMPLS:
        calls_before = len(grouped_calls)
        results[impl] = compare_with_naive(_with_impl(layer, impl), x, G, k, act, tol=TOL32)
        ran_grouped = len(grouped_calls) > calls_before
        assert ran_grouped == (impl == "grouped"), f"expert_impl={impl} ran grouped_mm: {ran_grouped}"
    # grouped vs loop, both float32, same weights
    outs, grads = {}, {}
    names = ("router",) + oracles.expert_param_names(act)
    for impl in IMPLS:
        lay = _with_impl(layer, impl)
        xi = x.detach().clone().requires_grad_(True)
        out = lay(xi)
        gr = torch.autograd.grad((out * G).sum(), [xi] + [lay.router.weight if n == "router" else getattr(lay, n)
                                                            for n in names])
        outs[impl], grads[impl] = out.detach(), gr
    for what, a, b in [("output", outs["grouped"], outs["loop"])] + [
            (f"grad {n}", ga, gb) for n, ga, gb in zip(("x",) + names, grads["grouped"], grads["loop"])]:
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=TOL_PATHS, atol=TOL_PATHS * scale, msg=lambda m, w=what: f"{w}: {m}")
    return results


@pytest.mark.parametrize("k_label", KS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_expert_paths_float32_match_naive_and_each_other(seed, act, k_label, grouped_calls):
    layer, x, G, k = _case32(100 * seed + 10 * ACTS.index(act) + KS.index(k_label), act, k_label)
    compare_paths(layer, x, G, k, act, grouped_calls)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("act", ACTS)
def test_expert_paths_without_tokens(act, k, grouped_calls):
    layer, x, G, starved = starved_case(act, k)  # d=8, ff=12: widths grouped_mm takes in float32
    layer, x, G = layer.float(), x.float(), G.float()
    assert oracles.routing_margin(layer.router.weight, x, k) > 1e-5
    grads = compare_paths(layer, x, G, k, act, grouped_calls)
    for impl, g in grads.items():
        for n in oracles.expert_param_names(act):
            assert torch.equal(g[n][starved], torch.zeros_like(g[n][starved])), \
                f"{impl}: expert {starved} got no tokens but grad {n}[{starved}] is non-zero"


@pytest.mark.parametrize("k_label", KS)
@pytest.mark.parametrize("act", ACTS)
def test_expert_paths_single_token(act, k_label, grouped_calls):
    layer, x, G, k = _case32(7, act, k_label, N=1, d=8, ff=12, E=4)
    compare_paths(layer, x, G, k, act, grouped_calls)


@pytest.mark.parametrize("act", ACTS)
def test_expert_paths_3d_input(act, grouped_calls):
    layer, x, G, k = _case32(8, act, "2", d=8, ff=16, E=4, lead=(3, 5))
    compare_paths(layer, x, G, k, act, grouped_calls)
    with torch.no_grad():
        o3, o2 = layer(x), layer(x.reshape(15, 8))
    assert torch.equal(o3.reshape(15, 8), o2)


def test_counts_stay_on_the_device():
    topi_NK = torch.tensor([[0, 2], [2, 3], [0, 2]])
    routing = moe.sort_pairs(topi_NK, 5)
    assert isinstance(routing.counts_E, torch.Tensor) and routing.counts_E.device == topi_NK.device
    assert routing.counts_E.tolist() == [2, 0, 3, 1, 0]


# --------------------------------------------------------------------------- choosing the path
def test_auto_takes_grouped_where_it_can_and_the_loop_elsewhere(grouped_calls):
    layer = make_layer(8, 12, 4, 2, "swiglu", seed=1, dtype=torch.float32)
    assert layer.expert_impl == "auto"
    layer(torch.randn(6, 8))
    assert grouped_calls, "float32 with 16-byte rows: auto should run grouped_mm"
    grouped_calls.clear()
    layer.double()(torch.randn(6, 8, dtype=torch.float64))
    assert not grouped_calls, "float64: auto should run the loop"
    odd = make_layer(6, 12, 4, 2, "gelu", seed=1, dtype=torch.float32)  # 6 × 4 B rows: not 16-byte
    odd(torch.randn(6, 6))
    assert not grouped_calls, "24-byte rows: auto should run the loop"


def test_explicit_grouped_refuses_what_grouped_mm_cannot_run(monkeypatch):
    layer = make_layer(8, 12, 4, 2, "swiglu", seed=1, dtype=torch.float64, expert_impl="grouped")
    with pytest.raises(ValueError, match=r"model.expert_impl='grouped'.*float64.*'auto'.*'loop'"):
        layer(torch.randn(6, 8, dtype=torch.float64))
    odd = make_layer(6, 12, 4, 2, "swiglu", seed=1, dtype=torch.float32, expert_impl="grouped")
    with pytest.raises(ValueError, match=r"model.expert_impl='grouped'.*16 bytes"):
        odd(torch.randn(6, 6))
    monkeypatch.setattr(moe, "_GROUPED_MM", None)  # a torch without grouped_mm
    with pytest.raises(ValueError, match="has no grouped_mm"):
        _with_impl(layer, "grouped").float()(torch.randn(6, 8))
    auto = _with_impl(layer, "auto").float()
    assert torch.isfinite(auto(torch.randn(6, 8))).all()  # falls back to the loop


def test_expert_impl_is_checked():
    with pytest.raises(ValueError, match="expert_impl='fast'"):
        moe.MoELayer(8, 8, 4, 2, expert_impl="fast")
    with pytest.raises(ConfigError, match="model.expert_impl='fast'"):
        ModelConfig(expert_impl="fast")


def test_grouped_under_bf16_autocast_matches_the_loop(grouped_calls):
    """Under autocast the grouped path casts to the autocast dtype itself (grouped_mm has no
    autocast rule on CPU), as the loop's x @ w does: both give bf16 results within bf16
    rounding of each other."""
    layer, x, _, _ = _case32(3, "swiglu", "2", N=32, d=16, ff=32, E=4)
    outs = {}
    for impl in IMPLS:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[impl] = _with_impl(layer, impl)(x)
    assert grouped_calls
    torch.testing.assert_close(outs["grouped"].float(), outs["loop"].float(), rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- captured statistics
@pytest.mark.parametrize("scope", ["routed", "dense", "probe"])
@pytest.mark.parametrize("k_label", KS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_captured_ghost_stats_equal_the_loop_engine(impl, act, k_label, scope, grouped_calls):
    """The capture (taps on u, v and the sink on the output; ‖y‖, ‖h‖² in the forward) is the same on
    both expert paths: ghost statistics of a captured float32 step equal the loop engine on a
    float64 copy of the same weights, input and gradient (relative 1e-4)."""
    layer, x, g, k = _case32(40 + KS.index(k_label), act, k_label, N=24, d=8, ff=12, E=4, impl=impl)
    layer.capture_stats = True
    try:
        out = layer(x)
        assert (len(grouped_calls) > 0) == (impl == "grouped")
        layer.capture.grad_scale = 1.0
        out.backward(g)
        gen = torch.Generator().manual_seed(5)
        M_A, M_G, mask = step_stats(layer, ENGINES["ghost"], scope, 0.3 if scope == "probe" else None, gen)
    finally:
        layer.capture_stats = False
        layer.clear_capture()
    ref_layer = _with_impl(layer, "loop").double()
    ref_A, ref_G = expert_token_stats(ref_layer, x.double(), g.double(), engine="loop", scope=scope,
                                      probe_fraction=0.3 if scope == "probe" else None,
                                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask, ~torch.isnan(ref_A)), "different defined entries"
    for got, ref, what in ((M_A, ref_A, "M_A"), (M_G, ref_G, "M_G")):
        rel = ((got[mask].double() - ref[mask]).abs() / ref[mask].abs()).max()
        assert rel <= 1e-4, f"{what} {impl}/{act}/k={k}/{scope}: max relative error {float(rel):.2e}"
