"""AWQ: activation-aware weight quantization by per-input-channel scaling, then output-aware clipping.

Lin, Tang, Tang, Yang, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (arXiv:2306.00978). Sec. 3.2: the weights of salient input channels (large mean |x|) are protected by
scaling them up before quantization, Q(w * s) (x / s)^T; s = mean|x|^alpha, normalised by sqrt(max(s) min(s)) as in
the reference code, alpha searched on a grid in [0, 1) to minimise the output error of all linears that read the same
input. The division by s is folded into whatever produces x (RMSNorm weight or previous linear's rows), so the float
model is unchanged (``apply_awq_scale``). Finally each group's clipping range is searched to minimise the output
error on x (``awq_clip``, the reference code's ``auto_clip``).

Use: res = awq_search(ws, x, ...); prev, ws = apply_awq_scale(prev, ws, res.scales); then for each w in ws:
awq_clip(w, x / res.scales, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .formats import AFFINE_BITS, FormatError, QuantizedWeight
from .rtn import REFINES, split_groups, affine_params, quantize_rtn, round_codes, start_fits

Progress = Callable[[str, int, int], None]


@dataclass
class AwqResult:
    scales: mx.array    # [in] multiply the following linears' columns, divide the previous op's output
    ratio: float        # the chosen alpha; 0.0 means s = 1, i.e. plain RTN was best
    loss_before: float  # sum over ws of ||Q(w) x^T - w x^T||^2 (plain RTN)
    loss_after: float   # same with the chosen scales


def output_error(dw: mx.array, x: mx.array, gram: mx.array | None) -> mx.array:
    """dw: [out, in], x: [n, in] -> ||x dw^T||^2, through the Gram matrix x^T x [in, in] when that is cheaper."""
    if gram is not None:
        return ((dw @ gram) * dw).sum()
    return ((x @ dw.T) ** 2).sum()


def awq_search(ws: list[mx.array], x: mx.array, bits: int, group_size: int, *, grid: int = 20,
               scale_dtype=mx.float16, on_progress: Progress | None = None, fit: str = "minmax",
               xs: list[mx.array] | None = None, final: Callable | None = None,
               objective: Callable | None = None) -> AwqResult:
    """ws: linears [out_i, in] that share the input x: [n, in] -> AwqResult with the best per-channel scales [in].

    loss(alpha) = sum_i ||Q(w_i * s) (x_i / s)^T - w_i x_i^T||^2 with Q = rtn.quantize_rtn; alpha = k / grid,
    k < grid; s = mean|x|^alpha over x's rows. x_i = x unless xs gives each weight its own rows (a mixture of
    experts: expert e's weights see only the tokens routed to it, while the statistics come from all of them).
    fit: Q's grid rule; the default min/max grid is the cheap stand-in for the least-squares grid the final
    quantization uses (refining 20 candidates x every weight would cost ~10x more).
    final(w [out, in], x [n, in]) -> dequantized [out, in]: the quantizer that will really be used (e.g. ``awq_clip``
    with its least-squares grid). Given, alpha is chosen on its error instead: alpha = 0 (s = 1), 0.1, ..., 0.5, the
    proxy's best, then the best one's two neighbours on the grid (about 8 quantizations), so the scales never
    lose to no scaling on the calibration rows. The two curves disagree: the clipped, output-weighted least-squares
    grid already protects salient channels, and needs less scaling (``tests/test_awq.py``'s outlier problem: proxy
    best at alpha 0.3-0.5, where the final error is above no scaling's; the final quantizer's best is near 0.15).
    objective([w_hat_i [out_i, in]]) -> float: with ``final``, the error the candidates are scored on, given the
    dequantized weights in the original basis (Q(w_i s) / s); default sum_i ||x_i (w_hat_i - w_i)^T||^2. The AWQ
    reference code scores the output of the module that holds the linears (e.g. the attention, through its softmax).
    """
    if bits not in AFFINE_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {AFFINE_BITS}")
    if not ws:
        raise ValueError("awq_search needs at least one weight")
    if xs is not None and len(xs) != len(ws):
        raise ValueError(f"{len(xs)} inputs for {len(ws)} weights")
    n_in = x.shape[1]
    xs = [x] * len(ws) if xs is None else xs
    for w, xi in zip(ws, xs):
        if w.shape[1] != n_in or xi.shape[1] != n_in:
            raise ValueError(f"weight {tuple(w.shape)} / input {tuple(xi.shape)} do not share the width {n_in}")
    ws = [w.astype(mx.float32) for w in ws]
    w_all = mx.concatenate(ws)  # [sum out_i, in]
    ends = np.cumsum([w.shape[0] for w in ws])
    rows = list(zip([0, *ends[:-1]], ends))
    x_mean = mx.abs(x.astype(mx.float32)).mean(axis=0)  # [in]
    grams: dict[int, tuple] = {}  # per distinct input: (x [n, in], its Gram x^T x [in, in] when that is cheaper)
    for xi in xs:
        if id(xi) not in grams:
            xf = xi.astype(mx.float32)
            grams[id(xi)] = (xf, xf.T @ xf if xf.shape[0] > n_in else None)

    losses = []
    for k in range(grid):
        s = alpha_scales(x_mean, k / grid)  # [in]
        # one rounding call for all weights (groups run along ``in``, so stacking rows changes nothing)
        q = quantize_rtn(w_all * s[None, :], bits, group_size, scale_dtype=scale_dtype, fit=fit).dequantize()
        dw = q / s[None, :] - w_all  # [sum out_i, in]
        loss = mx.array(0.0)
        for (a, b), xi in zip(rows, xs):
            loss = loss + output_error(dw[a:b], *grams[id(xi)])
        losses.append(float(loss.item()))
        if on_progress is not None:
            on_progress("awq-search", k + 1, grid)
    k_proxy = min(range(grid), key=losses.__getitem__)
    if final is None:
        return AwqResult(scales=alpha_scales(x_mean, k_proxy / grid), ratio=k_proxy / grid, loss_before=losses[0],
                         loss_after=losses[k_proxy])

    scored: dict[int, float] = {}  # grid index -> the final quantizer's error

    def score(k: int) -> None:
        if k not in scored and 0 <= k < grid:
            sk, err, w_hat = alpha_scales(x_mean, k / grid), mx.array(0.0), []
            for w, xi in zip(ws, xs):
                xf, gram = grams[id(xi)]
                q = final(w * sk[None, :], xf / sk[None, :]) / sk[None, :]
                if objective is None:  # one weight at a time: a MoE group's experts are never all held at once
                    err = err + output_error(q - w, xf, gram)
                else:
                    w_hat.append(q)
            scored[k] = float(objective(w_hat)) if objective is not None else float(err.item())

    # the final quantizer's own curve: a coarse pass over [0, 0.5] and the proxy's best, then the best's neighbours
    for k in sorted({*range(0, grid // 2 + 1, max(grid // 10, 1)), k_proxy}):
        score(k)
    k_best = min(scored, key=scored.get)
    for k in (k_best - 1, k_best + 1):
        score(k)
    k_best = min(scored, key=scored.get)
    return AwqResult(scales=alpha_scales(x_mean, k_best / grid), ratio=k_best / grid, loss_before=scored[0],
                     loss_after=scored[k_best])


def alpha_scales(x_mean: mx.array, alpha: float) -> mx.array:
    """AWQ's per-channel scales for one alpha: s = mean|x|^alpha [in], normalised by sqrt(max(s) min(s)) as in the
    reference code (alpha = 0 gives s = 1)."""
    s = mx.maximum(x_mean**alpha, 1e-4)
    return s / mx.sqrt(s.max() * s.min())


def apply_awq_scale(prev_weight_or_norm: mx.array, ws: list[mx.array], s: mx.array
                    ) -> tuple[mx.array, list[mx.array]]:
    """Fold the AWQ scales so the float model is unchanged: prev / s, each following w * s (columns).

    prev_weight_or_norm: either a norm weight [in] (RMSNorm/LayerNorm gamma; pass a LayerNorm's beta or a previous
    linear's bias through this function too, with ws=[], since they also produce x), or the previous linear's
    weight [in, k] whose output rows are x (e.g. v_proj rows feeding o_proj). A grouped-query v_proj has fewer rows
    than o_proj has inputs; that pair cannot be folded and raises ValueError.
    ws: following linears [out_i, in]. s: [in].
    """
    s = s.astype(mx.float32)
    n = s.shape[0]
    if prev_weight_or_norm.shape[0] != n:
        raise ValueError(f"previous op produces {prev_weight_or_norm.shape[0]} channels but the scales have {n} "
                         "(grouped-query v_proj -> o_proj cannot be folded)")
    for w in ws:
        if w.shape[1] != n:
            raise ValueError(f"weight {tuple(w.shape)} does not read inputs of width {n}")
    dtype = prev_weight_or_norm.dtype
    p = prev_weight_or_norm.astype(mx.float32)
    p = p / s if p.ndim == 1 else p / s[:, None]
    return p.astype(dtype), [(w.astype(mx.float32) * s[None, :]).astype(w.dtype) for w in ws]


def awq_clip(w: mx.array, x: mx.array, bits: int, group_size: int, *, grid: int = 20, max_shrink: float = 0.5,
             scale_dtype=mx.float16, on_progress: Progress | None = None, fit: str = "lsq") -> QuantizedWeight:
    """w: [out, in], x: [n, in] -> QuantizedWeight whose per-group range minimises the group's output error.

    As the reference ``auto_clip``: candidate ranges clamp w to [-m, m] with m = max|w_group| * (1 - k / grid),
    k < max_shrink * grid; error of group G in row o = mean_t (sum_{j in G} x[t, j] (q[o, j] - w[o, j]))^2,
    evaluated through the per-group Gram matrix. k = 0 is plain min/max RTN, so no group gets worse than RTN.
    fit: the grid rule of each candidate (``rtn.affine_params``); "lsq" tries both "mlx" and "minmax" grids per
    candidate, then refines the winner by least squares weighted with diag(gram) and keeps the refinement only where
    it lowers the group's output error; "zlsq" the same from the "mlx" grid, keeping 0 on the grid.
    """
    if bits not in AFFINE_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {AFFINE_BITS}")
    wg, g = split_groups(w, group_size)  # [out, G, g]
    n_groups = wg.shape[1]
    xg = x.astype(mx.float32).reshape(x.shape[0], n_groups, g).transpose(1, 0, 2)  # [G, n, g]
    gram = (xg.transpose(0, 2, 1) @ xg) / x.shape[0]  # [G, g, g]
    lo0, hi0 = wg.min(axis=2, keepdims=True), wg.max(axis=2, keepdims=True)  # [out, G, 1]
    m0 = mx.maximum(mx.abs(lo0), mx.abs(hi0))
    steps = max(int(max_shrink * grid), 1)
    def out_err(scale, bias):  # [out, G, 1]
        dG = (round_codes(wg, scale, bias, bits) * scale + bias - wg).transpose(1, 0, 2)  # [G, out, g]
        return ((dG @ gram) * dG).sum(axis=2).T[..., None]

    fits = start_fits(fit)
    best_err = best_s = best_b = None
    for k in range(steps):
        m = m0 * (1.0 - k / grid)
        lo, hi = mx.maximum(lo0, -m), mx.minimum(hi0, m)
        for f in fits:
            scale, bias = affine_params(lo, hi, bits, scale_dtype, fit=f)
            err = out_err(scale, bias)
            if best_err is None:
                best_err, best_s, best_b = err, scale, bias
            else:
                better = err < best_err
                best_err = mx.where(better, err, best_err)
                best_s, best_b = mx.where(better, scale, best_s), mx.where(better, bias, best_b)
            mx.eval(best_err, best_s, best_b)
        if on_progress is not None:
            on_progress("awq-clip", k + 1, steps)
    scale, bias = best_s, best_b
    if fit in REFINES:
        imp = mx.diagonal(gram, axis1=1, axis2=2)[None]  # [1, G, g]
        s2, b2 = REFINES[fit](wg, scale, bias, bits, imp, scale_dtype=scale_dtype)
        better = out_err(s2, b2) < best_err
        scale, bias = mx.where(better, s2, scale), mx.where(better, b2, bias)
    q = round_codes(wg, scale, bias, bits)
    out, n = w.shape
    return QuantizedWeight(q.reshape(out, n).astype(mx.uint8), scale.squeeze(2), bias.squeeze(2), bits,
                           g if group_size not in (-1, 0, None) else -1)
