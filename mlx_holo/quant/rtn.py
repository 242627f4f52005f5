"""Round-to-nearest affine quantization with the usual refinements.

Plain min/max RTN is the baseline every paper compares against (e.g. Frantar et al. 2022, "GPTQ", Table 1). Options:
- ``clip_search``: per-group search of a range shrink factor minimising (optionally activation-weighted) squared
  error, as in the clipping step of AWQ (Lin et al. 2023) and llama.cpp's k-quants;
- ``grid_offset``: shift the integer grid by a fraction of a step (bias += offset * scale), a free parameter the
  replicated ensembles tune per replica;
- ``rounding="stochastic"``: unbiased stochastic rounding (Gupta et al. 2015), seeded.
``group_size=-1`` is per-channel (one group per output row).
"""
from __future__ import annotations

import mlx.core as mx

from .formats import AFFINE_BITS, FormatError, QuantizedWeight


def _groups(w: mx.array, group_size: int) -> tuple[mx.array, int]:
    out, n = w.shape
    g = n if group_size in (-1, 0, None) else group_size
    if n % g:
        raise FormatError(f"input width {n} is not a multiple of group_size={g}")
    return w.astype(mx.float32).reshape(out, n // g, g), g  # [out, G, g]


def affine_params(lo: mx.array, hi: mx.array, bits: int, scale_dtype=mx.float16, exact_zero: bool = False
                  ) -> tuple[mx.array, mx.array]:
    """Range [lo, hi] per group -> (scale, bias) as MLX's own ``mx.quantize`` chooses them.

    The edge of larger magnitude is the bias and the scale is adjusted so that 0 falls exactly on the grid (the scale
    is negative when the max is the edge). Values are rounded to the storage dtype so codes see the stored values.
    ``exact_zero``: also make 0 exact *after* that rounding (see ``_exact_zero_params``), so pruned weights stay 0.
    """
    n = 2**bits - 1
    lo_edge = mx.abs(lo) > mx.abs(hi)
    scale = mx.maximum((hi - lo) / n, 1e-7)
    scale = mx.where(lo_edge, scale, -scale)
    edge = mx.where(lo_edge, lo, hi)
    q0 = mx.round(edge / scale)
    scale = mx.where(q0 != 0, edge / mx.where(q0 != 0, q0, 1), scale)
    bias = mx.where(q0 == 0, 0.0, edge)
    if exact_zero and scale_dtype == mx.float16:
        return _exact_zero_params(scale, q0, lo, hi, bits)
    return scale.astype(scale_dtype).astype(mx.float32), bias.astype(scale_dtype).astype(mx.float32)


def _exact_zero_params(scale: mx.array, q0: mx.array, lo: mx.array, hi: mx.array, bits: int, shift: int = 4,
                       ulps: int = 128, chunk: int = 1 << 12) -> tuple[mx.array, mx.array]:
    """Ideal (scale, q0) per group [..., 1] -> fp16-stored (scale, bias) whose grid holds 0 *exactly*.

    With scale and bias rounded to fp16 independently, code -q0 dequantizes to a tiny non-zero residual, so a pruned
    weight stored through the grid is no longer a zero. Here bias = q0 * scale must itself be an fp16 number: among
    zero points q0 + {-shift..shift} and the fp16 scales within ``ulps`` of each ideal scale, take the pair with the
    smallest worst-case rounding error over [lo, hi]: max(half its step, how far [lo, hi] sticks out of its grid),
    in ideal steps (ties: the grid that moves least). q0 = 0 (bias 0) is always exact.
    """
    n = 2**bits - 1
    shape = scale.shape
    s_ideal, z_ideal = scale.reshape(-1, 1, 1), q0.reshape(-1, 1, 1)  # [M, 1, 1]
    lo_all, hi_all = lo.reshape(-1, 1, 1), hi.reshape(-1, 1, 1)
    out_s, out_b = [], []
    dq = mx.arange(-shift, shift + 1, dtype=mx.float32).reshape(1, -1, 1)  # [1, Z, 1]
    du = mx.arange(-ulps, ulps + 1, dtype=mx.int32).reshape(1, 1, -1)  # [1, 1, U]
    for c0 in range(0, s_ideal.shape[0], chunk):
        s, z = s_ideal[c0: c0 + chunk], z_ideal[c0: c0 + chunk]
        g_lo, g_hi = lo_all[c0: c0 + chunk], hi_all[c0: c0 + chunk]
        edge = s * z  # [m, 1, 1] the ideal grid's end at code 0 (q0 <= 0)
        zc = mx.clip(z + dq, -n, 0)  # [m, Z, 1]
        sc = mx.where(zc != 0, edge / mx.where(zc != 0, zc, 1), s)  # ideal scale for that zero point
        bits16 = sc.astype(mx.float16).view(mx.uint16).astype(mx.int32) + du  # [m, Z, U] neighbouring fp16 codes
        s16 = mx.clip(bits16, 0, 65535).astype(mx.uint16).view(mx.float16).astype(mx.float32)
        b = zc * s16
        ok = (b.astype(mx.float16).astype(mx.float32) == b) & (mx.sign(s16) == mx.sign(s)) & (s16 != 0) \
            & mx.isfinite(s16) & (bits16 >= 0) & (bits16 <= 65535)
        a_s = mx.abs(s)
        move = mx.maximum(mx.abs(b - edge), mx.abs(b + n * s16 - edge - n * s)) / a_s  # grid ends, in ideal steps
        top, bottom = mx.maximum(b, b + n * s16), mx.minimum(b, b + n * s16)
        out_of_grid = mx.maximum(mx.maximum(bottom - g_lo, g_hi - top), 0) / a_s
        cost = mx.maximum(0.5 * mx.abs(s16) / a_s, out_of_grid) + 1e-3 * move
        cost = mx.where(ok, cost, mx.inf).reshape(cost.shape[0], -1)  # [m, Z*U]
        best = mx.argmin(cost, axis=1, keepdims=True)
        found = mx.take_along_axis(cost, best, axis=1) < mx.inf
        s_best = mx.take_along_axis(s16.reshape(cost.shape), best, axis=1)
        b_best = mx.take_along_axis(b.reshape(cost.shape), best, axis=1)
        s_fb = s.reshape(-1, 1).astype(mx.float16).astype(mx.float32)  # no exact pair: the plain rounding
        b_fb = edge.reshape(-1, 1).astype(mx.float16).astype(mx.float32)
        out_s.append(mx.where(found, s_best, s_fb))
        out_b.append(mx.where(found, b_best, b_fb))
        mx.eval(out_s[-1], out_b[-1])
    return mx.concatenate(out_s).reshape(shape), mx.concatenate(out_b).reshape(shape)


def round_codes(wg: mx.array, scale: mx.array, bias: mx.array, bits: int, rounding: str = "nearest",
                key: mx.array | None = None) -> mx.array:
    """wg [out, G, g], scale/bias [out, G, 1] -> integer codes [out, G, g] (float32) in [0, 2**bits - 1]."""
    x = (wg - bias) / scale
    if rounding == "nearest":
        q = mx.round(x)
    elif rounding == "stochastic":
        q = mx.floor(x + mx.random.uniform(shape=x.shape, key=key))
    else:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    return mx.clip(q, 0, 2**bits - 1)


def quantize_rtn(w: mx.array, bits: int = 4, group_size: int = 64, *, clip_search: bool = False,
                 clip_grid: int = 20, clip_min: float = 0.5, importance: mx.array | None = None,
                 grid_offset: float = 0.0, rounding: str = "nearest", seed: int = 0,
                 scale_dtype=mx.float16, exact_zero: bool = False) -> QuantizedWeight:
    """w: [out, in] -> QuantizedWeight (codes [out, in], scales/biases [out, in // g]).

    importance: optional [in] per-input-channel weights for the clip-search error (e.g. E[x^2] from calibration).
    exact_zero: stored grids hold 0 exactly, so zeros (pruned weights) dequantize to exactly 0 (no grid offset).
    """
    if bits not in AFFINE_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {AFFINE_BITS}")
    wg, g = _groups(w, group_size)  # [out, G, g]
    lo, hi = wg.min(axis=2, keepdims=True), wg.max(axis=2, keepdims=True)  # [out, G, 1]
    key = mx.random.key(seed)
    if clip_search:
        imp = None if importance is None else importance.astype(mx.float32).reshape(1, -1, g)
        best_err, best_lo, best_hi = None, lo, hi
        for i in range(clip_grid):
            r = 1.0 - (1.0 - clip_min) * i / max(clip_grid - 1, 1)
            c_lo, c_hi = lo * r, hi * r
            scale, bias = affine_params(c_lo, c_hi, bits, scale_dtype)
            err = (round_codes(wg, scale, bias, bits) * scale + bias - wg) ** 2
            err = (err if imp is None else err * imp).sum(axis=2, keepdims=True)  # [out, G, 1]
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = mx.where(better, err, best_err)
            best_lo, best_hi = mx.where(better, c_lo, best_lo), mx.where(better, c_hi, best_hi)
            mx.eval(best_err, best_lo, best_hi)
        lo, hi = best_lo, best_hi
    scale, bias = affine_params(lo, hi, bits, scale_dtype, exact_zero=exact_zero)
    if grid_offset and not exact_zero:
        bias = (bias + grid_offset * scale).astype(scale_dtype).astype(mx.float32)
    q = round_codes(wg, scale, bias, bits, rounding, key)
    out, n = w.shape
    return QuantizedWeight(q.reshape(out, n).astype(mx.uint8), scale.squeeze(2), bias.squeeze(2), bits,
                           g if group_size not in (-1, 0, None) else -1)
