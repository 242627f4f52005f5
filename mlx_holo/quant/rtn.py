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


def affine_params(lo: mx.array, hi: mx.array, bits: int, scale_dtype=mx.float16) -> tuple[mx.array, mx.array]:
    """Range [lo, hi] per group -> (scale, bias) as MLX's own ``mx.quantize`` chooses them.

    The edge of larger magnitude is the bias and the scale is adjusted so that 0 falls exactly on the grid (the scale
    is negative when the max is the edge). Values are rounded to the storage dtype so codes see the stored values.
    """
    n = 2**bits - 1
    lo_edge = mx.abs(lo) > mx.abs(hi)
    scale = mx.maximum((hi - lo) / n, 1e-7)
    scale = mx.where(lo_edge, scale, -scale)
    edge = mx.where(lo_edge, lo, hi)
    q0 = mx.round(edge / scale)
    scale = mx.where(q0 != 0, edge / mx.where(q0 != 0, q0, 1), scale)
    bias = mx.where(q0 == 0, 0.0, edge)
    return scale.astype(scale_dtype).astype(mx.float32), bias.astype(scale_dtype).astype(mx.float32)


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
                 scale_dtype=mx.float16) -> QuantizedWeight:
    """w: [out, in] -> QuantizedWeight (codes [out, in], scales/biases [out, in // g]).

    importance: optional [in] per-input-channel weights for the clip-search error (e.g. E[x^2] from calibration).
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
    scale, bias = affine_params(lo, hi, bits, scale_dtype)
    if grid_offset:
        bias = (bias + grid_offset * scale).astype(scale_dtype).astype(mx.float32)
    q = round_codes(wg, scale, bias, bits, rounding, key)
    out, n = w.shape
    return QuantizedWeight(q.reshape(out, n).astype(mx.uint8), scale.squeeze(2), bias.squeeze(2), bits,
                           g if group_size not in (-1, 0, None) else -1)
