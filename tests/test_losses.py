"""The router losses and smk metrics against float64 references written from docs/design.md
(not from the implementation): ΔSC (zscore, zscore_expert, sigmoid, surprise, log1p), the targets
(hard, soft, balanced = Sinkhorn), smk_loss with the router distribution restricted to the
defined experts D_t, g_acc / g_acc_dense / kl_div / topk_overlap / agreement, the Switch aux loss and
the router z-loss — and the global-batch semantics under DDP, simulated with two ranks
that run in lockstep on two threads."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from smk_lightning.losses import (
    delta_sc,
    router_z_loss,
    sinkhorn,
    smk_loss,
    smk_metrics,
    smk_targets,
    switch_aux_loss,
)

N, E = 9, 5
TARGETS = ["hard", "soft", "balanced"]
KINDS = ["zscore", "zscore_expert", "sigmoid", "surprise", "log1p"]
SINKHORN_CONVERGED = 1000  # iterations at which the tests' Sinkhorn projections are converged


# -- independent references (plain Python over float64 values) ---------------------------------
def ref_delta_sc(M_A, M_G, mask, kind):
    A, G, m = M_A.tolist(), M_G.tolist(), mask.tolist()
    n, e = len(m), len(m[0])
    cells = [(t, j) for t in range(n) for j in range(e) if m[t][j]]

    def standardise(M, group):
        """z-scores (population std) of the cells within each group; 0 for a constant group."""
        out = {}
        for key in {group(c) for c in cells}:
            grp = [c for c in cells if group(c) == key]
            vals = [M[t][j] for t, j in grp]
            mu = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
            out.update({c: (M[c[0]][c[1]] - mu) / sd if sd > 0 else 0.0 for c in grp})
        return out

    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    out = [[-math.inf] * e for _ in m]
    if kind in ("zscore", "zscore_expert"):
        group = (lambda c: 0) if kind == "zscore" else (lambda c: c[1])  # whole layer / per expert
        zA, zG = standardise(A, group), standardise(G, group)
    for t, j in cells:
        if kind in ("zscore", "zscore_expert"):
            out[t][j] = zA[(t, j)] - zG[(t, j)]
        elif kind == "sigmoid":
            out[t][j] = sig(A[t][j]) - sig(G[t][j])
        elif kind == "log1p":
            out[t][j] = math.log(1.0 + A[t][j]) - math.log(1.0 + G[t][j])
        else:
            out[t][j] = -G[t][j]
    return torch.tensor(out, dtype=torch.float64)


def defined(row):
    return [e for e, v in enumerate(row) if v != -math.inf]


def log_softmax_over(z, idx):
    """log p̃: log-softmax of z restricted to the experts idx (dict expert → log-prob)."""
    mx = max(z[e] for e in idx)
    lse = mx + math.log(sum(math.exp(z[e] - mx) for e in idx))
    return {e: z[e] - lse for e in idx}


def ref_q(row, tau):
    idx = defined(row)
    mx = max(row[e] for e in idx)
    ex = {e: math.exp((row[e] - mx) / tau) for e in idx}
    s = sum(ex.values())
    return [ex[e] / s if e in ex else 0.0 for e in range(len(row))]


def ref_sinkhorn(rows, iters=5000):
    """Converged Sinkhorn–Knopp projection of exp(rows) (a list of full rows): row sums 1,
    every column sum len(rows)/E. The projection is unique, so the order of the
    normalisations does not matter once converged."""
    if not rows:
        return []
    e = len(rows[0])
    K = [[math.exp(v - max(r)) for v in r] for r in rows]
    col_target = len(rows) / e
    for _ in range(iters):
        cols = [sum(r[j] for r in K) for j in range(e)]
        K = [[v * col_target / cols[j] for j, v in enumerate(r)] for r in K]
        K = [[v / sum(r) for v in r] for r in K]
    return K


def ref_targets_q(dsc, tau, target):
    """Q per row: soft (softmax over D_t), or for balanced the Sinkhorn rows on the rows
    where every expert is defined."""
    d = dsc.tolist()
    q = [ref_q(r, tau) if len(defined(r)) >= 1 else [0.0] * len(r) for r in d]
    if target == "balanced":
        dense = [t for t, r in enumerate(d) if len(defined(r)) == len(r)]
        for t, qr in zip(dense, ref_sinkhorn([[v / tau for v in d[t]] for t in dense])):
            q[t] = qr
    return q


def ref_kl(q, z, idx):
    lp = log_softmax_over(z, idx)
    return sum(q[e] * (math.log(q[e]) - lp[e]) for e in idx if q[e] > 0)


def argmax_over(row, idx):
    return max(idx, key=lambda e: row[e])


def topk_over(row, idx, k):
    return set(sorted(idx, key=lambda e: -row[e])[:k])


def ref_loss(logits, dsc, target, tau):
    z, d = logits.tolist(), dsc.tolist()
    q = ref_targets_q(dsc, tau, target)
    terms = []
    for zt, dt, qt in zip(z, d, q):
        idx = defined(dt)
        if len(idx) < 2:
            continue
        if target == "hard":
            terms.append(-log_softmax_over(zt, idx)[argmax_over(dt, idx)])
        else:
            terms.append(ref_kl(qt, zt, idx))
    return sum(terms) / len(terms) if terms else 0.0


def ref_metrics(logits, dsc, tau, k, topi):
    z, d, sel = logits.tolist(), dsc.tolist(), topi.tolist()
    nan = float("nan")

    def mean(xs):
        return sum(xs) / len(xs) if xs else nan

    hit, hit_dense, kl, ov, agree = [], [], [], [], []
    for zt, dt, st in zip(z, d, sel):
        idx = defined(dt)
        if len(idx) >= 2:
            h = argmax_over(zt, idx) == argmax_over(dt, idx)
            hit.append(h)
            kl.append(ref_kl(ref_q(dt, tau), zt, idx))
            if len(idx) == len(dt):
                hit_dense.append(h)
        if len(idx) > k:
            ov.append(len(set(st) & topk_over(dt, idx, k)) / k)
        if len(idx) >= 3:
            lp = log_softmax_over(zt, idx)
            r = ref_corr([math.exp(lp[e]) for e in idx], [dt[e] for e in idx])
            if r is not None:
                agree.append(r)
    return {"g_acc": mean(hit), "g_acc_dense": mean(hit_dense), "kl_div": mean(kl), "topk_overlap": mean(ov),
            "agreement": mean(agree)}


def ref_corr(xs, ys):
    """Pearson correlation of two lists; None when either is constant."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


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
    mask[2, [0, e - 1]] = True
    mask[3] = True
    mask[n // 2:: 3] = True  # a few more dense rows (for the balanced target)
    M_A[~mask] = float("nan")  # undefined statistics are NaN, as the engines return them
    M_G[~mask] = float("nan")
    return M_A, M_G, mask, logits


def dense_stats(seed, n, e):
    g = torch.Generator().manual_seed(seed)
    M_A = torch.rand(n, e, generator=g, dtype=torch.float64) * 3
    M_G = torch.rand(n, e, generator=g, dtype=torch.float64) * 5
    return M_A, M_G, torch.ones(n, e, dtype=torch.bool)


# -- a simulated DDP all_reduce: ranks are threads that meet at every collective ----------------------
def run_ranks(fns, timeout=60.0):
    """Run fns[r](all_reduce) for every rank r on its own thread; ``all_reduce`` sums a tensor
    over the ranks (like dist.all_reduce with SUM), so every rank must call it the same
    number of times in the same order, as a real collective requires (else the barrier
    times out). Returns the ranks' results."""
    W = len(fns)
    barrier = threading.Barrier(W, timeout=timeout)
    slots, results, errors = [None] * W, [None] * W, []

    def make_all_reduce(r):
        def all_reduce(t):
            slots[r] = t.detach().clone()
            barrier.wait()
            total = slots[0].clone()
            for s in slots[1:]:
                total = total + s
            barrier.wait()  # every rank has read the slots before anyone writes the next
            return total
        return all_reduce

    def body(r):
        try:
            results[r] = fns[r](make_all_reduce(r))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(W)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def halves(n, cut):
    return [slice(0, cut), slice(cut, n)]


# -- ΔSC ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_delta_sc_matches_reference(kind, seed):
    M_A, M_G, mask, _ = make_inputs(seed)
    got = delta_sc(M_A, M_G, mask, kind)
    want = ref_delta_sc(M_A, M_G, mask, kind)
    assert torch.equal(torch.isinf(got), ~mask) and bool((got[~mask] == -math.inf).all())
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["zscore", "zscore_expert"])
def test_zscore_uses_only_defined_entries_and_is_affine_invariant(kind):
    """Changing an undefined entry's value changes nothing; ΔSC is shift/scale invariant."""
    M_A, M_G, mask, _ = make_inputs(3)
    base = delta_sc(M_A, M_G, mask, kind)
    A2, G2 = M_A.clone(), M_G.clone()
    A2[~mask], G2[~mask] = 1e6, -7.0
    torch.testing.assert_close(delta_sc(A2, G2, mask, kind)[mask], base[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta_sc(M_A * 4 + 2, M_G * 0.5 - 1, mask, kind)[mask], base[mask],
                               rtol=1e-10, atol=1e-10)


def test_zscore_expert_ignores_per_expert_scale_zscore_does_not():
    """docs/design.md: zscore_expert standardises each expert column, so an expert whose outputs
    and gradients are larger overall is not preferred for every token merely for that."""
    M_A, M_G, mask, _ = make_inputs(4, n=30, e=4)
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=torch.float64)
    shift = torch.tensor([0.0, 5.0, -2.0, 1.0], dtype=torch.float64)
    base = delta_sc(M_A, M_G, mask, "zscore_expert")
    got = delta_sc(M_A * scale + shift, M_G * scale.flip(0) + shift, mask, "zscore_expert")
    torch.testing.assert_close(got[mask], base[mask], rtol=1e-10, atol=1e-10)
    z_base = delta_sc(M_A, M_G, mask, "zscore")
    z_got = delta_sc(M_A * scale + shift, M_G * scale.flip(0) + shift, mask, "zscore")
    assert (z_got[mask] - z_base[mask]).abs().max() > 0.1
    # every defined column of zscore_expert has mean 0 (z(M_A) and z(M_G) both do)
    col_sum = torch.where(mask, got, 0.0).sum(0)
    torch.testing.assert_close(col_sum, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-10)


def test_zscore_expert_with_a_starved_column_is_finite():
    """An expert defined on one token only (or on none) gives no NaN and no +inf."""
    M_A, M_G, mask, _ = make_inputs(6, n=12, e=4)
    mask[:, 2] = False
    mask[5, 2] = True
    mask[:, 3] = False
    M_A, M_G = M_A.nan_to_num(1.0), M_G.nan_to_num(1.0)
    got = delta_sc(M_A, M_G, mask, "zscore_expert")
    assert bool(torch.isfinite(got[mask]).all()) and bool((got[~mask] == -math.inf).all())
    want = ref_delta_sc(M_A, M_G, mask, "zscore_expert")
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-12, atol=1e-12)


def test_delta_sc_unknown_kind_raises():
    M_A, M_G, mask, _ = make_inputs()
    with pytest.raises(ValueError, match="nope"):
        delta_sc(M_A, M_G, mask, "nope")


# -- targets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_targets_match_reference(target):
    """soft: softmax_{D_t}(ΔSC/τ); balanced: converged Sinkhorn on the dense rows, soft elsewhere;
    Q is zero outside D_t; hard: argmax_{D_t} ΔSC; the row sets."""
    M_A, M_G, mask, _ = make_inputs(4, n=15)
    t = smk_targets(M_A, M_G, mask, "zscore", 0.5, target=target, sinkhorn_iters=SINKHORN_CONVERGED)
    dsc = ref_delta_sc(M_A, M_G, mask, "zscore")
    assert torch.equal(t.rows_N, mask.sum(1) >= 2)
    assert torch.equal(t.dense_N, mask.all(1))
    assert torch.equal(t.mask_NE, mask)
    torch.testing.assert_close(t.dsc_NE[mask], dsc[mask], rtol=1e-12, atol=1e-12)
    q = torch.tensor(ref_targets_q(dsc, 0.5, target), dtype=torch.float64)
    rows = t.rows_N
    torch.testing.assert_close(t.q_NE[rows].double(), q[rows], rtol=1e-10, atol=1e-12)
    some = mask.any(1, keepdim=True)  # (a row with no defined expert is in no mean; its Q is not checked)
    assert bool((t.q_NE[~mask & some] == 0).all())
    for r in torch.nonzero(rows).flatten().tolist():
        assert t.hard_N[r].item() == argmax_over(dsc[r].tolist(), defined(dsc[r].tolist()))
    assert bool(torch.isfinite(t.q_NE).all())


def test_balanced_targets_have_equal_columns_on_the_dense_rows():
    M_A, M_G, mask, _ = make_inputs(8, n=40, e=4)
    t = smk_targets(M_A, M_G, mask, "zscore", 1.0, target="balanced")  # default iterations
    n_dense = int(mask.all(1).sum())
    assert n_dense >= 8
    q = t.q_NE[t.dense_N]
    torch.testing.assert_close(q.sum(1), torch.ones(n_dense, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.sum(0), torch.full((4,), n_dense / 4, dtype=torch.float64), rtol=1e-6, atol=0)
    # a non-dense row keeps its soft target
    soft = smk_targets(M_A, M_G, mask, "zscore", 1.0, target="soft")
    torch.testing.assert_close(t.q_NE[~t.dense_N], soft.q_NE[~t.dense_N], rtol=0, atol=0)


def test_balanced_without_dense_rows_is_soft():
    M_A, M_G, mask, _ = make_inputs(2)
    mask[:, 0] = False  # no row has every expert defined
    bal = smk_targets(M_A, M_G, mask, "zscore", 0.7, target="balanced")
    soft = smk_targets(M_A, M_G, mask, "zscore", 0.7, target="soft")
    assert not bool(bal.dense_N.any())
    torch.testing.assert_close(bal.q_NE, soft.q_NE, rtol=0, atol=0)


# -- Sinkhorn -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,e", [(64, 8), (48, 4), (30, 5)])
@pytest.mark.parametrize("kind", ["zscore", "zscore_expert"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_default_iterations_reach_the_marginals(n, e, kind, seed):
    """The default 20 iterations on z-scored ΔSC with τ = 1 (the config defaults): row sums
    exactly 1, column sums n/E to 1e-6 relative (measured: ≤ 2e-9 on these inputs; at
    τ = 0.5 20 iterations leave up to ~2e-4, at τ = 0.3 up to ~1e-2 — there 50 leave ≤ 8e-5)."""
    M_A, M_G, mask = dense_stats(seed, n, e)
    d = delta_sc(M_A, M_G, mask, kind)
    q = sinkhorn(d / 1.0, torch.ones(n, dtype=torch.bool), 20)
    assert bool((q >= 0).all())
    torch.testing.assert_close(q.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.sum(0), torch.full((e,), n / e, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_sinkhorn_converges_to_the_reference_projection(tau):
    M_A, M_G, mask = dense_stats(5, 16, 4)
    d = delta_sc(M_A, M_G, mask, "zscore") / tau
    q = sinkhorn(d, torch.ones(16, dtype=torch.bool), SINKHORN_CONVERGED)
    want = torch.tensor(ref_sinkhorn(d.tolist()), dtype=torch.float64)
    torch.testing.assert_close(q, want, rtol=1e-9, atol=1e-12)


def test_sinkhorn_is_zero_outside_its_rows_and_balances_only_them():
    M_A, M_G, mask = dense_stats(3, 20, 4)
    d = delta_sc(M_A, M_G, mask, "zscore")
    d[[1, 7]] = -math.inf  # a row outside rows_N may hold anything
    d[4, 2] = float("nan")
    rows = torch.ones(20, dtype=torch.bool)
    rows[[1, 4, 7, 11, 12]] = False
    q = sinkhorn(d, rows, 200)
    assert bool((q[~rows] == 0).all())
    assert bool(torch.isfinite(q).all())
    n_rows = int(rows.sum())
    torch.testing.assert_close(q[rows].sum(1), torch.ones(n_rows, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.sum(0), torch.full((4,), n_rows / 4, dtype=torch.float64), rtol=1e-9, atol=0)
    want = torch.tensor(ref_sinkhorn(d[rows].tolist()), dtype=torch.float64)
    torch.testing.assert_close(q[rows], want, rtol=1e-8, atol=1e-12)


def test_sinkhorn_without_rows_is_zero():
    q = sinkhorn(torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, dtype=torch.bool), 20)
    assert bool((q == 0).all())


@pytest.mark.parametrize("cut", [10, 7])
def test_sinkhorn_column_sums_are_global_over_ranks(cut):
    """2 simulated ranks: each rank's rows equal the full batch's, and the column sums are
    balanced only over both ranks together (each rank alone is not balanced)."""
    n, e = 20, 4
    M_A, M_G, mask = dense_stats(9, n, e)
    d = delta_sc(M_A, M_G, mask, "zscore")
    rows = torch.ones(n, dtype=torch.bool)
    rows[[2, 13]] = False
    full = sinkhorn(d, rows, 20)
    parts = halves(n, cut)
    got = run_ranks([lambda ar, s=s: sinkhorn(d[s], rows[s], 20, ar) for s in parts])
    torch.testing.assert_close(torch.cat(got), full, rtol=1e-12, atol=1e-14)
    cols = got[0].sum(0) + got[1].sum(0)
    torch.testing.assert_close(cols, torch.full((e,), int(rows.sum()) / e, dtype=torch.float64), rtol=1e-6, atol=0)
    local = sinkhorn(d[parts[0]], rows[parts[0]], 20)
    assert not torch.allclose(local, got[0], rtol=1e-4, atol=1e-6)


# -- smk_loss ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_smk_loss_matches_reference(kind, target, tau):
    M_A, M_G, mask, logits = make_inputs(7, n=15)
    t = smk_targets(M_A, M_G, mask, kind, tau, target=target, sinkhorn_iters=SINKHORN_CONVERGED)
    assert torch.equal(t.rows_N, mask.sum(1) >= 2)
    dsc = ref_delta_sc(M_A, M_G, mask, kind)
    got = smk_loss(logits, t, target)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_loss(logits, dsc, target, tau), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_layers_stacked_equal_each_layer_alone(kind, target):
    """[L, N, E] (the training step's MoE layers at once) gives every layer the targets,
    metrics and loss it gets alone: moments, Sinkhorn columns and row counts per layer."""
    layers = [make_inputs(seed, n=15) for seed in (3, 4, 5)]
    layers[1][2][:] = True  # one fully dense layer, one with another scale
    layers[1][0][:], layers[1][1][:] = layers[1][0].nan_to_num(2.0), layers[1][1].nan_to_num(0.5)
    layers[2][1].mul_(40.0)
    M_A, M_G, mask, logits = (torch.stack(ts) for ts in zip(*layers))
    t = smk_targets(M_A, M_G, mask, kind, 0.5, target=target, sinkhorn_iters=50)
    loss_L = smk_loss(logits, t, target)
    assert loss_L.shape == (3,)
    for i, (a, g, m, lg) in enumerate(layers):
        alone = smk_targets(a, g, m, kind, 0.5, target=target, sinkhorn_iters=50)
        for f in ("mask_NE", "rows_N", "dense_N", "hard_N", "q_NE", "dsc_NE"):
            torch.testing.assert_close(getattr(t[i], f), getattr(alone, f), rtol=1e-12, atol=1e-12, msg=f)
        torch.testing.assert_close(loss_L[i], smk_loss(lg, alone, target), rtol=1e-12, atol=1e-12)
        got, ref = smk_metrics(lg, t[i], 2), smk_metrics(lg, alone, 2)
        assert all(torch.equal(got[k].isnan(), ref[k].isnan()) and torch.allclose(got[k].nan_to_num(), ref[k].nan_to_num(), rtol=1e-12, atol=1e-12) for k in ref)


def test_smk_loss_masked_known_value():
    """A routed row: experts 1 and 3 defined, expert 0 (undefined) has the largest logit.
    p̃ is the softmax over {1, 3} only, so the loss does not depend on the logits of 0, 2."""
    mask = torch.tensor([[False, True, False, True]])
    M_A = torch.tensor([[0.0, 0.2, 0.0, 0.9]], dtype=torch.float64)
    t = smk_targets(M_A, -M_A, mask, "surprise", 1.0, target="hard")  # ΔSC = −M_G = M_A: best is 3
    assert t.hard_N.item() == 3
    logits = torch.tensor([[9.0, 1.0, -4.0, 0.5]], dtype=torch.float64)
    want = -(0.5 - math.log(math.exp(1.0) + math.exp(0.5)))
    assert smk_loss(logits, t, "hard").item() == pytest.approx(want, rel=1e-14)
    logits2 = logits.clone()
    logits2[0, [0, 2]] = torch.tensor([-30.0, 50.0], dtype=torch.float64)
    assert smk_loss(logits2, t, "hard").item() == pytest.approx(want, rel=1e-14)
    q = [math.exp(0.2) / (math.exp(0.2) + math.exp(0.9)), math.exp(0.9) / (math.exp(0.2) + math.exp(0.9))]
    lp = [1.0 - math.log(math.exp(1.0) + math.exp(0.5)), 0.5 - math.log(math.exp(1.0) + math.exp(0.5))]
    kl = sum(qi * (math.log(qi) - li) for qi, li in zip(q, lp))
    t_soft = smk_targets(M_A, -M_A, mask, "surprise", 1.0, target="soft")
    assert smk_loss(logits2, t_soft, "soft").item() == pytest.approx(kl, rel=1e-12)


@pytest.mark.parametrize("target", TARGETS)
def test_smk_loss_float32_logits_and_float64_stats(target):
    """float32 logits compute in float32 (promote_types(dtype, float32)); the value matches
    the float64 reference to float32 accuracy."""
    M_A, M_G, mask, logits = make_inputs(7, n=15)
    t = smk_targets(M_A, M_G, mask, "zscore", 1.0, target=target, sinkhorn_iters=SINKHORN_CONVERGED)
    got = smk_loss(logits.float(), t, target)
    want = ref_loss(logits.float().double(), ref_delta_sc(M_A, M_G, mask, "zscore"), target, 1.0)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_smk_loss_half_logits_count_the_rows_exactly(dtype):
    """BUG (smk.py, smk_loss): the row count is cast to the logits' dtype,
    ``all_reduce(t.rows_N.sum().to(logits_NE.dtype))``, so with bf16 logits (bf16-true
    precision: the router weight, hence the recomputed logits, are bf16) a count of 257
    rows becomes 256 (bf16 has 8 significant bits) and the loss is 257/256 too large;
    float16 does the same above 2048 rows (4097 → 4096). The loss of half-precision logits
    must equal that of the same logits upcast to float32."""
    n = 257 if dtype == torch.bfloat16 else 4097
    M_A, M_G, mask = dense_stats(0, n, 4)
    logits = torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    t = smk_targets(M_A, M_G, mask, "zscore", 1.0)
    got = smk_loss(logits, t, "soft").item()
    want = smk_loss(logits.float(), t, "soft").item()
    assert got == pytest.approx(want, rel=1e-5), f"{got} != {want} (ratio {got / want:.6f})"


@pytest.mark.parametrize("target", TARGETS)
def test_smk_loss_without_rows_is_zero_with_a_gradient_path(target):
    M_A, M_G, mask, logits = make_inputs()
    mask = torch.zeros_like(mask)
    mask[1, 3] = True  # only rows with < 2 defined entries (make_inputs defines M at [1, 3])
    logits = logits.clone().requires_grad_(True)
    t = smk_targets(M_A, M_G, mask, "zscore", 1.0, target=target)
    loss = smk_loss(logits, t, target)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None and bool((logits.grad == 0).all())
    m = smk_metrics(logits.detach(), t, top_k=2)
    assert set(m) == {"g_acc", "g_acc_dense", "kl_div", "topk_overlap", "agreement"}
    assert all(math.isnan(v.item()) for v in m.values())


def test_smk_loss_unknown_target_raises():
    M_A, M_G, mask, logits = make_inputs()
    with pytest.raises(ValueError):
        smk_loss(logits, smk_targets(M_A, M_G, mask, "zscore", 1.0), "medium")


# -- metrics -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("tau", [1.0, 0.25])
@pytest.mark.parametrize("selection", ["logits", "given"])
def test_smk_metrics_match_reference(kind, top_k, tau, selection):
    """S_t is the router's actual selection (e.g. biased by aux-free balancing), passed as
    topi_NK; the logits' own top-k when not given."""
    M_A, M_G, mask, logits = make_inputs(11, n=24, e=6)
    t = smk_targets(M_A, M_G, mask, kind, tau)
    if selection == "given":
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        topi = (logits + 3 * noise).topk(top_k, 1).indices
        got = {k: v.item() for k, v in smk_metrics(logits, t, top_k, topi).items()}
    else:
        topi = logits.topk(top_k, 1).indices
        got = {k: v.item() for k, v in smk_metrics(logits, t, top_k).items()}
    want = ref_metrics(logits, ref_delta_sc(M_A, M_G, mask, kind), tau, top_k, topi)
    assert set(got) == set(want)
    assert not math.isnan(want["g_acc_dense"])
    assert got["g_acc"] == pytest.approx(want["g_acc"], abs=1e-12)
    assert got["g_acc_dense"] == pytest.approx(want["g_acc_dense"], abs=1e-12)
    assert got["kl_div"] == pytest.approx(want["kl_div"], rel=1e-10, abs=1e-12)
    assert got["topk_overlap"] == pytest.approx(want["topk_overlap"], abs=1e-12)
    assert got["agreement"] == pytest.approx(want["agreement"], rel=1e-10, abs=1e-12)


def test_agreement_hand_built():
    """ΔSC = −M_G (surprise). Row 0: p̃ = (1, 2, 3)/6 against ΔSC = (−3, −2, −1): same order
    and spacing, correlation 1. Row 1: p̃ reversed: −1. Row 2: two defined experts only, left
    out. Row 3: constant ΔSC, left out. So rows 0–3 average to 0, and row 2 alone is NaN."""
    mask = torch.tensor([[True, True, True], [True, True, True], [True, True, False], [True, True, True]])
    M_G = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    M_A = torch.zeros_like(M_G)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 2.0, 1.0], [1.0, 2.0, 3.0]],
                          dtype=torch.float64).log()  # softmax = the row / its sum

    def agreement(rows):
        t = smk_targets(M_A[rows], M_G[rows], mask[rows], "surprise", 1.0)
        return smk_metrics(logits[rows], t, top_k=1)["agreement"].item()

    assert agreement([0]) == pytest.approx(1.0, abs=1e-12)
    assert agreement([1]) == pytest.approx(-1.0, abs=1e-12)
    assert agreement([0, 1, 2, 3]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(agreement([2])) and math.isnan(agreement([3]))


def test_every_delta_sc_name_has_an_implementation_and_the_config_offers_exactly_them():
    """The variant lists are kept once (losses/smk.py's Literals); the config field uses them."""
    import typing

    from smk_lightning.losses.smk import DELTA_SC, TARGETS
    from smk_lightning.training.config import RouterConfig

    hints = typing.get_type_hints(RouterConfig)
    assert typing.get_args(hints["delta_sc"]) == DELTA_SC
    assert typing.get_args(hints["target"]) == TARGETS
    assert set(DELTA_SC) == set(KINDS)
    M_A, M_G, mask, logits = make_inputs()
    for kind in DELTA_SC:
        assert torch.isfinite(delta_sc(M_A, M_G, mask, kind)[mask]).all(), kind
    for target in TARGETS:
        assert torch.isfinite(smk_loss(logits, smk_targets(M_A, M_G, mask, "zscore", 1.0, target), target))


def test_topk_overlap_uses_the_given_selection():
    M_A, M_G, mask, logits = make_inputs(12, n=20, e=6)
    t = smk_targets(M_A, M_G, mask, "zscore", 1.0)
    best = torch.where(mask, t.dsc_NE, -math.inf).topk(2, 1).indices
    wide = mask.sum(1) > 2
    assert smk_metrics(logits, t, 2, best)["topk_overlap"].item() == 1.0
    worst = torch.where(mask, -t.dsc_NE, -math.inf).topk(2, 1).indices  # the two lowest (wide rows have ≥ 3)
    got = smk_metrics(logits, t, 2, worst)["topk_overlap"].item()
    want = sum(len(set(w) & set(b)) / 2 for w, b, keep in zip(worst.tolist(), best.tolist(), wide.tolist())
               if keep) / int(wide.sum())
    assert got == pytest.approx(want, abs=1e-12) and got < 0.5


def test_topk_overlap_nan_when_no_row_has_more_than_top_k_entries():
    M_A, M_G, mask, logits = make_inputs(5)
    mask = torch.zeros_like(mask)
    mask[:, :2] = True  # every row has exactly 2 = top_k defined entries
    t = smk_targets(M_A.nan_to_num(1.0), M_G.nan_to_num(1.0), mask, "zscore", 1.0)
    m = smk_metrics(logits, t, top_k=2)
    assert math.isnan(m["topk_overlap"].item())
    assert math.isnan(m["g_acc_dense"].item())  # no row has every expert defined
    assert not math.isnan(m["g_acc"].item()) and not math.isnan(m["kl_div"].item())


def test_g_acc_dense_counts_only_dense_rows():
    """Row 0 routed (2 of 3 defined) and a hit; row 1 dense and a miss: g_acc = 1/2,
    g_acc_dense = 0. Row 0's global logit argmax (expert 2) is undefined: under p̃ it is a hit."""
    mask = torch.tensor([[True, True, False], [True, True, True]])
    M_A = torch.tensor([[1.0, 3.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    M_G = torch.zeros(2, 3, dtype=torch.float64)
    logits = torch.tensor([[0.0, 1.0, 7.0], [5.0, 1.0, 0.0]], dtype=torch.float64)
    t = smk_targets(M_A, M_G, mask, "sigmoid", 1.0)
    m = smk_metrics(logits, t, top_k=1)
    assert m["g_acc"].item() == 0.5
    assert m["g_acc_dense"].item() == 0.0
    # topk_overlap over rows with > 1 defined: both; S_0 = {2} (logits' top-1) misses {1}, S_1 = {0} misses {2}
    assert m["topk_overlap"].item() == 0.0
    assert smk_metrics(logits, t, 1, torch.tensor([[1], [2]]))["topk_overlap"].item() == 1.0


def test_metrics_known_values():
    """A hand-checked case: ΔSC best = router argmax on row 0 only."""
    mask = torch.ones(2, 3, dtype=torch.bool)
    M_A = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    M_G = torch.zeros(2, 3, dtype=torch.float64)
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]], dtype=torch.float64)
    t = smk_targets(M_A, M_G, mask, "sigmoid", 1.0)
    m = smk_metrics(logits, t, top_k=1)
    assert m["g_acc"].item() == 0.5
    assert m["g_acc_dense"].item() == 0.5
    assert m["topk_overlap"].item() == 0.5
    lp = log_softmax_over([5.0, 1.0, 0.0], [0, 1, 2])
    assert smk_loss(logits, t, "hard").item() == pytest.approx(0.5 * (-lp[0] - lp[2]), rel=1e-12)


# -- gradient flow ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_smk_loss_gradient_reaches_only_the_logits(kind, target):
    """Targets carry no gradient: with M_A / M_G that require grad, only the logits get one."""
    M_A, M_G, mask, logits = make_inputs(9)
    M_A = M_A.nan_to_num(0.5).requires_grad_(True)
    M_G = M_G.nan_to_num(0.5).requires_grad_(True)
    logits = logits.clone().requires_grad_(True)
    t = smk_targets(M_A, M_G, mask, kind, 1.0, target=target)
    smk_loss(logits, t, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert M_A.grad is None, "smk_loss backpropagated into M_A"
    assert M_G.grad is None, "smk_loss backpropagated into M_G"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["zscore", "zscore_expert"])
def test_smk_loss_gradient_matches_reference(target, kind):
    """d smk_loss / d logits, by autograd on the float64 reference formula (log-softmax over D_t)."""
    M_A, M_G, mask, logits = make_inputs(13, n=15)
    t = smk_targets(M_A, M_G, mask, kind, 0.7, target=target, sinkhorn_iters=SINKHORN_CONVERGED)
    z = logits.clone().requires_grad_(True)
    smk_loss(z, t, target).backward()
    dsc = ref_delta_sc(M_A, M_G, mask, kind)
    q = ref_targets_q(dsc, 0.7, target)
    rows = [r for r in range(len(mask)) if int(mask[r].sum()) >= 2]
    z2 = logits.clone().requires_grad_(True)
    terms = []
    for r in rows:
        idx = defined(dsc[r].tolist())
        lp = z2[r, idx].log_softmax(-1)
        if target == "hard":
            terms.append(-lp[idx.index(argmax_over(dsc[r].tolist(), idx))])
        else:
            qr = torch.tensor([q[r][e] for e in idx], dtype=torch.float64)
            terms.append((torch.xlogy(qr, qr) - qr * lp).sum())
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_smk_gradient_is_exactly_zero_on_undefined_logits(target, scale):
    """A routed row never pushes down an expert it knows nothing about: the gradient on an
    undefined expert's logit is exactly 0.0 (not approximately), rows with 0 or 1 defined
    experts get exactly 0 everywhere, and nothing is NaN — also with huge logits."""
    M_A, M_G, mask, logits = make_inputs(14, n=18)
    assert {0, 1, 2} <= set(mask.sum(1).tolist()) and bool(mask.all(1).any())
    z = (logits * scale).requires_grad_(True)
    t = smk_targets(M_A, M_G, mask, "zscore", 0.5, target=target)
    loss = smk_loss(z, t, target)
    loss.backward()
    assert math.isfinite(loss.item())
    assert bool(torch.isfinite(z.grad).all()), z.grad
    assert bool((z.grad[~mask] == 0.0).all())
    assert bool((z.grad[mask.sum(1) < 2] == 0.0).all())
    # the defined entries of the valid rows do get a gradient, which sums to 0 per row (softmax)
    valid = mask.sum(1) >= 2
    assert bool((z.grad[valid & mask.all(1)] != 0).any())
    torch.testing.assert_close(z.grad.sum(1), torch.zeros(len(z), dtype=torch.float64), rtol=0, atol=1e-12)


def test_smk_gradient_with_infinite_undefined_logits_is_finite():
    """An undefined logit at ±inf (e.g. a masked-out expert) must not poison the row."""
    M_A, M_G, mask, logits = make_inputs(14, n=18)
    r = int(torch.nonzero((mask.sum(1) >= 2) & ~mask.all(1))[0])
    e_out = int(torch.nonzero(~mask[r])[0])
    logits = logits.clone()
    logits[r, e_out] = -math.inf
    for target in TARGETS:
        z = logits.clone().requires_grad_(True)
        t = smk_targets(M_A, M_G, mask, "zscore", 1.0, target=target)
        loss = smk_loss(z, t, target)
        loss.backward()
        assert math.isfinite(loss.item()), target
        assert bool(torch.isfinite(z.grad).all()) and z.grad[r, e_out].item() == 0.0, target


# -- DDP: global batch over 2 simulated ranks --------------------------------------------------------
@pytest.mark.parametrize("kind", ["zscore", "zscore_expert"])
@pytest.mark.parametrize("cut", [9, 5])
def test_zscore_moments_are_global_over_ranks(kind, cut):
    """Each rank's ΔSC equals its rows of the full batch's (global means and stds)."""
    M_A, M_G, mask, _ = make_inputs(15, n=18)
    full = delta_sc(M_A, M_G, mask, kind)
    got = run_ranks([lambda ar, s=s: delta_sc(M_A[s], M_G[s], mask[s], kind, ar) for s in halves(18, cut)])
    torch.testing.assert_close(torch.cat(got), full, rtol=1e-12, atol=1e-12)
    alone = delta_sc(M_A[:cut], M_G[:cut], mask[:cut], kind)
    assert not torch.allclose(alone[mask[:cut]], got[0][mask[:cut]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["zscore", "zscore_expert", "sigmoid"])
@pytest.mark.parametrize("cut", [9, 4])
def test_smk_loss_over_two_ranks_sums_to_the_full_batch(target, kind, cut):
    """smk_loss on each rank is its share of the global mean: the ranks' values sum to the
    full-batch loss, each rank's targets are the full batch's rows (z-score moments and
    Sinkhorn columns global), and the gradients are the full batch's rows."""
    n = 18
    M_A, M_G, mask, logits = make_inputs(16, n=n)
    z_full = logits.clone().requires_grad_(True)
    t_full = smk_targets(M_A, M_G, mask, kind, 0.8, target=target)
    loss_full = smk_loss(z_full, t_full, target)
    loss_full.backward()
    parts = halves(n, cut)
    zs = [logits[s].clone().requires_grad_(True) for s in parts]

    def rank(s, z):
        def fn(ar):
            t = smk_targets(M_A[s], M_G[s], mask[s], kind, 0.8, target=target, all_reduce=ar)
            return t, smk_loss(z, t, target, all_reduce=ar)
        return fn

    (t0, l0), (t1, l1) = run_ranks([rank(s, z) for s, z in zip(parts, zs)])
    torch.testing.assert_close(torch.cat([t0.q_NE, t1.q_NE]), t_full.q_NE, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.cat([t0.hard_N, t1.hard_N]), t_full.hard_N)
    assert (l0 + l1).item() == pytest.approx(loss_full.item(), rel=1e-12, abs=1e-14)
    (l0 + l1).backward()
    torch.testing.assert_close(torch.cat([zs[0].grad, zs[1].grad]), z_full.grad, rtol=1e-11, atol=1e-14)


def test_smk_loss_rank_without_valid_rows():
    """A rank whose rows all have < 2 defined experts contributes 0 (and a zero gradient)
    while the other rank's share is divided by the global count."""
    M_A, M_G, mask, logits = make_inputs(17, n=12)
    mask[:4] = False
    mask[1, 3] = True  # one defined expert (make_inputs defines M at [1, 3])
    full = smk_loss(logits, smk_targets(M_A, M_G, mask, "zscore", 1.0), "soft")

    def rank(s):
        return lambda ar: smk_loss(logits[s], smk_targets(M_A[s], M_G[s], mask[s], "zscore", 1.0, all_reduce=ar),
                                   "soft", all_reduce=ar)

    l0, l1 = run_ranks([rank(s) for s in halves(12, 4)])
    assert l0.item() == 0.0
    assert (l0 + l1).item() == pytest.approx(full.item(), rel=1e-12)


# -- Switch aux loss and z-loss --------------------------------------------------------------------
def test_switch_aux_loss_is_one_for_uniform_routing():
    n, e = 12, 4  # top_k = 2
    probs = torch.full((n, e), 1.0 / e, dtype=torch.float64)
    topi = torch.tensor([[t % e, (t + 1) % e] for t in range(n)])  # each expert gets n*k/e slots
    assert switch_aux_loss(probs, topi).item() == pytest.approx(1.0, abs=1e-12)


def ref_switch(P, topi, e):
    n = len(P)
    pairs = [i for row in topi for i in row]
    f = [pairs.count(j) / len(pairs) for j in range(e)]
    Pm = [sum(P[t][j] for t in range(n)) / n for j in range(e)]
    return e * sum(fj * pj for fj, pj in zip(f, Pm))


@pytest.mark.parametrize("k", [1, 2])
def test_switch_aux_loss_formula(k):
    g = torch.Generator().manual_seed(2)
    n, e = 10, 5
    probs = torch.randn(n, e, generator=g, dtype=torch.float64).softmax(-1)
    topi = probs.topk(k, -1).indices
    want = ref_switch(probs.tolist(), topi.tolist(), e)
    assert switch_aux_loss(probs, topi).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cut", [5, 3])
def test_switch_aux_loss_over_two_ranks_is_the_global_loss(k, cut):
    """With world_size W each rank returns W × its additive share: the mean over the ranks
    (what DDP does to gradients) is the full-batch loss, and the mean of the ranks'
    gradients w.r.t. their probabilities is the full batch's gradient."""
    g = torch.Generator().manual_seed(4)
    n, e = 10, 5
    logits = torch.randn(n, e, generator=g, dtype=torch.float64)
    topi = (logits + torch.randn(n, e, generator=g, dtype=torch.float64)).topk(k, -1).indices
    probs = logits.softmax(-1).requires_grad_(True)
    full = switch_aux_loss(probs, topi)
    assert full.item() == pytest.approx(ref_switch(probs.tolist(), topi.tolist(), e), rel=1e-12)
    full.backward()
    parts = halves(n, cut)
    ps = [probs.detach()[s].clone().requires_grad_(True) for s in parts]
    l0, l1 = run_ranks([lambda ar, p=p, s=s: switch_aux_loss(p, topi[s], ar, 2) for p, s in zip(ps, parts)])
    assert ((l0 + l1) / 2).item() == pytest.approx(full.item(), rel=1e-12)
    ((l0 + l1) / 2).backward()
    torch.testing.assert_close(torch.cat([ps[0].grad, ps[1].grad]), probs.grad, rtol=1e-12, atol=1e-15)
    # a single rank's value is not the local Switch loss of its own rows
    assert l0.item() != pytest.approx(switch_aux_loss(ps[0].detach(), topi[parts[0]]).item(), rel=1e-6)


def test_router_z_loss():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64) * 3
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-12)
