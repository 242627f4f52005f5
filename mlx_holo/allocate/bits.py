"""Sensitivity-based mixed precision: choose a bit-width per layer under a storage budget.

Each layer has an estimated loss increase err[b] for every candidate bit-width (Hessian-weighted output error as in
HAWQ-V2 / Dong et al. 2020, "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks", or a
diagonal-Fisher-weighted error as in Kim et al. 2023, "SqueezeLLM"). Minimising sum err subject to sum bytes <= budget
is a multiple-choice knapsack; we solve its Lagrangian relaxation greedily (upgrades along each layer's lower convex
hull of (bytes, err), best error reduction per byte first) and, as a backup for budgets dominated by a few large
layers, by dynamic programming over byte buckets rounded up; a fix-up then spends what is left of the budget on any
single-layer change that still fits, and the better allocation wins. The budget is never exceeded.

Bytes follow MLX storage: bits/8 per weight for the codes + a float16 scale and bias per group, i.e.
bits + 32 / group_size bits per weight (per-channel, group -1, is stored as 128-groups). Float layers: 16 bits.
A choice is a bit-width at the layer's group size, or a (bits, group size) pair: MLX stores both per layer, so the
allocation can also trade group size (3-bit g128 costs 3.25 bits/weight, 3-bit g32 4.0) where that pays better.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..quant.formats import AFFINE_BITS, GROUP_SIZES, QuantizedWeight, bits_group
from ..model.experts import split_by_expert
from ..quant.rtn import quantize_rtn

FLOAT_BITS = 16


class BudgetError(ValueError):
    """The storage budget cannot be met with the bit-widths on offer."""


@dataclass
class LayerCost:
    name: str
    n_params: int
    group_size: int
    err: dict = field(default_factory=dict)  # bits (or None = float) -> estimated loss increase


Choice = int | tuple | None  # bits at the layer's group size | (bits, group size) | None = keep float


def choices(candidate_bits: tuple, candidate_groups: tuple = ()) -> list[Choice]:
    """The knapsack's options: the bare bit-widths, or every (bits, group) pair when groups are given."""
    if not candidate_groups:
        return list(candidate_bits)
    return [(b, g) for b in candidate_bits for g in candidate_groups]


def layer_bytes(n_params: int, bits: int | None, group_size: int) -> int:
    """Stored bytes of one layer at ``bits`` (None = float16), codes + fp16 scale/bias per group."""
    if bits is None:
        return n_params * FLOAT_BITS // 8
    g = 128 if group_size in (-1, 0, None) else group_size
    return (n_params * bits + 32 * (n_params // g)) // 8


def hessian_error(w: mx.array, H: mx.array, qw: QuantizedWeight | mx.array) -> float:
    """trace((W - Q) H (W - Q)^T): the output error sum over tokens of ||(W - Q) x||^2 / n for H = mean x x^T."""
    q = qw.dequantize() if isinstance(qw, QuantizedWeight) else qw
    d = w.astype(mx.float32) - q.astype(mx.float32)  # [out, in]
    return float(((d @ H.astype(mx.float32)) * d).sum().item())


def fisher_error(w: mx.array, fisher: mx.array, qw: QuantizedWeight | mx.array) -> float:
    """sum F * (W - Q)^2 with F the diagonal empirical Fisher [out, in] (mean squared gradient of the loss)."""
    q = qw.dequantize() if isinstance(qw, QuantizedWeight) else qw
    d = w.astype(mx.float32) - q.astype(mx.float32)
    return float((fisher.astype(mx.float32) * d * d).sum().item())


def rtn_layer_cost(name: str, w: mx.array, H: mx.array, group_size: int,
                   candidate_bits: tuple = AFFINE_BITS, candidate_groups: tuple = ()) -> LayerCost:
    """LayerCost with err[c] = hessian_error of RTN for every choice c (a cheap proxy for the calibrated
    quantizer's error)."""
    err = rtn_errors(w, lambda q: hessian_error(w, H, q), group_size, candidate_bits, candidate_groups)
    return LayerCost(name, int(w.size), group_size, err)


def rtn_errors(w: mx.array, score, group_size: int, candidate_bits: tuple,
               candidate_groups: tuple = ()) -> dict:
    """w [out, in] -> {choice: score(RTN of w at that choice)} over the choices the layer's width allows."""
    return {c: score(quantize_rtn(w, *bits_group(c, group_size)))
            for c in feasible(choices(candidate_bits, candidate_groups), w.shape[-1], group_size)}


def feasible(options: list[Choice], width: int, group_size: int) -> list[Choice]:
    """The options whose group size divides a layer's input width (a 576-wide layer has no 128-groups)."""
    return [c for c in options if (g := bits_group(c, group_size)[1]) == -1 or width % g == 0]


def _hull(options: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """(bytes, err, bits) options -> the lower convex hull, bytes ascending and err strictly descending."""
    pts = []
    for b, e, k in sorted(options, key=lambda o: (o[0], o[1])):
        if pts and e >= pts[-1][1]:
            continue  # dominated: no cheaper, no better
        while len(pts) >= 2:  # drop the middle point when it lies on or above the chord
            (b0, e0, _), (b1, e1, _) = pts[-2], pts[-1]
            if (e0 - e1) * (b - b0) <= (e0 - e) * (b1 - b0):
                pts.pop()
            else:
                break
        pts.append((b, e, k))
    return pts


def allocate_bits(layers: list[LayerCost], *, bits_per_weight: float | None = None, target_bytes: int | None = None,
                  candidate_bits: tuple = (2, 3, 4, 5, 6, 8), candidate_groups: tuple = (),
                  allow_float: bool = False, resolution: int = 20000) -> dict:
    """-> {layer name: choice} minimising sum err with total bytes <= the budget; a choice is bits (None = keep
    float16), or (bits, group size) when ``candidate_groups`` is given (``choices``).

    Exactly one of ``bits_per_weight`` (total stored bits / total params, scale overhead included) and
    ``target_bytes``. A layer's err must cover every candidate bit-width (and None when allow_float; missing
    None counts as 0). Raises ValueError when even the cheapest choice for every layer exceeds the budget.
    resolution: byte buckets of the knapsack DP that backs up the greedy (the better of the two is returned).
    """
    if (bits_per_weight is None) == (target_bytes is None):
        raise ValueError("give exactly one of bits_per_weight and target_bytes")
    if not layers:
        return {}
    names = [c.name for c in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    bad = [b for b in candidate_bits if b not in AFFINE_BITS]
    if bad or not candidate_bits:
        raise ValueError(f"candidate_bits must be a non-empty subset of {AFFINE_BITS}, got {candidate_bits}")
    if any(g not in GROUP_SIZES + (-1,) for g in candidate_groups):
        raise ValueError(f"candidate_groups must be a subset of {GROUP_SIZES + (-1,)}, got {candidate_groups}")
    options = choices(candidate_bits, candidate_groups)
    total_params = sum(c.n_params for c in layers)
    budget = int(target_bytes) if target_bytes is not None else int(bits_per_weight * total_params // 8)

    opts = []  # per layer: all (bytes, err, bits)
    for c in layers:
        mine = [b for b in options if b in c.err] if candidate_groups else options
        missing = [b for b in options if b not in c.err]
        if not mine or (missing and not candidate_groups):
            raise ValueError(f"layer {c.name}: no err estimate for {missing}")
        o = [(layer_bytes(c.n_params, *bits_group(b, c.group_size)), float(c.err[b]), b) for b in mine]
        if allow_float:
            o.append((layer_bytes(c.n_params, None, c.group_size), float(c.err.get(None, 0.0)), None))
        opts.append(o)

    choice = [min(o, key=lambda t: (t[0], t[1])) for o in opts]  # cheapest option per layer
    used = sum(ch[0] for ch in choice)
    if used > budget:
        raise BudgetError(f"budget of {budget} bytes ({8 * budget / total_params:.3f} bits/weight) is infeasible: "
                         f"the cheapest choice ({min(candidate_bits)} bits, largest groups) needs {used} bytes "
                         f"({8 * used / total_params:.3f} bits/weight); allow fewer bits or raise the budget")

    greedy = _fixup(opts, _greedy(opts, budget), budget)
    dp = _fixup(opts, _dp(opts, budget, resolution), budget)
    choice = min((greedy, dp), key=lambda ch: sum(o[1] for o in ch))
    assert sum(o[0] for o in choice) <= budget
    return {c.name: ch[2] for c, ch in zip(layers, choice)}


Option = tuple  # (bytes, err, choice)


def _greedy(opts: list[list[Option]], budget: int) -> list[Option]:
    """Lagrangian greedy along each layer's convex hull: best error reduction per extra byte first."""
    hulls = [_hull(o) for o in opts]
    pos = [0] * len(opts)
    choice = [h[0] for h in hulls]  # h[0]: the cheapest option (lowest err among the cheapest)
    used = sum(ch[0] for ch in choice)
    heap = []

    def push(i: int) -> None:
        h, p = hulls[i], pos[i]
        if p + 1 < len(h):
            gain = (h[p][1] - h[p + 1][1]) / max(h[p + 1][0] - h[p][0], 1)
            heapq.heappush(heap, (-gain, i))

    for i in range(len(opts)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        nxt = hulls[i][pos[i] + 1]
        extra = nxt[0] - choice[i][0]
        if used + extra > budget:
            continue  # this layer's next hull step does not fit; the fix-up may still use the leftover bytes
        used += extra
        pos[i] += 1
        choice[i] = nxt
        push(i)
    return choice


def _dp(opts: list[list[Option]], budget: int, resolution: int) -> list[Option]:
    """Exact multiple-choice knapsack DP on bytes above the all-cheapest floor, counted in units of
    (spare bytes / resolution) rounded *up*, so its answer always fits; catches what the greedy misses when a few
    large layers dominate the budget."""
    base = [min(o, key=lambda t: (t[0], t[1])) for o in opts]
    spare = budget - sum(b[0] for b in base)
    if spare <= 0:
        return base
    R = int(resolution)
    unit = spare / R
    dp = np.full(R + 1, np.inf)
    dp[0] = 0.0
    arg = np.zeros((len(opts), R + 1), dtype=np.int16)
    for i, o in enumerate(opts):
        new = np.full(R + 1, np.inf)
        for k, (nb, err, _) in enumerate(o):
            c = int(np.ceil((nb - base[i][0]) / unit - 1e-9))
            if c > R:
                continue
            cand = np.full(R + 1, np.inf)
            cand[c:] = dp[: R + 1 - c] + err
            better = cand < new
            new[better] = cand[better]
            arg[i, better] = k
        dp = new
    r = int(np.argmin(dp))
    choice = []
    for i in range(len(opts) - 1, -1, -1):
        k = int(arg[i, r])
        choice.append(opts[i][k])
        r -= int(np.ceil((opts[i][k][0] - base[i][0]) / unit - 1e-9))
    return choice[::-1]


def _fixup(opts: list[list[Option]], choice: list[Option], budget: int) -> list[Option]:
    """Spend the leftover budget: any single-layer change that lowers err and fits, best reduction first."""
    choice = list(choice)
    used = sum(ch[0] for ch in choice)
    while True:
        best = None
        for i, o in enumerate(opts):
            for cand in o:
                extra = cand[0] - choice[i][0]
                gain = choice[i][1] - cand[1]
                if gain > 0 and used + extra <= budget and (best is None or gain > best[0]):
                    best = (gain, i, cand, extra)
        if best is None:
            return choice
        _, i, cand, extra = best
        choice[i] = cand
        used += extra


def allocation_bytes(layers: list[LayerCost], bits: dict) -> int:
    """Total stored bytes of an allocation returned by ``allocate_bits``."""
    return sum(layer_bytes(c.n_params, *bits_group(bits[c.name], c.group_size)) for c in layers)


def expert_cost(w: mx.array, routed: tuple, n_tokens: int, layer_err) -> dict:
    """A SwitchLinear's sensitivity, w [E, out, in] with its routed rows (``routed_rows``): the experts' errors
    weighted by their share of the tokens, err[c] = sum_e n_e / n_tokens * layer_err(w_e, H_e)[c] with
    H_e = X_e^T X_e / n_e, i.e. the mean over tokens of the summed squared output error of the experts each token
    uses (the router's mixing weights left out). layer_err(w [out, in], H [in, in]) -> {choice: err}.
    An expert no token reached adds nothing."""
    xs = split_by_expert(*routed, w.shape[0])
    total: dict = {}
    for e, x in enumerate(xs):
        if x is None:
            continue
        x = x.astype(mx.float32)
        for c, v in layer_err(w[e], (x.T @ x) / x.shape[0]).items():
            total[c] = total.get(c, 0.0) + v * x.shape[0] / n_tokens
    if not total:  # nothing routed at all: no evidence of any error
        total = {c: 0.0 for c in layer_err(w[0], mx.zeros((w.shape[2], w.shape[2]), mx.float32))}
    return total
