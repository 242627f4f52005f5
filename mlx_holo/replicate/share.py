"""Adjacent-layer code sharing: L same-shaped layers read ONE low-bit code tensor, each with its own scales/biases.

The option of the replicated-layer ensembles issue: where replication spends extra parameter sets on one layer,
sharing spends one code tensor on several layers (code bytes / L per layer). Codes and per-layer affine parameters
are fitted jointly by alternating least squares, the k-means-like scheme of vector/additive quantizers (cf. AQLM,
Egiazarian et al. 2024, which also alternates code and codebook updates):

    min_{q, s_l, b_l} sum_l sum_i u_i (w_l,i - s_l,g(i) q_i - b_l,g(i))^2,   q_i in {0, ..., 2^bits - 1}

  * given q: each layer's (s_l, b_l) per group is the closed-form regression of w_l on q (``fit_affine``);
  * given (s_l, b_l): each code is the rounding of its own least-squares value
    q_i = sum_l s_l (w_l,i - b_l) / sum_l s_l^2, clipped to the grid (the objective is a 1-D quadratic in q_i).

Initial codes: RTN of the mean of the layers' per-group standardised (and sign-aligned) weights. Each step can only lower the
objective (the code step is exact per element, the regression exact per group), so the error is monotone in the
iterations up to the fp16 rounding of the stored parameters. Whether sharing pays off against plain quantization at the same bytes is an empirical question
(``benchmarks/ensembles.py`` measures it); layers of a trained network are nearly uncorrelated, so expect a loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..quant.formats import AFFINE_BITS, GROUP_SIZES, FormatError
from ..quant.rtn import quantize_rtn
from .ensembles import fit_affine


@dataclass
class SharedCodes:
    codes: mx.array          # [out, in] uint8, shared by every layer
    scales: list             # per layer [out, G] float32
    biases: list             # per layer [out, G] float32
    bits: int
    group_size: int
    errors: list             # objective after each iteration (sum over layers of the weighted squared error)

    def dequantize(self, layer: int) -> mx.array:
        out, n = self.codes.shape
        g = self.group_size
        q = self.codes.astype(mx.float32).reshape(out, n // g, g)
        return (q * self.scales[layer][..., None] + self.biases[layer][..., None]).reshape(out, n)


def _objective(ws, codes, scales, biases, g, u) -> float:
    total = 0.0
    for w, s, b in zip(ws, scales, biases):
        out, n = w.shape
        q = codes.reshape(out, n // g, g)
        d = w.reshape(out, n // g, g) - (q * s[..., None] + b[..., None])
        total += float(((d * d) * (1.0 if u is None else u.reshape(1, n // g, g))).sum().item())
    return total


def share_codes(weights: list[mx.array], bits: int, group_size: int, *, iters: int = 4,
                importance: mx.array | None = None) -> SharedCodes:
    """weights: L arrays [out, in] of one shape -> SharedCodes (alternating least squares, ``iters`` rounds).

    importance: optional [in] per-input weights u (e.g. E[x^2] of the layers' inputs, averaged)."""
    if bits not in AFFINE_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {AFFINE_BITS}")
    if group_size not in GROUP_SIZES:
        raise FormatError(f"group_size={group_size} is not supported; choose one of {GROUP_SIZES}")
    if not weights or any(w.shape != weights[0].shape or w.ndim != 2 for w in weights):
        raise ValueError("share_codes needs one or more 2-D weights of the same shape")
    out, n = weights[0].shape
    if n % group_size:
        raise FormatError(f"input width {n} is not a multiple of group_size={group_size}")
    g, G, maxq = group_size, n // group_size, 2**bits - 1
    ws = [w.astype(mx.float32) for w in weights]
    z = []
    for w in ws:  # per-group standardisation, so layers of different scale weigh alike in the initial codes
        wg = w.reshape(out, G, g)
        mu, sd = wg.mean(axis=2, keepdims=True), mx.maximum(wg.std(axis=2, keepdims=True), 1e-8)
        zg = (wg - mu) / sd
        if z:  # align each group's sign with the first layer's: anti-correlated groups would cancel in the mean
            zg = zg * mx.where((zg * z[0]).sum(axis=2, keepdims=True) < 0, -1.0, 1.0)
        z.append(zg)
    codes = quantize_rtn((sum(z) / len(z)).reshape(out, n), bits, g).codes.astype(mx.float32)  # [out, in]
    u = None if importance is None else mx.maximum(importance.astype(mx.float32), 1e-12)
    scales, biases, errors = [], [], []
    for it in range(iters + 1):
        scales, biases = [], []
        for w in ws:
            s, b = fit_affine(w, codes, g, importance=u)
            s, b = s.astype(mx.float16).astype(mx.float32), b.astype(mx.float16).astype(mx.float32)  # as stored
            scales.append(s)
            biases.append(b)
        errors.append(_objective(ws, codes, scales, biases, g, u))
        if it == iters:
            break
        num = sum((w.reshape(out, G, g) - b[..., None]) * s[..., None] for w, s, b in zip(ws, scales, biases))
        den = sum(s[..., None] ** 2 for s in scales)
        new = mx.clip(mx.round(num / mx.maximum(den, 1e-20)), 0, maxq).reshape(out, n)
        # the code step is exact only for the current (s, b): keep the old code where it was as good
        codes = mx.where(mx.repeat(den.reshape(out, G), g, axis=1) > 0, new, codes)
        mx.eval(codes)
    return SharedCodes(codes.astype(mx.uint8), scales, biases, bits, g, errors)
