"""Round-to-nearest affine quantization with the usual refinements.

Plain min/max RTN is the baseline every paper compares against (e.g. Frantar et al. 2022, "GPTQ", Table 1). Options:
- ``clip_search``: per-group search of a range shrink factor minimising (optionally activation-weighted) squared
  error, as in the clipping step of AWQ (Lin et al. 2023) and llama.cpp's k-quants;
- ``grid_offset``: shift the integer grid by a fraction of a step (bias += offset * scale), a free parameter the
  replicated ensembles tune per replica;
- ``rounding="stochastic"``: unbiased stochastic rounding (Gupta et al. 2015), seeded;
- ``fit``: how a group's (scale, bias) are chosen from its range. ``"mlx"`` is ``mx.quantize``'s rule (the edge of
  larger magnitude is the bias and the scale is bent so that 0 falls on the grid; the far edge can then fall off
  the grid by up to half a step times 2**bits / |zero point|), ``"minmax"`` the classic asymmetric grid (bias = min,
  scale = range / (2**bits - 1), as llama.cpp's Q4_1), ``"lsq"`` alternating least squares from the better of the
  two per group: codes by rounding, then (scale, bias) by a (weighted) linear regression of the weights on their
  codes, repeated; each step can only lower the group's error, and the best iterate (after fp16 storage rounding)
  is kept. This is the refinement of llama.cpp's k-quants (``make_qkx2_quants``, Gerganov et al. 2023) and of
  HQQ-style solvers (Badri & Shaji 2023) in its plain least-squares form. MLX stores scale and bias as two free
  fp16 numbers, so no zero point has to be an integer. ``"zlsq"`` is the same alternation with 0 kept on the grid
  (bias = -z * scale for an integer zero point z, as in integer-zero-point affine quantization, Jacob et al. 2018):
  from the "mlx" grid, each step re-rounds the codes and fits the one free parameter, the scale, by least squares
  for z and its two neighbours. Its weight error lies between "mlx" and "lsq", but small weights keep an exact 0
  instead of a common offset of up to half a step, which matters where nothing compensates the rounding (data-free
  RTN at 3 bits or fewer; docs/experiments.md, "grid fit"). ``"sym"`` is the symmetric grid of llama.cpp's Q8_0,
  bias = -2^(bits-1) * scale with scale = max |w| / (2^(bits-1) - 1), codes in [1, 2^bits - 1]; no refinement.
``group_size=-1`` is per-channel (one group per output row).
"""
from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from ..options import FITS
from . import rtn_cpu
from .formats import AFFINE_BITS, FormatError, QuantizedWeight


def split_groups(w: mx.array, group_size: int) -> tuple[mx.array, int]:
    out, n = w.shape
    g = n if group_size in (-1, 0, None) else group_size
    if n % g:
        raise FormatError(f"input width {n} is not a multiple of group_size={g}")
    return w.astype(mx.float32).reshape(out, n // g, g), g  # [out, G, g]


def affine_params(lo: mx.array, hi: mx.array, bits: int, scale_dtype=mx.float16, exact_zero: bool = False,
                  fit: str = "mlx") -> tuple[mx.array, mx.array]:
    """Range [lo, hi] per group -> (scale, bias), rounded to the storage dtype so codes see the stored values.

    fit="mlx" (or "zlsq", whose starting point this is; always with ``exact_zero``): as MLX's own ``mx.quantize``
    chooses them. The edge of larger
    magnitude is the bias and the scale is adjusted so that 0 falls exactly on the grid (the scale is negative when
    the max is the edge). fit="minmax" (or "lsq", whose starting point this is): bias = lo, scale = (hi - lo) / n.
    ``exact_zero``: also make 0 exact *after* that rounding (see ``_exact_zero_params``), so pruned weights stay 0.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    n = 2**bits - 1
    if fit == "sym" and not exact_zero:  # w = scale * (q - 2^(bits-1)), |q - 2^(bits-1)| <= 2^(bits-1) - 1
        half = 2 ** (bits - 1)
        scale = (mx.maximum(mx.abs(lo), mx.abs(hi)) / (half - 1)).astype(scale_dtype).astype(mx.float32)
        scale = mx.maximum(scale, mx.array(6e-5, scale_dtype).astype(mx.float32))  # >= the smallest normal fp16
        return scale, -half * scale
    if fit not in ("mlx", "zlsq") and not exact_zero:
        scale = mx.maximum((hi - lo) / n, 1e-7)
        return scale.astype(scale_dtype).astype(mx.float32), lo.astype(scale_dtype).astype(mx.float32)
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


def _group_error(wg: mx.array, scale: mx.array, bias: mx.array, bits: int, imp: mx.array | None) -> mx.array:
    """wg [out, G, g], scale/bias [out, G, 1], imp [1, G, g] | None -> (weighted) squared error per group [out, G, 1]."""
    err = (round_codes(wg, scale, bias, bits) * scale + bias - wg) ** 2
    return (err if imp is None else err * imp).sum(axis=2, keepdims=True)


@lru_cache(maxsize=None)
def _lsq_step(bits: int, weighted: bool, scale_dtype):
    """One iteration of ``lsq_refine`` on a set of groups (rows [n, g]), compiled once for any n."""
    n_levels = 2**bits - 1

    def step(wg, a, scale, bias, sa, sw, best_err):
        q = mx.clip(mx.round((wg - bias) / scale), 0, n_levels)  # [n, g]
        aq = a * q if weighted else q
        sq, sqq, sqw = _sum(aq), _sum(aq * q), _sum(aq * wg)
        det = sa * sqq - sq * sq
        ok = det > 1e-12 * mx.maximum(sa * sqq, 1e-30)  # codes not all equal: the regression is determined
        s_new = mx.where(ok, (sa * sqw - sq * sw) / mx.where(ok, det, 1.0), scale)
        b_new = mx.where(ok, (sw - s_new * sq) / mx.maximum(sa, 1e-30), bias)
        s_new = mx.where(mx.abs(s_new) < 1e-7, scale, s_new)
        s_new, b_new = s_new.astype(scale_dtype).astype(mx.float32), b_new.astype(scale_dtype).astype(mx.float32)
        d = (mx.clip(mx.round((wg - b_new) / s_new), 0, n_levels) * s_new + b_new - wg) ** 2
        err = _sum(d * a if weighted else d)
        moved = ((s_new != scale) | (b_new != bias)).reshape(-1)
        return s_new, b_new, err, err < best_err, moved
    return mx.compile(step, shapeless=True)


def _sum(x: mx.array) -> mx.array:
    return x.sum(axis=-1, keepdims=True)


def lsq_refine(wg: mx.array, scale: mx.array, bias: mx.array, bits: int, imp: mx.array | None = None,
               iters: int = 8, scale_dtype=mx.float16) -> tuple[mx.array, mx.array]:
    """Alternating least squares on each group's grid (see the module docstring, fit="lsq").

    wg [out, G, g]; scale/bias [out, G, 1] (already storage-rounded) -> refined (scale, bias), storage-rounded.
    imp [1, G, g] | None: per-weight importance of the squared error. The error of the returned grid is never above
    the starting one: each iterate is kept only where it lowers the group's error. A group whose stored scale and
    bias did not move is at a fixed point (its later iterates would be the same), so each iteration works on the
    groups still moving only: the result is that of ``iters`` full iterations.
    """
    shape, g = scale.shape, wg.shape[2]
    weighted = imp is not None
    w2 = wg.reshape(-1, g)                                               # [N, g], N = out * G groups
    a2 = mx.broadcast_to(imp, wg.shape).reshape(-1, g) if weighted else mx.array(1.0)
    best_err = _group_error(wg, scale, bias, bits, imp).reshape(-1, 1)   # [N, 1]
    best_s, best_b = scale.reshape(-1, 1), bias.reshape(-1, 1)
    sa = _sum(a2) if weighted else mx.full(best_s.shape, g, mx.float32)
    sw = _sum(a2 * w2) if weighted else _sum(w2)
    step = _lsq_step(bits, weighted, scale_dtype)
    cur_s, cur_b = best_s, best_b
    idx = None                                                           # None: every group
    for _ in range(iters):
        take = (lambda x: x) if idx is None else (lambda x: x[idx])
        s_new, b_new, err, better, moved = step(take(w2), take(a2) if weighted else a2, take(cur_s), take(cur_b),
                                                take(sa), take(sw), take(best_err))
        upd = lambda old, new: mx.where(better, new, take(old))  # noqa: E731
        if idx is None:
            best_err, best_s, best_b = upd(best_err, err), upd(best_s, s_new), upd(best_b, b_new)
            cur_s, cur_b = s_new, b_new
        else:
            best_err[idx], best_s[idx], best_b[idx] = upd(best_err, err), upd(best_s, s_new), upd(best_b, b_new)
            cur_s[idx], cur_b[idx] = s_new, b_new
        mx.eval(best_err, best_s, best_b, cur_s, cur_b, moved)
        keep = np.flatnonzero(np.array(moved))
        if keep.size == 0:
            break
        idx = mx.array(keep.astype(np.int32)) if idx is None else idx[mx.array(keep.astype(np.int32))]
    return best_s.reshape(shape), best_b.reshape(shape)


def zlsq_refine(wg: mx.array, scale: mx.array, bias: mx.array, bits: int, imp: mx.array | None = None,
                iters: int = 8, scale_dtype=mx.float16) -> tuple[mx.array, mx.array]:
    """Least squares with 0 on the grid (module docstring, fit="zlsq"): w ~ scale * (q - z), z an integer.

    wg [out, G, g]; scale/bias [out, G, 1] a zero-on-grid start (bias / scale an integer, e.g. the "mlx" grid) ->
    refined (scale, bias), storage-rounded, never worse than the start on the (imp-weighted) group error."""
    a = mx.ones_like(wg) if imp is None else mx.broadcast_to(imp, wg.shape)  # [out, G, g]
    best_err = _group_error(wg, scale, bias, bits, imp)
    best_s, best_b = scale, bias
    z = mx.round(-bias / scale)  # [out, G, 1]
    for _ in range(iters):
        q = round_codes(wg, best_s, best_b, bits)
        for dz in (0.0, -1.0, 1.0):
            c = q - (z + dz)
            den = (a * c * c).sum(2, keepdims=True)
            s_new = mx.where(den > 0, (a * c * wg).sum(2, keepdims=True) / mx.maximum(den, 1e-30), best_s)
            s_new = mx.where(mx.abs(s_new) < 1e-7, best_s, s_new).astype(scale_dtype).astype(mx.float32)
            b_new = (-(z + dz) * s_new).astype(scale_dtype).astype(mx.float32)
            err = _group_error(wg, s_new, b_new, bits, imp)
            better = err < best_err
            best_err = mx.where(better, err, best_err)
            best_s, best_b = mx.where(better, s_new, best_s), mx.where(better, b_new, best_b)
        z = mx.round(-best_b / best_s)
        mx.eval(best_err, best_s, best_b, z)
    return best_s, best_b


REFINES = {"lsq": lsq_refine, "zlsq": zlsq_refine}
CPU_FACE_MIN = 1 << 20  # on a CPU, matrices of at least this many weights go to rtn_cpu (threads pay off there;
# GPTQ's per-group calls on [out, group] column blocks stay on the MLX face)
CHUNK_ELEMENTS = 1 << 24  # quantize_rtn works on at most this many weights at once  # refined fits -> their refinement step


def start_fits(fit: str) -> tuple[str, ...]:
    """The closed-form grid rules a fit starts from (the better per group is kept): a refined fit's starting
    grids ("lsq": mlx and minmax, "zlsq": mlx, which holds 0), or the fit itself."""
    return {"lsq": ("mlx", "minmax"), "zlsq": ("mlx",)}.get(fit, (fit,))


def quantize_rtn(w: mx.array, bits: int = 4, group_size: int = 64, *, clip_search: bool = False,
                 clip_grid: int = 20, clip_min: float = 0.5, importance: mx.array | None = None,
                 grid_offset: float = 0.0, rounding: str = "nearest", seed: int = 0,
                 scale_dtype=mx.float16, exact_zero: bool = False, fit: str = "lsq",
                 cpu_face: bool = True) -> QuantizedWeight:
    """w: [out, in] -> QuantizedWeight (codes [out, in], scales/biases [out, in // g]).

    importance: optional [in] per-input-channel weights for the clip-search / lsq error (e.g. E[x^2]).
    exact_zero: stored grids hold 0 exactly, so zeros (pruned weights) dequantize to exactly 0 (no grid offset,
    fit "mlx"). A matrix of more than ``CHUNK_ELEMENTS`` weights is quantized in slices of rows (the same result;
    stochastic rounding draws each slice from its own seed).
    cpu_face: on MLX's CPU backend, matrices of at least ``CPU_FACE_MIN`` weights with the fits ``rtn_cpu`` covers
    (no clip search, exact zeros, grid offset or stochastic rounding) go to that NumPy face of the same algorithm;
    False keeps the MLX ops (GPTQ's per-group column blocks: many small calls, and the results it has recorded).
    fit: "mlx" | "minmax" | "lsq" | "zlsq" (module docstring). "lsq" starts from the better of the "mlx" and
    "minmax" grids per group (so it is never worse than either), "zlsq" from the "mlx" grid; with ``clip_search``
    both start from the best clipped range.
    """
    if bits not in AFFINE_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {AFFINE_BITS}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    fit = "mlx" if exact_zero else fit
    if (fit in rtn_cpu.FITS and not (clip_search or exact_zero or grid_offset) and rounding == "nearest"
            and scale_dtype == mx.float16 and mx.default_device() == mx.cpu
            and w.size >= CPU_FACE_MIN and cpu_face):  # the same fit, fast on a CPU for a whole layer
        g = w.shape[1] if group_size in (-1, 0, None) else group_size
        if w.shape[1] % g:
            raise FormatError(f"input width {w.shape[1]} is not a multiple of group_size={g}")
        imp = None if importance is None else np.asarray(importance.astype(mx.float32))
        codes, scales, biases = rtn_cpu.quantize_rows(np.asarray(w.astype(mx.float32)), bits, g, fit, imp)
        return QuantizedWeight(mx.array(codes), mx.array(scales), mx.array(biases), bits,
                               g if group_size not in (-1, 0, None) else -1)
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])
    if w.shape[0] > rows:  # rows are independent: a large layer (an LM head) in slices bounds the work arrays
        kw = dict(clip_search=clip_search, clip_grid=clip_grid, clip_min=clip_min, importance=importance,
                  grid_offset=grid_offset, rounding=rounding, scale_dtype=scale_dtype, exact_zero=exact_zero, fit=fit,
                  cpu_face=cpu_face)
        parts = [quantize_rtn(w[r:r + rows], bits, group_size, seed=seed + k, **kw)
                 for k, r in enumerate(range(0, w.shape[0], rows))]
        for q in parts:
            mx.eval(q.codes, q.scales, q.biases)
        return QuantizedWeight(mx.concatenate([q.codes for q in parts]), mx.concatenate([q.scales for q in parts]),
                               mx.concatenate([q.biases for q in parts]), bits, parts[0].group_size)
    wg, g = split_groups(w, group_size)  # [out, G, g]
    lo, hi = wg.min(axis=2, keepdims=True), wg.max(axis=2, keepdims=True)  # [out, G, 1]
    key = mx.random.key(seed)
    imp = None if importance is None else importance.astype(mx.float32).reshape(1, -1, g)
    starts = start_fits(fit)
    best_s, best_b = affine_params(lo, hi, bits, scale_dtype, fit=starts[0])
    best_lo, best_hi = lo, hi
    if len(starts) > 1 or clip_search:
        best_err = _group_error(wg, best_s, best_b, bits, imp)
        for i in range(clip_grid if clip_search else 1):
            r = 1.0 - (1.0 - clip_min) * i / max(clip_grid - 1, 1)
            for f in starts[1:] if i == 0 else starts:
                scale, bias = affine_params(lo * r, hi * r, bits, scale_dtype, fit=f)
                err = _group_error(wg, scale, bias, bits, imp)
                better = err < best_err
                best_err = mx.where(better, err, best_err)
                best_s, best_b = mx.where(better, scale, best_s), mx.where(better, bias, best_b)
                best_lo, best_hi = mx.where(better, lo * r, best_lo), mx.where(better, hi * r, best_hi)
                mx.eval(best_err, best_s, best_b, best_lo, best_hi)
    scale, bias = best_s, best_b
    if exact_zero:  # the zero-exact grid of the chosen (clipped) range
        scale, bias = affine_params(best_lo, best_hi, bits, scale_dtype, exact_zero=True)
    elif fit in REFINES:
        scale, bias = REFINES[fit](wg, scale, bias, bits, imp, scale_dtype=scale_dtype)
    if grid_offset and not exact_zero:
        bias = (bias + grid_offset * scale).astype(scale_dtype).astype(mx.float32)
    q = round_codes(wg, scale, bias, bits, rounding, key)
    out, n = w.shape
    return QuantizedWeight(q.reshape(out, n).astype(mx.uint8), scale.squeeze(2), bias.squeeze(2), bits,
                           g if group_size not in (-1, 0, None) else -1)
