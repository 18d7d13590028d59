"""Aux-loss-free load balancing (DeepSeek-V3): ``auxfree_update_`` and the score bias of
``route`` / ``MoELayer``. The bias is added to the router probabilities for the top-k choice
only; the combine weights stay the unbiased (renormalised) probabilities of the chosen
experts. References are plain Python, written from the definitions, not from the code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smk_lightning.losses import auxfree_update_
from smk_lightning.model.moe import route
from tests.helpers import make_layer


def ref_softmax(row):
    mx = max(row)
    ex = [math.exp(v - mx) for v in row]
    return [v / sum(ex) for v in ex]


def skewed_logits(seed, n=512, e=4, lead=2.5):
    """A router that strongly prefers expert 0 on a fixed batch of tokens."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.zeros(e, dtype=torch.float64)
    offset[0] = lead
    return torch.randn(n, e, generator=g, dtype=torch.float64) + offset


# -- auxfree_update_ ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auxfree_update_formula(dtype):
    """bias_e += rate · sign(mean load − load_e): overloaded experts down, underloaded up,
    an expert exactly at the mean unchanged; in place; integer loads accepted."""
    bias = torch.tensor([0.5, -0.25, 0.0, 0.125, 1.0], dtype=dtype)
    load = torch.tensor([10, 2, 6, 6, 1])  # mean 5
    before = bias.tolist()
    ptr = bias.data_ptr()
    auxfree_update_(bias, load, 0.0625)
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    want = [b + 0.0625 * sign(5 - ld) for b, ld in zip(before, load.tolist())]
    assert bias.data_ptr() == ptr and bias.dtype == dtype
    assert bias.tolist() == want  # powers of two: exact
    balanced = torch.zeros(3, dtype=dtype)
    auxfree_update_(balanced, torch.tensor([4, 4, 4]), 0.1)
    assert bool((balanced == 0).all())


# -- route with a bias --------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_bias_picks_by_biased_probs_and_combines_unbiased(k, renormalize):
    g = torch.Generator().manual_seed(7)
    n, e = 40, 5
    logits = (torch.randn(n, e, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    bias = torch.tensor([-0.3, 0.25, 0.0, 0.4, -0.1], dtype=torch.float64)
    probs, w, topi = route(logits, k, renormalize, bias)
    P = [ref_softmax(r) for r in logits.tolist()]
    torch.testing.assert_close(probs, torch.tensor(P, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    changed = 0
    for t in range(n):
        biased = [p + b for p, b in zip(P[t], bias.tolist())]
        want_sel = set(sorted(range(e), key=lambda j: -biased[j])[:k])
        assert set(topi[t].tolist()) == want_sel
        changed += want_sel != set(sorted(range(e), key=lambda j: -P[t][j])[:k])
        chosen = [P[t][j] for j in topi[t].tolist()]
        want_w = [c / sum(chosen) for c in chosen] if renormalize else chosen
        torch.testing.assert_close(w[t], torch.tensor(want_w, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert changed > 0, "the bias should change some selections in this case"
    # the combine weights carry the router's gradient through the unbiased probabilities only
    up = torch.randn(w.shape, generator=g, dtype=torch.float64)
    (w * up).sum().backward()
    z2 = logits.detach().clone().requires_grad_(True)
    p2 = z2.softmax(-1).gather(1, topi)
    w2 = p2 / p2.sum(-1, keepdim=True) if renormalize else p2
    (w2 * up).sum().backward()
    torch.testing.assert_close(logits.grad, z2.grad, rtol=1e-12, atol=1e-15)


def test_route_zero_bias_equals_no_bias():
    logits = torch.randn(30, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    a = route(logits, 2, True, None)
    b = route(logits, 2, True, torch.zeros(6, dtype=torch.float64))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# -- the feedback loop --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k,start", [(1, 0.5), (2, 0.45)])
def test_auxfree_bias_moves_load_towards_uniform(seed, k, start):
    """A fixed batch and a router strongly preferring expert 0 (E = 4): route with the bias,
    count the loads, update with rate 0.01. The largest expert's share of the routed pairs
    falls from > start to < 0.3 (uniform: 0.25) within 100 steps and stays there; the
    combine weights stay the unbiased renormalised probabilities throughout.
    (Measured: below 0.3 after 30-40 steps, then ≤ 0.29.)"""
    logits = skewed_logits(seed)
    n, e = logits.shape
    bias = torch.zeros(e, dtype=torch.float64)
    probs_ref = logits.softmax(-1)
    shares = []
    for _ in range(300):
        probs, w, topi = route(logits, k, True, bias)
        load = torch.bincount(topi.reshape(-1), minlength=e)
        shares.append(load.max().item() / (n * k))
        chosen = probs_ref.gather(1, topi)
        torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True), rtol=1e-12, atol=1e-15)
        auxfree_update_(bias, load, 0.01)
    assert shares[0] > start
    assert max(shares[100:]) < 0.3, shares[100:]
    assert bias[0].item() < 0 and bias.argmin().item() == 0  # the favourite is pushed down


# -- MoELayer ------------------------------------------------------------------------------------------
def manual_forward(layer, x, weights, topi):
    out = torch.zeros_like(x)
    for t in range(len(x)):
        for slot, e in enumerate(topi[t].tolist()):
            w1, w2, w3 = layer.w1[e], layer.w2[e], layer.w3[e]
            f = (F.silu(x[t] @ w1) * (x[t] @ w3)) @ w2
            out[t] += weights[t, slot] * f
    return out


def test_enable_score_bias_adds_a_checkpointed_zero_buffer():
    """BUG (src/smk_lightning/model/moe.py): ``MoELayer.__init__`` sets the plain attribute
    ``self.score_bias_E = None`` (line ~156), so ``enable_score_bias()`` →
    ``register_buffer("score_bias_E", ...)`` raises ``KeyError: "attribute 'score_bias_E'
    already exists"``; every run with router.loss=auxfree (or smk with balance=auxfree)
    fails when SMKModule builds its layers. ``self.register_buffer("score_bias_E", None)``
    in ``__init__`` instead lets the later registration replace it."""
    layer = make_layer(8, 12, 4, 2, "swiglu", seed=3)
    assert layer.score_bias_E is None
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    plain = layer(x).detach()
    layer.enable_score_bias()
    assert layer.score_bias_E is not None and bool((layer.score_bias_E == 0).all())
    assert layer.score_bias_E.shape == (4,)
    assert "score_bias_E" in layer.state_dict()
    assert all(p is not layer.score_bias_E for p in layer.parameters())
    torch.testing.assert_close(layer(x).detach(), plain, rtol=0, atol=0)
    with torch.no_grad():
        layer.score_bias_E.copy_(torch.tensor([0.0, 0.5, -0.25, 2.0]))
    clone = make_layer(8, 12, 4, 2, "swiglu", seed=3)
    clone.enable_score_bias()
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone.score_bias_E, layer.score_bias_E, rtol=0, atol=0)


def test_moe_layer_forward_with_score_bias():
    """Forward routes by probs + bias but combines with the unbiased renormalised
    probabilities; the bias gets no gradient. (The bias is set directly so that this runs
    whatever enable_score_bias does.)"""
    layer = make_layer(8, 12, 4, 2, "swiglu", seed=3)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layer.score_bias_E = torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=torch.float64)  # expert 3 in every top-2
    out = layer(x)
    topi = layer.last_topi_NK
    assert bool((topi == 3).any(1).all())
    probs = layer.router(x).softmax(-1)
    want_sel = (probs + layer.score_bias_E).topk(2, -1).indices
    assert [set(r) for r in topi.tolist()] == [set(r) for r in want_sel.tolist()]
    chosen = probs.gather(1, topi)
    torch.testing.assert_close(out, manual_forward(layer, x, chosen / chosen.sum(-1, keepdim=True), topi),
                               rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.score_bias_E.grad is None
