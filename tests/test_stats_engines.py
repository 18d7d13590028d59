"""Numerical tests of ``expert_token_stats`` (docs/design.md) against the independent
float64 oracle in ``tests/oracles.py``.

Tolerances are the contract of docs/design.md: float64 relative error <= 1e-9, float32
<= 1e-4, on every defined entry; identical NaN pattern.
"""

from __future__ import annotations

import random

import pytest
import torch

from smk_lightning.stats import expert_token_stats  # noqa: E402
from tests import oracles
from tests.helpers import make_layer, starved_case

ENGINES = ("ghost", "vmap", "loop")
ACTS = ("swiglu", "gelu")
SCOPES = ("routed", "dense")
KS = ("1", "2", "E")

RTOL64 = 1e-9
RTOL32 = 1e-4


# --------------------------------------------------------------------------- helpers
def _k_value(k_label: str, E: int) -> int:
    return E if k_label == "E" else int(k_label)


def random_case(seed, act, k_label, dtype=torch.float64, min_margin=None):
    """Random small shapes + layer + (x, g). Regenerates x until the top-k routing is
    decided by a clear margin (so rounding differences cannot flip a selection)."""
    rng = random.Random(seed)
    d = rng.randint(4, 16)
    ff = rng.randint(4, 24)
    E = rng.randint(3, 6)
    N = rng.randint(5, 40)
    k = _k_value(k_label, E)
    layer = make_layer(d, ff, E, k, act, seed, dtype)
    if min_margin is None:
        min_margin = 1e-9 if dtype == torch.float64 else 1e-5
    gen = torch.Generator().manual_seed(seed + 12345)
    for _ in range(50):
        x = torch.randn(N, d, generator=gen, dtype=torch.float64)
        if oracles.routing_margin(layer.router.weight, x, k) > min_margin:
            break
    else:  # pragma: no cover
        raise RuntimeError("could not draw a well-separated routing")
    g = torch.randn(N, d, generator=gen, dtype=torch.float64)
    return layer, x.to(dtype), g.to(dtype), k


def assert_stats_close(got, ref, rtol, what=""):
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got = got.detach().to(torch.float64)
    nan_got, nan_ref = torch.isnan(got), torch.isnan(ref)
    if not torch.equal(nan_got, nan_ref):
        bad = (nan_got != nan_ref).nonzero().tolist()
        raise AssertionError(f"{what}: NaN pattern differs at (t,e) {bad[:10]} (of {len(bad)})")
    defined = ~nan_ref
    assert torch.isfinite(got[defined]).all(), f"{what}: non-finite defined entries"
    if defined.any():
        rel = (got[defined] - ref[defined]).abs() / ref[defined].abs()
        worst = float(rel.max())
        assert worst <= rtol, f"{what}: max relative error {worst:.3e} > {rtol:.0e}"


def check_nan_pattern(M, scope, k):
    nan = torch.isnan(M)
    if scope == "dense":
        assert not nan.any(), "dense scope must define every entry"
    else:
        per_row = (~nan).sum(dim=1)
        assert (per_row == k).all(), f"routed: defined per row {per_row.tolist()} != top_k={k}"


_ORACLE_CACHE: dict = {}


def cached_oracle(key, layer, x, g, scope, k):
    if key not in _ORACLE_CACHE:
        _ORACLE_CACHE[key] = oracles.oracle_stats(layer, x, g, scope, top_k=k)
    return _ORACLE_CACHE[key]


def _seed(*parts) -> int:
    s = 0
    for p in parts:
        for ch in str(p):
            s = (s * 131 + ord(ch)) % 1_000_003
    return s


# --------------------------------------------------------------------------- float64 vs oracle
@pytest.mark.parametrize("k_label", KS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_oracle_float64(engine, act, scope, k_label):
    seed = _seed("f64", act, k_label)
    layer, x, g, k = random_case(seed, act, k_label)
    MA_ref, MG_ref = cached_oracle(("f64", act, scope, k_label), layer, x, g, scope, k)
    MA, MG = expert_token_stats(layer, x, g, engine=engine, scope=scope)
    tag = f"{engine}/{act}/{scope}/k={k}"
    check_nan_pattern(MA_ref, scope, k)  # sanity of the oracle itself
    assert_stats_close(MA, MA_ref, RTOL64, f"M_A {tag}")
    assert_stats_close(MG, MG_ref, RTOL64, f"M_G {tag}")
    check_nan_pattern(MA.detach(), scope, k)
    check_nan_pattern(MG.detach(), scope, k)
    # closed-form sanity: norms are non-negative
    assert (MA[~torch.isnan(MA)] >= 0).all() and (MG[~torch.isnan(MG)] >= 0).all()


# --------------------------------------------------------------------------- float32
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_float32_vs_float64_oracle(engine, act, scope):
    seed = _seed("f32", act)
    layer32, x32, g32, k = random_case(seed, act, "2", dtype=torch.float32)
    # the oracle reads the float32 weights/inputs exactly, computes in float64
    MA_ref, MG_ref = cached_oracle(("f32", act, scope), layer32, x32, g32, scope, k)
    MA, MG = expert_token_stats(layer32, x32, g32, engine=engine, scope=scope)
    tag = f"float32 {engine}/{act}/{scope}"
    assert_stats_close(MA, MA_ref, RTOL32, f"M_A {tag}")
    assert_stats_close(MG, MG_ref, RTOL32, f"M_G {tag}")


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_expert_without_tokens(engine, act):
    k = 2
    layer, x, g, starved = starved_case(act, k)
    # routed: the starved column is all NaN, the rest matches the oracle
    MA, MG = expert_token_stats(layer, x, g, engine=engine, scope="routed")
    assert torch.isnan(MA[:, starved]).all() and torch.isnan(MG[:, starved]).all()
    MA_ref, MG_ref = oracles.oracle_stats(layer, x, g, "routed", top_k=k)
    assert_stats_close(MA, MA_ref, RTOL64, f"M_A starved routed {engine}")
    assert_stats_close(MG, MG_ref, RTOL64, f"M_G starved routed {engine}")
    # dense: everything finite, starved column included, and equal to the oracle
    MA, MG = expert_token_stats(layer, x, g, engine=engine, scope="dense")
    assert torch.isfinite(MA).all() and torch.isfinite(MG).all()
    MA_ref, MG_ref = oracles.oracle_stats(layer, x, g, "dense", top_k=k)
    assert_stats_close(MA, MA_ref, RTOL64, f"M_A starved dense {engine}")
    assert_stats_close(MG, MG_ref, RTOL64, f"M_G starved dense {engine}")


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_single_token(engine, act, scope):
    d, ff, E, k = 6, 10, 4, 2
    layer = make_layer(d, ff, E, k, act, seed=11)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, d, generator=gen, dtype=torch.float64)
    g = torch.randn(1, d, generator=gen, dtype=torch.float64)
    MA, MG = expert_token_stats(layer, x, g, engine=engine, scope=scope)
    assert tuple(MA.shape) == (1, E) and tuple(MG.shape) == (1, E)
    MA_ref, MG_ref = oracles.oracle_stats(layer, x, g, scope, top_k=k)
    assert_stats_close(MA, MA_ref, RTOL64, f"M_A N=1 {engine}/{scope}")
    assert_stats_close(MG, MG_ref, RTOL64, f"M_G N=1 {engine}/{scope}")


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("engine", ENGINES)
def test_non_contiguous_inputs(engine, scope):
    act, d, ff, E, k, N = "swiglu", 7, 9, 4, 2, 13
    layer = make_layer(d, ff, E, k, act, seed=5)
    gen = torch.Generator().manual_seed(5)
    xb = torch.randn(d, N, generator=gen, dtype=torch.float64)
    gb = torch.randn(N, 3 * d, generator=gen, dtype=torch.float64)
    x = xb.t()  # transposed view
    g = gb[:, ::3]  # strided view
    assert not x.is_contiguous() and not g.is_contiguous()
    x_before, g_before = x.clone(), g.clone()
    MA, MG = expert_token_stats(layer, x, g, engine=engine, scope=scope)
    MA_ref, MG_ref = oracles.oracle_stats(layer, x.contiguous(), g.contiguous(), scope, top_k=k)
    assert_stats_close(MA, MA_ref, RTOL64, f"M_A non-contig {engine}/{scope}")
    assert_stats_close(MG, MG_ref, RTOL64, f"M_G non-contig {engine}/{scope}")
    assert torch.equal(x, x_before) and torch.equal(g, g_before), "inputs were modified"


# --------------------------------------------------------------------------- no side effects
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_does_not_touch_params_or_grads(engine, act, scope):
    layer, x, g, k = random_case(_seed("side", act), act, "2")
    params = dict(layer.named_parameters())
    assert params, "layer has no parameters?"
    torch.manual_seed(99)
    for p in params.values():
        p.grad = torch.randn_like(p)
    before = {n: (p.detach().clone(), p.grad.clone(), p.requires_grad) for n, p in params.items()}
    x_before, g_before = x.clone(), g.clone()
    expert_token_stats(layer, x, g, engine=engine, scope=scope)
    after = dict(layer.named_parameters())
    assert set(after) == set(before), "parameter set changed"
    for n, p in after.items():
        data0, grad0, rg0 = before[n]
        assert torch.equal(p.detach(), data0), f"parameter {n} changed"
        assert p.grad is not None, f"{n}.grad was cleared"
        assert torch.equal(p.grad, grad0), f"{n}.grad changed"
        assert p.requires_grad == rg0, f"{n}.requires_grad changed"
    assert torch.equal(x, x_before) and torch.equal(g, g_before), "inputs were modified"


@pytest.mark.parametrize("engine", ENGINES)
def test_none_grads_stay_none(engine):
    layer, x, g, k = random_case(_seed("none-grad"), "swiglu", "2")
    layer.zero_grad(set_to_none=True)
    expert_token_stats(layer, x, g, engine=engine, scope="dense")
    for n, p in layer.named_parameters():
        assert p.grad is None, f"{n}.grad was populated by expert_token_stats"


# --------------------------------------------------------------------------- argument checking
def test_unknown_engine_raises():
    layer, x, g, _ = random_case(1, "swiglu", "2")
    with pytest.raises(ValueError, match="bogus_engine"):
        expert_token_stats(layer, x, g, engine="bogus_engine", scope="routed")


def test_unknown_scope_raises():
    layer, x, g, _ = random_case(1, "swiglu", "2")
    with pytest.raises(ValueError, match="bogus_scope"):
        expert_token_stats(layer, x, g, engine="ghost", scope="bogus_scope")


# --------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("engine", ENGINES)
def test_scaling_in_grad_out(engine):
    """M_A does not depend on grad_out; M_G is positively homogeneous of degree 1 in it."""
    layer, x, g, k = random_case(_seed("scale"), "swiglu", "2")
    MA1, MG1 = expert_token_stats(layer, x, g, engine=engine, scope="dense")
    MA2, MG2 = expert_token_stats(layer, x, 3.0 * g, engine=engine, scope="dense")
    MA3, MG3 = expert_token_stats(layer, x, -g, engine=engine, scope="dense")
    torch.testing.assert_close(MA2, MA1, rtol=RTOL64, atol=0)
    torch.testing.assert_close(MG2, 3.0 * MG1, rtol=RTOL64, atol=0)
    torch.testing.assert_close(MG3, MG1, rtol=RTOL64, atol=0)
    # routed entries equal the corresponding dense entries
    MAr, MGr = expert_token_stats(layer, x, g, engine=engine, scope="routed")
    dfn = ~torch.isnan(MAr)
    torch.testing.assert_close(MAr[dfn], MA1[dfn], rtol=RTOL64, atol=0)
    torch.testing.assert_close(MGr[dfn], MG1[dfn], rtol=RTOL64, atol=0)


@pytest.mark.parametrize("act", ACTS)
def test_sum_loss_gradient_is_weighted_sum_of_per_token_grads(act):
    """docs/design.md: for a routed pair the token's contribution to grad_{theta_e} L_sum is
    w_{t,e} times the per-token gradient whose norm is M_G, when grad_out = dL_sum/do.
    With L_sum = <layer(x), G>, dL_sum/do = G exactly."""
    layer, x, G, k = random_case(_seed("sumloss", act), act, "2")
    names = oracles.expert_param_names(act)
    out = layer(x)
    L_sum = (out * G).sum()
    auto = torch.autograd.grad(L_sum, [getattr(layer, n) for n in names])
    auto = dict(zip(names, auto))

    E = layer.router.weight.shape[0]
    expected = {n: torch.zeros_like(getattr(layer, n), dtype=torch.float64) for n in names}
    MG_from_grads = torch.full((x.shape[0], E), float("nan"), dtype=torch.float64)
    rw = layer.router.weight.detach()
    for t in range(x.shape[0]):
        _, sel, weights = oracles.routing_ref(rw, x[t], k, renormalize=True)
        for e, w in zip(sel, weights):
            gr = oracles.per_token_expert_grads(layer, x[t], G[t], e, act)
            for n in names:
                expected[n][e] += w * gr[n]
            MG_from_grads[t, e] = torch.sqrt(sum((gr[n] ** 2).sum() for n in names))
    for n in names:
        scale = max(1.0, float(expected[n].abs().max()))
        torch.testing.assert_close(auto[n].double(), expected[n], rtol=1e-9, atol=1e-9 * scale)
    # and the engines' M_G are the norms of exactly these per-token gradients
    for engine in ENGINES:
        _, MG = expert_token_stats(layer, x, G, engine=engine, scope="routed")
        assert_stats_close(MG, MG_from_grads, RTOL64, f"M_G vs per-token grads {engine}")


def test_renormalize_off_stats():
    """Stats do not depend on the combine weights, only on the routed set."""
    d, ff, E, k = 6, 8, 4, 2
    try:
        layer = make_layer(d, ff, E, k, "swiglu", seed=3, renormalize=False)
    except TypeError:
        pytest.skip("MoELayer has no `renormalize` argument")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, d, generator=gen, dtype=torch.float64)
    g = torch.randn(10, d, generator=gen, dtype=torch.float64)
    MA_ref, MG_ref = oracles.oracle_stats(layer, x, g, "routed", top_k=k)
    for engine in ENGINES:
        MA, MG = expert_token_stats(layer, x, g, engine=engine, scope="routed")
        assert_stats_close(MA, MA_ref, RTOL64, f"M_A renorm-off {engine}")
        assert_stats_close(MG, MG_ref, RTOL64, f"M_G renorm-off {engine}")


# --------------------------------------------------------------------------- probe scope, batching
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_probe_scope_matches_oracle(engine, act):
    """Probe scope: the routed pairs plus every expert on round(ρN) rows (the ghost engine
    runs those rows batched over experts and the rest as pairs sorted by expert)."""
    layer, x, g, k = random_case(_seed("probe", act), act, "2")
    N, E = x.shape[0], layer.num_experts
    MA, MG = expert_token_stats(layer, x, g, engine=engine, scope="probe", probe_fraction=0.3,
                                generator=torch.Generator().manual_seed(4))
    MA_ref, MG_ref = cached_oracle(("probe-dense", act), layer, x, g, "dense", k)
    routed = ~torch.isnan(cached_oracle(("probe-routed", act), layer, x, g, "routed", k)[0])
    probe_N = (~torch.isnan(MA)).all(dim=1) & ~(routed.sum(1) == E)
    assert int(probe_N.sum()) == max(1, round(0.3 * N)), "probe rows are round(ρN)"
    mask = routed | probe_N.unsqueeze(1)
    nan = torch.full_like(MA_ref, float("nan"))
    assert_stats_close(MA, torch.where(mask, MA_ref, nan), RTOL64, f"M_A probe {engine}/{act}")
    assert_stats_close(MG, torch.where(mask, MG_ref, nan), RTOL64, f"M_G probe {engine}/{act}")


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("act", ACTS)
def test_ghost_row_chunks_do_not_change_the_result(monkeypatch, act, scope):
    """Dense rows run batched over experts in chunks of rows; chunks of 3 rows give the oracle's
    numbers too."""
    from smk_lightning.stats import ghost

    layer, x, g, k = random_case(_seed("chunks", act), act, "2")
    monkeypatch.setitem(ghost.DENSE_CHUNK_ELEMENTS, "cpu", 3 * layer.num_experts * layer.d_ff)
    MA, MG = expert_token_stats(layer, x, g, engine="ghost", scope=scope)
    MA_ref, MG_ref = cached_oracle(("chunks", act, scope), layer, x, g, scope, k)
    assert_stats_close(MA, MA_ref, RTOL64, f"M_A chunks {act}/{scope}")
    assert_stats_close(MG, MG_ref, RTOL64, f"M_G chunks {act}/{scope}")


@pytest.mark.parametrize("act", ACTS)
def test_ghost_pairs_float32_on_grouped_gemms(monkeypatch, act):
    """float32 with 16-byte rows: the ghost engine's routed pairs run on grouped_mm (like the
    layer's forward) and match the float64 oracle within 1e-4."""
    from smk_lightning.model import moe

    calls, real = [], moe._GROUPED_MM
    monkeypatch.setattr(moe, "_GROUPED_MM", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layer = make_layer(8, 12, 4, 2, act, seed=9, dtype=torch.float32)
    gen = torch.Generator().manual_seed(9)
    for _ in range(50):
        x = torch.randn(30, 8, generator=gen)
        if oracles.routing_margin(layer.router.weight, x, 2) > 1e-5:
            break
    g = torch.randn(30, 8, generator=gen)
    MA, MG = expert_token_stats(layer, x, g, engine="ghost", scope="routed")
    assert calls, "the float32 routed pairs did not run on grouped_mm"
    MA_ref, MG_ref = oracles.oracle_stats(layer, x, g, "routed", top_k=2)
    assert_stats_close(MA, MA_ref, RTOL32, f"M_A float32 grouped {act}")
    assert_stats_close(MG, MG_ref, RTOL32, f"M_G float32 grouped {act}")
