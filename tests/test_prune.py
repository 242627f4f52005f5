"""Pruners: exact counts, N:M patterns, numpy references, and output-error orderings on synthetic activations."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_holo.prune.admm import admm_recover
from mlx_holo.prune.magnitude import magnitude_prune
from mlx_holo.prune.masks import (check_nm, nm_mask, parse_nm, sparsity_of, unstructured_mask)
from mlx_holo.allocate.owl import outlier_ratio, owl_allocation
from mlx_holo.prune.sparsegpt import sparsegpt_prune
from mlx_holo.prune.wanda import wanda_prune
from mlx_holo.allocate.zero_order import project_budget, weighted_mean, zero_order_allocation

OUT, IN, NTOK = 64, 256, 1024


def make_problem(seed=0, outliers=6, dead=()):
    """Correlated activations X = Z @ A with a few outlier channels; W ~ N(0, 1). Returns W, X, H (mean X^T X)."""
    r = np.random.default_rng(seed)
    Z = r.standard_normal((NTOK, IN)).astype(np.float32)
    A = (r.standard_normal((IN, IN)) / np.sqrt(IN) + 0.5 * np.eye(IN)).astype(np.float32)
    X = Z @ A  # [n, in]
    X[:, r.choice(IN, outliers, replace=False)] *= 20.0
    X[:, list(dead)] = 0.0
    W = r.standard_normal((OUT, IN)).astype(np.float32)
    H = (X.T.astype(np.float64) @ X / NTOK).astype(np.float32)
    return W, X, H


def out_err(W, W_hat, H):
    """trace((W - W_hat) H (W - W_hat)^T) = ||(W - W_hat) X^T||^2 / n."""
    D = np.asarray(W_hat, np.float64) - np.asarray(W, np.float64)
    return float(np.einsum("ij,jk,ik->", D, np.asarray(H, np.float64), D))


@pytest.fixture(scope="module")
def problem():
    W, X, H = make_problem()
    return W, X, H, mx.array(W), mx.array(np.linalg.norm(X, axis=0)), mx.array(H)


# ---------------------------------------------------------------- masks

def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm((4, 8)) == (4, 8) and parse_nm(None) is None
    for bad in ("2-4", "4:4", "0:4", "a:b"):
        with pytest.raises(ValueError):
            parse_nm(bad)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_unstructured_mask_exact_counts(sparsity):
    r = np.random.default_rng(1)
    s = mx.array(r.standard_normal((7, 50)).astype(np.float32))
    m = np.asarray(unstructured_mask(s, sparsity, per_row=True))
    assert (np.sum(~m, axis=1) == round(sparsity * 50)).all()
    g = np.asarray(unstructured_mask(s, sparsity, per_row=False))
    assert np.sum(~g) == round(sparsity * 350)
    # the pruned entries are the smallest ones
    sn = np.asarray(s)
    if 0 < sparsity < 1:
        assert sn[g].min() > sn[~g].max()
        assert (np.where(m, sn, np.inf).min(axis=1) > np.where(~m, sn, -np.inf).max(axis=1)).all()


def test_unstructured_mask_ties_still_exact():
    s = mx.ones((4, 10))
    assert (np.sum(~np.asarray(unstructured_mask(s, 0.5)), axis=1) == 5).all()
    assert np.sum(~np.asarray(unstructured_mask(s, 0.35, per_row=False))) == 14


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_numpy_topn(n, m):
    r = np.random.default_rng(2)
    s = r.standard_normal((16, 64)).astype(np.float32)
    mask = np.asarray(nm_mask(mx.array(s), n, m))
    g = s.reshape(16, -1, m)
    ref = np.zeros_like(g, dtype=bool)
    np.put_along_axis(ref, np.argsort(g, axis=2)[..., m - n:], True, axis=2)
    assert (mask == ref.reshape(16, 64)).all()
    assert check_nm(mask, n, m) and (mask.reshape(16, -1, m).sum(axis=2) == n).all()
    assert sparsity_of(mask) == pytest.approx(1 - n / m)


def test_check_nm_rejects_dense_and_counts_zeros():
    w = np.ones((4, 16), np.float32)
    assert not check_nm(w, 2, 4)
    w.reshape(4, 4, 4)[:, :, :2] = 0
    assert check_nm(w, 2, 4) and not check_nm(w, 1, 4) and not check_nm(w, 2, 3)
    assert sparsity_of(w) == 0.5


# ---------------------------------------------------------------- magnitude / wanda

@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_magnitude_exact_and_smallest(problem, sparsity):
    W, _, _, Wm, _, _ = problem
    res = magnitude_prune(Wm, sparsity)
    wn, mask = np.asarray(res.weight), np.asarray(res.mask)
    assert sparsity_of(wn) == round(sparsity * W.size) / W.size == res.sparsity
    assert np.abs(W)[mask].min() >= np.abs(W)[~mask].max()
    assert (wn[mask] == W[mask]).all()


@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_nm_pattern_holds_for_all_pruners(problem, nm):
    W, _, _, Wm, xn, Hm = problem
    n, m = parse_nm(nm)
    for res in (magnitude_prune(Wm, 0.0, nm), wanda_prune(Wm, xn, 0.0, nm), sparsegpt_prune(Wm, Hm, 0.0, nm)):
        assert check_nm(res.weight, n, m) and check_nm(res.mask, n, m)
        assert sparsity_of(res.weight) == pytest.approx(1 - n / m)


def test_wanda_matches_reference_and_beats_magnitude(problem):
    W, X, H, Wm, xn, _ = problem
    res = wanda_prune(Wm, xn, 0.5)
    score = np.abs(W) * np.linalg.norm(X, axis=0)[None, :]
    ref = np.zeros_like(W, dtype=bool)
    np.put_along_axis(ref, np.argsort(score, axis=1)[:, IN // 2:], True, axis=1)
    assert (np.asarray(res.mask) == ref).all()
    assert (np.sum(~np.asarray(res.mask), axis=1) == IN // 2).all()  # per-row comparison group
    mag = magnitude_prune(Wm, 0.5)
    # outlier channels change the decision: Wanda keeps (almost) all their weights, magnitude about half
    hot = np.argsort(np.linalg.norm(X, axis=0))[-6:]
    assert ref[:, hot].mean() > 0.95 and np.asarray(mag.mask)[:, hot].mean() < 0.7
    assert (np.asarray(mag.mask) != ref).mean() > 0.02
    assert out_err(W, res.weight, H) < 0.5 * out_err(W, mag.weight, H)


# ---------------------------------------------------------------- sparsegpt

def sparsegpt_numpy(W, H, sparsity, nm=None, block=128, damp=0.01):
    """Line-by-line port of the authors' fasterprune (float64), exact-count block masks as in our version."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper
    mask = np.zeros_like(W, dtype=bool)  # True = pruned here, as in the reference
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
        if nm is None:
            tmp = (W1 ** 2 / np.diag(Hinv1)[None, :] ** 2).ravel()
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            m1 = np.zeros(tmp.size, bool)
            m1[np.argsort(tmp, kind="stable")[:k]] = True
            mask1 = m1.reshape(W1.shape)
        else:
            mask1 = np.zeros_like(W1, dtype=bool)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / np.diag(Hinv1)[i:i + nm[1]][None, :] ** 2
                np.put_along_axis(mask1, i + np.argsort(tmp, axis=1)[:, :nm[1] - nm[0]], True, axis=1)
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    return W, ~mask


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_numpy_reference(problem, nm):
    W, _, H, Wm, _, Hm = problem
    res = sparsegpt_prune(Wm, Hm, 0.5, nm, block_size=64)
    ref_w, ref_mask = sparsegpt_numpy(W, H, 0.5, nm, block=64)
    agree = (np.asarray(res.mask) == ref_mask).mean()
    assert agree > 0.995, agree  # float32 vs float64 may flip a near-tie
    both = np.asarray(res.mask) & ref_mask
    rel = np.abs(np.asarray(res.weight) - ref_w)[both].max() / np.abs(ref_w).max()
    assert rel < 2e-3, rel
    assert sparsity_of(res.weight) == 0.5


def test_sparsegpt_exact_sparsity_over_uneven_blocks(problem):
    W, _, _, Wm, _, Hm = problem
    for s in (0.3, 0.6):
        res = sparsegpt_prune(Wm, Hm, s, block_size=96)  # 256 = 96 + 96 + 64
        assert np.sum(~np.asarray(res.mask)) == round(s * W.size)
        assert sparsity_of(res.weight) == round(s * W.size) / W.size
        assert (np.asarray(res.weight)[~np.asarray(res.mask)] == 0).all()


def test_sparsegpt_dead_inputs():
    W, X, H = make_problem(seed=3, dead=(5, 17, 100))
    res = sparsegpt_prune(mx.array(W), mx.array(H), 0.5)
    wn, mask = np.asarray(res.weight), np.asarray(res.mask)
    assert np.isfinite(wn).all()
    assert not mask[:, [5, 17, 100]].any()  # zero saliency: pruned first
    mag = magnitude_prune(mx.array(W), 0.5)
    assert out_err(W, wn, H) < out_err(W, mag.weight, H)


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, "2:4"), (0.0, "4:8")])
def test_output_error_ordering(problem, sparsity, nm):
    """SparseGPT < Wanda < magnitude on correlated X with outlier channels; ADMM on SparseGPT's mask improves it."""
    W, _, H, Wm, xn, Hm = problem
    e_mag = out_err(W, magnitude_prune(Wm, sparsity, nm).weight, H)
    e_wanda = out_err(W, wanda_prune(Wm, xn, sparsity, nm).weight, H)
    sg = sparsegpt_prune(Wm, Hm, sparsity, nm)
    e_sg = out_err(W, sg.weight, H)
    e_admm = out_err(W, admm_recover(Wm, sg.mask, Hm), H)
    assert e_admm <= e_sg < 0.8 * e_wanda and e_wanda < 0.5 * e_mag, (e_admm, e_sg, e_wanda, e_mag)


# ---------------------------------------------------------------- admm

def test_admm_recovers_towards_masked_optimum(problem):
    W, X, H, Wm, xn, Hm = problem
    for mask in (wanda_prune(Wm, xn, 0.5).mask, sparsegpt_prune(Wm, Hm, 0.0, "2:4").mask):
        mk = np.asarray(mask)
        w = np.asarray(admm_recover(Wm, mask, Hm))
        assert (w[~mk] == 0).all()
        e = out_err(W, w, H)
        assert e < 0.7 * out_err(W, W * mk, H)
        # exact masked least squares per row (numpy, float64): H_SS w_S = (H W0^T)_S
        Hd = H.astype(np.float64)
        opt = np.zeros_like(W, dtype=np.float64)
        for i in range(OUT):
            S = mk[i]
            opt[i, S] = np.linalg.solve(Hd[np.ix_(S, S)], (Hd @ W[i].astype(np.float64))[S])
        e_opt = out_err(W, opt, H)
        assert e_opt <= e < 1.05 * e_opt, (e, e_opt)


def test_admm_not_worse_than_sparsegpt_same_mask(problem):
    W, _, H, Wm, _, Hm = problem
    sg = sparsegpt_prune(Wm, Hm, 0.6)
    e_admm = out_err(W, admm_recover(Wm, sg.mask, Hm, cg_iters=0), H)  # plain ADMM, no CG polish
    assert e_admm <= out_err(W, sg.weight, H)


# ---------------------------------------------------------------- owl

def test_outlier_ratio_reference(problem):
    W, X, _, Wm, xn, _ = problem
    s = np.abs(W) * np.linalg.norm(X, axis=0)[None, :]
    assert outlier_ratio(Wm, xn, 5.0) == pytest.approx((s > 5 * s.mean()).mean(), abs=1e-7)
    flat = mx.ones_like(xn)
    assert outlier_ratio(Wm, flat, 5.0) < outlier_ratio(Wm, xn, 5.0)


def test_owl_allocation_mean_and_order():
    ratios = [0.01, 0.05, 0.002, 0.03, 0.03]
    s = owl_allocation(ratios, 0.6, lam=0.08)
    assert np.mean(s) == pytest.approx(0.6, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16, abs=1e-12)
    assert np.argmin(s) == 1 and np.argmax(s) == 2 and s[3] == s[4]
    assert owl_allocation([0.1, 0.1, 0.1], 0.5) == pytest.approx([0.5] * 3)


def test_owl_allocation_clipped_keeps_mean():
    s = owl_allocation([0.0, 0.0, 0.0, 1.0], 0.97, lam=0.1)
    assert all(0.0 <= x <= 0.99 for x in s)
    assert np.mean(s) == pytest.approx(0.97, abs=1e-12)
    assert s[3] < s[0]


# ---------------------------------------------------------------- zero-order

def test_project_budget():
    r = np.random.default_rng(4)
    n = r.uniform(1, 5, 8)
    for _ in range(5):
        v = r.uniform(-0.5, 1.5, 8)
        s = project_budget(v, n, 0.5, 0.0, 0.95)
        assert weighted_mean(s, n) == pytest.approx(0.5, abs=1e-9)
        assert s.min() >= 0.0 and s.max() <= 0.95
        # Euclidean projection: no feasible random point is closer to v
        for _ in range(50):
            t = project_budget(r.uniform(0, 0.95, 8), n, 0.5, 0.0, 0.95)
            assert np.linalg.norm(s - v) <= np.linalg.norm(t - v) + 1e-9


def test_zero_order_lowers_quadratic_loss_on_budget():
    r = np.random.default_rng(5)
    L = 6
    sizes = [1.0, 2.0, 1.0, 4.0, 1.0, 3.0]
    opt = r.uniform(0.2, 0.8, L)
    a = r.uniform(1.0, 4.0, L)

    def loss(s):
        return float(np.sum(a * (np.asarray(s) - opt) ** 2))

    init = [0.5] * L
    res = zero_order_allocation(loss, init, 0.5, steps=60, eps=0.01, lr=0.05, seed=0, weights=sizes)
    assert weighted_mean(res.sparsities, sizes) == pytest.approx(0.5, abs=1e-6)
    for h in res.history:
        assert weighted_mean(h["sparsities"], sizes) == pytest.approx(0.5, abs=1e-6)
        assert min(h["sparsities"]) >= 0.0 and max(h["sparsities"]) <= 0.95
    assert res.best_loss == pytest.approx(loss(res.sparsities))
    assert res.best_loss < 0.5 * loss(init)
    assert res.evaluations == 2 * 60 + 2
    again = zero_order_allocation(loss, init, 0.5, steps=60, eps=0.01, lr=0.05, seed=0, weights=sizes)
    assert again.sparsities == res.sparsities


def test_zero_order_respects_bounds_and_uniform_weights():
    target = [0.0, 0.0, 0.9, 0.9]  # pulls two layers below the lower bound

    def loss(s):
        return float(np.sum((np.asarray(s) - target) ** 2))

    res = zero_order_allocation(loss, [0.6, 0.4, 0.5, 0.5], 0.5, steps=40, bounds=(0.1, 0.95), seed=1)
    assert np.mean(res.sparsities) == pytest.approx(0.5, abs=1e-6)
    assert min(res.sparsities) >= 0.1 and max(res.sparsities) <= 0.95
    assert res.best_loss < loss([0.5] * 4)
