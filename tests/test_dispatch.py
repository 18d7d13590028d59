"""MoELayer dispatch: forward output and gradients (w.r.t. the input, the router weight and
the stacked expert weights) equal a naive per-token Python-loop reference (float64).

Reference: ``tests/oracles.py::naive_moe_forward`` (DESIGN.md §2 definitions)."""

from __future__ import annotations

import random

import pytest
import torch

from tests import oracles
from tests.helpers import make_layer, starved_case

ACTS = ("swiglu", "gelu")
KS = ("1", "2", "E")
TOL = 1e-10


def _close(got, ref, what):
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got = got.detach().to(torch.float64)
    scale = max(1.0, float(ref.abs().max()))
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(
        got, ref, rtol=TOL, atol=TOL * scale,
        msg=lambda m: f"{what}: max abs err {err:.3e} (scale {scale:.3g})\n{m}",
    )


def compare_with_naive(layer, x, G, k, act, renormalize=True):
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

    _close(out_p, out_r.detach(), "output")
    _close(grads_p[0], grads_r[0], "grad x")
    for n, gp, gr in zip(names, grads_p[1:], grads_r[1:]):
        _close(gp, gr, f"grad {n}")
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
