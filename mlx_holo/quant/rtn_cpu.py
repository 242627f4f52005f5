"""The CPU face of ``rtn``'s closed-form and least-squares group grids, in NumPy, over all cores.

On a CPU, MLX runs element-wise ops on one thread and its compiled graphs do not fuse them into fewer passes, so
the alternating least squares of ``rtn.lsq_refine`` (Gerganov et al. 2023, llama.cpp's ``make_qkx2_quants``; Badri &
Shaji 2023, HQQ) costs many full passes over every weight. Here the same algorithm runs on cache-sized slices of rows
in a thread pool (NumPy releases the GIL in its loops), and each iteration makes one pass: the codes of the current
grid give both its error (s^2 times the squared distance of the codes to (w - b) / s) and the sums of the next
least-squares regression of the weights on their codes. The grid
rules ("mlx", "minmax") and the alternation ("lsq") are those of ``rtn`` -- same starting grids, same fp16 rounding of
every iterate, same active set -- so the two faces agree up to float summation order. ``quantize_rtn`` uses this
face for the fits it covers when MLX's default device is the CPU.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..hardware import cpu_threads

FITS = ("mlx", "minmax", "lsq")
SLICE_ELEMENTS = 1 << 20  # weights per work item (a thread fits one slice at a time)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def start_grid(lo: np.ndarray, hi: np.ndarray, bits: int, fit: str) -> tuple[np.ndarray, np.ndarray]:
    """Group range lo/hi [N, 1] -> fp16-stored (scale, bias) [N, 1] by ``rtn.affine_params``' rule for ``fit``
    ("mlx": the edge of larger magnitude is the bias and 0 falls on the grid; "minmax": bias = lo)."""
    n = 2**bits - 1
    scale = np.maximum((hi - lo) / n, np.float32(1e-7))
    if fit == "minmax":
        return _f16(scale), _f16(lo)
    lo_edge = np.abs(lo) > np.abs(hi)
    scale = np.where(lo_edge, scale, -scale)
    edge = np.where(lo_edge, lo, hi)
    q0 = np.round(edge / scale)
    scale = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scale)
    bias = np.where(q0 == 0, np.float32(0), edge)
    return _f16(scale), _f16(bias)


def _codes(w: np.ndarray, s: np.ndarray, b: np.ndarray, n_levels: int, out: np.ndarray,
           x: np.ndarray | None = None) -> np.ndarray:
    """w [N, g], s/b [N, 1] -> nearest codes in [0, n_levels] as float32, written into out (the unrounded
    positions (w - b) / s into x when given)."""
    x = out if x is None else x
    np.subtract(w, b, out=x)
    np.divide(x, s, out=x)
    np.rint(x, out=out)
    return np.clip(out, 0, n_levels, out=out)


def group_range(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [N, g] -> (min, max) [N, 1]. ``reduceat`` over the flat array: NumPy's row reductions pay a call per
    32-128-wide row, about twice the time."""
    flat, starts = np.ascontiguousarray(w).reshape(-1), np.arange(0, w.size, w.shape[1])
    return np.minimum.reduceat(flat, starts)[:, None], np.maximum.reduceat(flat, starts)[:, None]


class _Sums:
    """Per-group constants of a set of groups: Sa, Sw (importance-weighted), float64 [N]."""

    def __init__(self, w: np.ndarray | None, a: np.ndarray | None = None):
        if w is None:
            return
        self.sa = np.full(w.shape[0], w.shape[1], np.float64) if a is None else a.sum(1, dtype=np.float64)
        self.sw = (w if a is None else a * w).sum(1, dtype=np.float64)

    def take(self, idx: np.ndarray) -> "_Sums":
        c = _Sums(None)
        c.sa, c.sw = self.sa[idx], self.sw[idx]
        return c


def _pass(w: np.ndarray, a: np.ndarray | None, s: np.ndarray, b: np.ndarray, n_levels: int,
          buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over groups w [N, g] with grids s/b [N, 1] -> (error, Sq, Sqq, Sqw), float64 [N].

    The error of q * s + b is s^2 times the (weighted) squared distance of the codes to (w - b) / s."""
    x, d = buf[1], buf[2]
    q = _codes(w, s, b, n_levels, buf[0], x)
    np.subtract(q, x, out=d)
    if a is None:
        aq, dist = q, np.einsum("ij,ij->i", d, d)
    else:
        aq = np.multiply(a, q, out=x)
        dist = np.einsum("ij,ij,ij->i", a, d, d)
    sq = np.einsum("ij->i", aq).astype(np.float64)  # einsum: far faster than .sum(1) over 32-128 columns
    sqq = np.einsum("ij,ij->i", aq, q).astype(np.float64)
    sqw = np.einsum("ij,ij->i", aq, w).astype(np.float64)
    s64 = s[:, 0].astype(np.float64)
    return s64 * s64 * dist, sq, sqq, sqw


def _regress(sq, sqq, sqw, c: _Sums, s: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (scale, bias) of the weights on their codes (``rtn._lsq_step``'s rule), fp16-stored [N, 1]."""
    det = c.sa * sqq - sq * sq
    ok = det > 1e-12 * np.maximum(c.sa * sqq, 1e-30)  # codes not all equal: the regression is determined
    s_new = np.where(ok, (c.sa * sqw - sq * c.sw) / np.where(ok, det, 1.0), s[:, 0])
    b_new = np.where(ok, (c.sw - s_new * sq) / np.maximum(c.sa, 1e-30), b[:, 0])
    s_new = s_new.astype(np.float32)
    s_new = np.where(np.abs(s_new) < 1e-7, s[:, 0], s_new)
    return _f16(s_new)[:, None], _f16(b_new.astype(np.float32))[:, None]


def fit_groups(w: np.ndarray, a: np.ndarray | None, bits: int, fit: str, iters: int = 8
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups w [N, g] float32, importance a [N, g] | None -> (codes uint8 [N, g], scale [N], bias [N]) float32.

    "mlx"/"minmax": that closed-form grid; "lsq": from the better of the two per group, ``iters`` alternations of
    codes and least-squares (scale, bias), keeping each group's best iterate and iterating only groups still
    moving (``rtn.lsq_refine``)."""
    n_levels = 2**bits - 1
    lo, hi = group_range(w)
    buf = np.empty((3, *w.shape), np.float32)
    if fit != "lsq":
        s, b = start_grid(lo, hi, bits, fit)
    else:
        c = _Sums(w, a)
        s, b = start_grid(lo, hi, bits, "mlx")
        err, *sums = _pass(w, a, s, b, n_levels, buf)
        s2, b2 = start_grid(lo, hi, bits, "minmax")
        err2, *sums2 = _pass(w, a, s2, b2, n_levels, buf)
        take = err2 < err
        s, b, err = np.where(take[:, None], s2, s), np.where(take[:, None], b2, b), np.where(take, err2, err)
        sums = [np.where(take, x2, x) for x, x2 in zip(sums, sums2)]
        best_s, best_b, best_err = s.copy(), b.copy(), err
        idx = np.arange(w.shape[0])  # the groups still moving; s, b, sums, c are theirs
        for _ in range(iters):
            s_new, b_new = _regress(*sums, c, s, b)
            moved = (s_new[:, 0] != s[:, 0]) | (b_new[:, 0] != b[:, 0])
            if not moved.any():
                break
            if not moved.all():
                idx, s_new, b_new, c = idx[moved], s_new[moved], b_new[moved], c.take(moved)
            whole = idx.size == w.shape[0]
            err, *sums = _pass(w if whole else w[idx], a if a is None or whole else a[idx], s_new, b_new,
                               n_levels, buf[:, : idx.size])
            better = err < best_err[idx]
            bi = idx[better]
            best_s[bi], best_b[bi], best_err[bi] = s_new[better], b_new[better], err[better]
            s, b = s_new, b_new
        s, b = best_s, best_b
    q = _codes(w, s, b, n_levels, buf[0]).astype(np.uint8)
    return q, s[:, 0], b[:, 0]


def quantize_rows(w: np.ndarray, bits: int, group_size: int, fit: str, importance: np.ndarray | None = None,
                  iters: int = 8, workers: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [out, in] float32, importance [in] | None -> (codes uint8 [out, in], scales, biases float32 [out, in // g]).

    Rows are independent: slices of about ``SLICE_ELEMENTS`` weights are fitted in parallel threads."""
    if fit not in FITS:
        raise ValueError(f"rtn_cpu covers fits {FITS}, got {fit!r}")
    out, n = w.shape
    g = n if group_size in (-1, 0, None) else group_size
    G = n // g
    codes = np.empty((out, n), np.uint8)
    scales = np.empty((out, G), np.float32)
    biases = np.empty((out, G), np.float32)
    a_row = None if importance is None else np.ascontiguousarray(importance, np.float32).reshape(1, G, g)
    rows = max(1, SLICE_ELEMENTS // n)

    def work(r0: int) -> None:
        r1 = min(out, r0 + rows)
        wg = np.ascontiguousarray(w[r0:r1], np.float32).reshape(-1, g)  # [(r1 - r0) * G, g]
        a = None if a_row is None else np.broadcast_to(a_row, (r1 - r0, G, g)).reshape(-1, g)
        q, s, b = fit_groups(wg, a, bits, fit, iters)
        codes[r0:r1] = q.reshape(r1 - r0, n)
        scales[r0:r1], biases[r0:r1] = s.reshape(r1 - r0, G), b.reshape(r1 - r0, G)

    starts = range(0, out, rows)
    n_workers = min(workers or cpu_threads(), len(starts))
    if n_workers <= 1:
        for r0 in starts:
            work(r0)
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            list(pool.map(work, starts))
    return codes, scales, biases
