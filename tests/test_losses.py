"""The router losses and smk metrics against float64 references written from DESIGN §2
(not from the implementation): ΔSC, smk_loss (hard / soft), g_acc, kl_div, topk_overlap,
the Switch aux loss and the router z-loss."""

from __future__ import annotations

import math

import pytest
import torch

from smk_lightning.losses import (
    delta_sc,
    router_z_loss,
    smk_loss,
    smk_metrics,
    smk_targets,
    switch_aux_loss,
)

N, E = 9, 5


# -- independent references (plain Python over float64 values) ---------------------------------
def ref_delta_sc(M_A, M_G, mask, kind):
    A, G, m = M_A.tolist(), M_G.tolist(), mask.tolist()
    cells = [(t, e) for t in range(len(m)) for e in range(len(m[0])) if m[t][e]]

    def zs(M):
        vals = [M[t][e] for t, e in cells]
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))  # population std
        return {c: (M[c[0]][c[1]] - mu) / sd for c in cells}

    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    out = [[-math.inf] * len(m[0]) for _ in m]
    zA, zG = (zs(A), zs(G)) if kind == "zscore" else ({}, {})
    for t, e in cells:
        if kind == "zscore":
            out[t][e] = zA[(t, e)] - zG[(t, e)]
        elif kind == "sigmoid":
            out[t][e] = sig(A[t][e]) - sig(G[t][e])
        else:
            out[t][e] = -G[t][e]
    return torch.tensor(out, dtype=torch.float64)


def defined(row):
    return [e for e, v in enumerate(row) if v != -math.inf]


def log_softmax(z):
    mx = max(z)
    lse = mx + math.log(sum(math.exp(v - mx) for v in z))
    return [v - lse for v in z]


def ref_q(row, tau):
    idx = defined(row)
    mx = max(row[e] for e in idx)
    ex = {e: math.exp((row[e] - mx) / tau) for e in idx}
    s = sum(ex.values())
    return [ex[e] / s if e in ex else 0.0 for e in range(len(row))]


def ref_kl(q, z):
    lp = log_softmax(z)
    return sum(qi * (math.log(qi) - lpi) for qi, lpi in zip(q, lp) if qi > 0)


def argmax(row):
    return max(range(len(row)), key=lambda e: row[e])


def topk(row, k):
    return set(sorted(range(len(row)), key=lambda e: -row[e])[:k])


def ref_loss(logits, dsc, target, tau):
    z, d = logits.tolist(), dsc.tolist()
    terms = []
    for zt, dt in zip(z, d):
        if len(defined(dt)) < 2:
            continue
        if target == "hard":
            terms.append(-log_softmax(zt)[argmax(dt)])
        else:
            terms.append(ref_kl(ref_q(dt, tau), zt))
    return sum(terms) / len(terms) if terms else 0.0


def ref_metrics(logits, dsc, tau, k):
    z, d = logits.tolist(), dsc.tolist()
    rows = [(zt, dt) for zt, dt in zip(z, d) if len(defined(dt)) >= 2]
    wide = [(zt, dt) for zt, dt in zip(z, d) if len(defined(dt)) > k]
    nan = float("nan")
    g_acc = sum(argmax(zt) == argmax(dt) for zt, dt in rows) / len(rows) if rows else nan
    kl = sum(ref_kl(ref_q(dt, tau), zt) for zt, dt in rows) / len(rows) if rows else nan
    ov = sum(len(topk(zt, k) & topk(dt, k)) / k for zt, dt in wide) / len(wide) if wide else nan
    return {"g_acc": g_acc, "kl_div": kl, "topk_overlap": ov}


# -- inputs ---------------------------------------------------------------------------------------
def make_inputs(seed=0, n=N, e=E):
    g = torch.Generator().manual_seed(seed)
    M_A = torch.rand(n, e, generator=g, dtype=torch.float64) * 3
    M_G = torch.rand(n, e, generator=g, dtype=torch.float64) * 5
    logits = torch.randn(n, e, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(n, e, generator=g) < 0.6
    # rows with exactly 0, 1, 2 and all defined entries
    mask[0] = False
    mask[1] = False
    mask[1, 3] = True
    mask[2] = False
    mask[2, [0, 4]] = True
    mask[3] = True
    M_A[~mask] = float("nan")  # undefined statistics are NaN, as the engines return them
    M_G[~mask] = float("nan")
    return M_A, M_G, mask, logits


KINDS = ["zscore", "sigmoid", "surprise"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_delta_sc_matches_reference(kind, seed):
    M_A, M_G, mask, _ = make_inputs(seed)
    got = delta_sc(M_A, M_G, mask, kind)
    want = ref_delta_sc(M_A, M_G, mask, kind)
    assert torch.equal(torch.isinf(got), ~mask) and bool((got[~mask] == -math.inf).all())
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-12, atol=1e-12)


def test_zscore_uses_all_defined_entries_of_the_layer():
    """Changing an undefined entry's value changes nothing; ΔSC is shift/scale invariant."""
    M_A, M_G, mask, _ = make_inputs(3)
    base = delta_sc(M_A, M_G, mask, "zscore")
    A2, G2 = M_A.clone(), M_G.clone()
    A2[~mask], G2[~mask] = 1e6, -7.0
    torch.testing.assert_close(delta_sc(A2, G2, mask, "zscore")[mask], base[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta_sc(M_A * 4 + 2, M_G * 0.5 - 1, mask, "zscore")[mask], base[mask],
                               rtol=1e-10, atol=1e-10)


def test_delta_sc_unknown_kind_raises():
    M_A, M_G, mask, _ = make_inputs()
    with pytest.raises(ValueError, match="nope"):
        delta_sc(M_A, M_G, mask, "nope")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["hard", "soft"])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_smk_loss_matches_reference(kind, target, tau):
    M_A, M_G, mask, logits = make_inputs(7)
    t = smk_targets(M_A, M_G, mask, kind, tau)
    assert torch.equal(t.rows_N, mask.sum(1) >= 2)
    dsc = ref_delta_sc(M_A, M_G, mask, kind)
    got = smk_loss(logits, t, target)
    # float32 tolerance: smk_targets / smk_loss compute in float32 (see the float64 test below)
    assert got.item() == pytest.approx(ref_loss(logits, dsc, target, tau), rel=1e-5, abs=1e-6)


def test_soft_targets_are_softmax_over_defined_entries():
    M_A, M_G, mask, _ = make_inputs(4)
    t = smk_targets(M_A, M_G, mask, "zscore", 0.5)
    dsc = ref_delta_sc(M_A, M_G, mask, "zscore").tolist()
    for r in torch.nonzero(t.rows_N).flatten().tolist():
        torch.testing.assert_close(t.soft_NE[r].double(), torch.tensor(ref_q(dsc[r], 0.5), dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        assert bool((t.soft_NE[r][~mask[r]] == 0).all())
        assert t.hard_N[r].item() == argmax(dsc[r])


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_smk_loss_float64_inputs_keep_float64_precision(target):
    """BUG (smk.py): smk_targets casts M_A/M_G to float32 and smk_loss casts the logits to
    float32 (`.float()`), so float64 training (precision='64-true') gets a float32 smk_loss.
    lm_loss uses torch.promote_types(dtype, float32) instead; smk should too."""
    M_A, M_G, mask, logits = make_inputs(7)
    t = smk_targets(M_A, M_G, mask, "zscore", 1.0)
    got = smk_loss(logits, t, target)
    want = ref_loss(logits, ref_delta_sc(M_A, M_G, mask, "zscore"), target, 1.0)
    assert got.dtype == torch.float64, f"smk_loss of float64 logits is {got.dtype}"
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_smk_loss_without_rows_is_zero_with_a_gradient_path(target):
    M_A, M_G, mask, logits = make_inputs()
    mask = torch.zeros_like(mask)
    mask[1, 2] = True  # only rows with < 2 defined entries
    logits = logits.clone().requires_grad_(True)
    t = smk_targets(M_A, M_G, mask, "zscore", 1.0)
    loss = smk_loss(logits, t, target)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None and bool((logits.grad == 0).all())
    m = smk_metrics(logits.detach(), t, top_k=2)
    assert all(math.isnan(v.item()) for v in m.values())


def test_smk_loss_unknown_target_raises():
    M_A, M_G, mask, logits = make_inputs()
    with pytest.raises(ValueError):
        smk_loss(logits, smk_targets(M_A, M_G, mask, "zscore", 1.0), "medium")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("tau", [1.0, 0.25])
def test_smk_metrics_match_reference(kind, top_k, tau):
    M_A, M_G, mask, logits = make_inputs(11, n=24, e=6)
    t = smk_targets(M_A, M_G, mask, kind, tau)
    got = {k: v.item() for k, v in smk_metrics(logits, t, top_k).items()}
    want = ref_metrics(logits, ref_delta_sc(M_A, M_G, mask, kind), tau, top_k)
    assert got["g_acc"] == pytest.approx(want["g_acc"], abs=1e-6)
    assert got["kl_div"] == pytest.approx(want["kl_div"], rel=1e-5, abs=1e-6)
    assert got["topk_overlap"] == pytest.approx(want["topk_overlap"], abs=1e-6)


def test_topk_overlap_nan_when_no_row_has_more_than_top_k_entries():
    M_A, M_G, mask, logits = make_inputs(5)
    mask = torch.zeros_like(mask)
    mask[:, :2] = True  # every row has exactly 2 = top_k defined entries
    t = smk_targets(M_A.nan_to_num(1.0), M_G.nan_to_num(1.0), mask, "zscore", 1.0)
    m = smk_metrics(logits, t, top_k=2)
    assert math.isnan(m["topk_overlap"].item())
    assert not math.isnan(m["g_acc"].item()) and not math.isnan(m["kl_div"].item())


def test_metrics_known_values():
    """A hand-checked case: ΔSC best = router argmax on row 0 only."""
    mask = torch.ones(2, 3, dtype=torch.bool)
    M_A = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    M_G = torch.zeros(2, 3, dtype=torch.float64)
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]], dtype=torch.float64)
    t = smk_targets(M_A, M_G, mask, "sigmoid", 1.0)
    m = smk_metrics(logits, t, top_k=1)
    assert m["g_acc"].item() == 0.5
    assert m["topk_overlap"].item() == 0.5
    assert smk_loss(logits, t, "hard").item() == pytest.approx(
        0.5 * (-log_softmax([5.0, 1.0, 0.0])[0] - log_softmax([5.0, 1.0, 0.0])[2]), rel=1e-6)


# -- Switch aux loss and z-loss --------------------------------------------------------------------
def test_switch_aux_loss_is_one_for_uniform_routing():
    n, e = 12, 4  # top_k = 2
    probs = torch.full((n, e), 1.0 / e, dtype=torch.float64)
    topi = torch.tensor([[t % e, (t + 1) % e] for t in range(n)])  # each expert gets n*k/e slots
    assert switch_aux_loss(probs, topi).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_switch_aux_loss_formula(k):
    g = torch.Generator().manual_seed(2)
    n, e = 10, 5
    probs = torch.randn(n, e, generator=g, dtype=torch.float64).softmax(-1)
    topi = probs.topk(k, -1).indices
    P = probs.tolist()
    pairs = [i for row in topi.tolist() for i in row]
    f = [pairs.count(j) / len(pairs) for j in range(e)]
    Pm = [sum(P[t][j] for t in range(n)) / n for j in range(e)]
    want = e * sum(fj * pj for fj, pj in zip(f, Pm))
    assert switch_aux_loss(probs, topi).item() == pytest.approx(want, rel=1e-12)


def test_router_z_loss():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64) * 3
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-6)


# -- gradient flow ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["hard", "soft"])
def test_smk_loss_gradient_reaches_only_the_logits(kind, target):
    """Targets must carry no gradient (module docstring: 'Nothing here carries gradient
    except the router logits passed to smk_loss'). BUG: smk_targets does not detach, so
    with M_A / M_G that require grad the soft target backpropagates into them."""
    M_A, M_G, mask, logits = make_inputs(9)
    M_A = M_A.nan_to_num(0.5).requires_grad_(True)
    M_G = M_G.nan_to_num(0.5).requires_grad_(True)
    logits = logits.clone().requires_grad_(True)
    t = smk_targets(M_A, M_G, mask, kind, 1.0)
    smk_loss(logits, t, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert M_A.grad is None, "smk_loss backpropagated into M_A"
    assert M_G.grad is None, "smk_loss backpropagated into M_G"


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_smk_loss_gradient_matches_reference(target):
    """d smk_loss / d logits, by autograd on the float64 reference formula."""
    M_A, M_G, mask, logits = make_inputs(13)
    t = smk_targets(M_A, M_G, mask, "zscore", 0.7)
    z = logits.clone().requires_grad_(True)
    smk_loss(z, t, target).backward()
    dsc = ref_delta_sc(M_A, M_G, mask, "zscore")
    rows = [r for r in range(N) if int(mask[r].sum()) >= 2]
    z2 = logits.clone().requires_grad_(True)
    lp = z2.log_softmax(-1)
    if target == "hard":
        terms = [-lp[r, argmax(dsc[r].tolist())] for r in rows]
    else:
        terms = []
        for r in rows:
            q = torch.tensor(ref_q(dsc[r].tolist(), 0.7), dtype=torch.float64)
            terms.append((torch.xlogy(q, q) - q * lp[r]).sum())
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-6)
    assert bool((z.grad[[r for r in range(N) if r not in rows]] == 0).all())
