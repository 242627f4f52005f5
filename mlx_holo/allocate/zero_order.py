"""Zero-order (forward-only) search of per-layer sparsities under a global budget.

The gradient estimate is MeZO's two-forward SPSA (Malladi et al. 2023, "Fine-Tuning Language Models with Just
Forward Passes", arXiv:2305.17333, Algorithm 1; Spall 1992): g = (L(s + eps z) - L(s - eps z)) / (2 eps) * z.
The budget is the parameter-weighted mean sparsity N.s / sum(N) = target (N = layer sizes); the direction is
projected with P = I - N N^T / ||N||^2 so that every step, and every perturbed evaluation, stays on the budget
(z is drawn from N(0, I) and projected before the two forwards: E[(Pz)(Pz)^T] = P, so the estimate is still
unbiased for P grad L, with less variance). After each step the point is put back into the box ``bounds`` and onto
the budget by the exact Euclidean projection onto their intersection (clip(v - lambda N) with lambda found by
bisection, i.e. clip + project iterated to the fixed point). The best point seen is returned.

This module is numpy bookkeeping over a handful of layer sparsities; the forwards live in ``loss_fn``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

ProgressFn = Callable[[str, int, int], None]


@dataclass
class ZeroOrderResult:
    sparsities: list[float]          # best point seen, weighted mean = target
    history: list[dict] = field(default_factory=list)  # per step: loss_plus, loss_minus, loss_best, ...
    best_loss: float = float("nan")
    evaluations: int = 0


def project_budget(v: np.ndarray, n: np.ndarray, target: float, lo: float, hi: float) -> np.ndarray:
    """Euclidean projection of v onto {s : n.s = target * sum(n), lo <= s <= hi}."""
    v, n = np.asarray(v, np.float64), np.asarray(n, np.float64)
    goal = target * n.sum()

    def f(lam: float) -> float:
        return float(n @ np.clip(v - lam * n, lo, hi))

    a, b = float(np.min((v - hi) / n)) - 1.0, float(np.max((v - lo) / n)) + 1.0  # f(a) = hi sum n, f(b) = lo sum n
    for _ in range(200):
        mid = 0.5 * (a + b)
        if f(mid) > goal:
            a = mid
        else:
            b = mid
    s = np.clip(v - 0.5 * (a + b) * n, lo, hi)
    free = (s > lo) & (s < hi)
    if free.any():  # remove the last rounding residue along n on the free coordinates
        s[free] += (goal - n @ s) * n[free] / (n[free] @ n[free])
        s = np.clip(s, lo, hi)
    return s


def weighted_mean(s: list[float] | np.ndarray, weights: list[float] | np.ndarray | None = None) -> float:
    s = np.asarray(s, np.float64)
    n = np.ones_like(s) if weights is None else np.asarray(weights, np.float64)
    return float(n @ s / n.sum())


def zero_order_allocation(loss_fn: Callable[[list[float]], float], init: list[float], target: float, *,
                          steps: int = 20, eps: float = 0.02, lr: float = 0.05, seed: int = 0,
                          bounds: tuple[float, float] = (0.0, 0.95), weights: list[float] | None = None,
                          on_progress: ProgressFn | None = None) -> ZeroOrderResult:
    """init: [L] starting sparsities; weights: [L] layer sizes (uniform if None) -> ZeroOrderResult.

    Costs 2 * steps + 2 calls of ``loss_fn`` (start, two per step, final point).
    """
    lo, hi = bounds
    if not lo <= target <= hi:
        raise ValueError(f"target {target} outside bounds {bounds}")
    s = np.asarray(init, np.float64)
    n = np.ones_like(s) if weights is None else np.asarray(weights, np.float64)
    assert n.shape == s.shape and (n > 0).all(), (n.shape, s.shape)
    rng = np.random.default_rng(seed)
    P = np.eye(len(s)) - np.outer(n, n) / (n @ n)  # [L, L]

    s = project_budget(s, n, target, lo, hi)
    best_s, best_l = s.copy(), float(loss_fn(s.tolist()))
    evals, history = 1, []
    for t in range(steps):
        d = P @ rng.standard_normal(len(s))  # projected z: N.d = 0
        s_p = project_budget(s + eps * d, n, target, lo, hi)
        s_m = project_budget(s - eps * d, n, target, lo, hi)
        l_p, l_m = float(loss_fn(s_p.tolist())), float(loss_fn(s_m.tolist()))
        evals += 2
        for cand, l in ((s_p, l_p), (s_m, l_m)):
            if l < best_l:
                best_s, best_l = cand.copy(), l
        g = P @ ((l_p - l_m) / (2 * eps) * d)
        s = project_budget(s - lr * g, n, target, lo, hi)
        history.append({"step": t + 1, "loss_plus": l_p, "loss_minus": l_m, "grad_norm": float(np.linalg.norm(g)),
                        "loss_best": best_l, "sparsities": s.tolist()})
        if on_progress is not None:
            on_progress("zero-order", t + 1, steps)
    l_final = float(loss_fn(s.tolist()))
    evals += 1
    if l_final < best_l:
        best_s, best_l = s.copy(), l_final
    return ZeroOrderResult([float(x) for x in best_s], history, best_l, evals)
