"""GPTQ: second-order weight quantization with lazy-batch Cholesky updates.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv:2210.17323), Algorithm 1. Columns are quantized one at a time; each column's rounding error,
divided by the diagonal of the upper Cholesky factor of H^-1, is spread over the not-yet-quantized columns so that
the layer output error ||(W - Q) X^T||^2 = trace((W - Q) H (W - Q)^T) (H = mean x x^T) stays small. Updates inside a
block of ``block_size`` columns are applied eagerly, the rest lazily once per block (Sec. 4, "Lazy Batch-Updates").

act-order (the paper's "desc_act") quantizes columns by descending H_ii. Its groups are *static*: every group's
scale/bias is fixed from the original weight before the loop (optionally with ``rtn.quantize_rtn``'s clip search),
so the result is plain MLX group format over the original column order. Without act-order the groups are
*dynamic* as in the reference code: a group's parameters are taken from the GPTQ-updated weight when the loop
reaches its first column.

``refit`` (after the loop, codes frozen): each row's group scales and biases are re-solved by least squares on the
layer objective itself, min over (s, b) of (w - A(s, b)) H (w - A(s, b))^T with A the affine map of the row's codes
(the normal equations couple the groups of a row through H: a 2G x 2G system per row). This is the closed form of the
scale tuning that later GPTQ variants do by gradient descent (e.g. OmniQuant's learnable weight clipping, Shao et
al. 2023; the frozen-code parameter refit of this project's ensembles); a row keeps its new parameters only where
the objective, after fp16 storage rounding, went down.

``iters`` > 1 alternates the two steps (a block-coordinate descent on the same objective): the refitted grid becomes
the static grid of a fresh GPTQ pass from the original weight (codes re-chosen with error feedback on the new grid),
which is refitted again; a pass is kept only while the objective trace((W - C) H (W - C)^T) goes down. It is the
alternation of code assignment and parameter fitting that data-aware quantizers iterate to a fixed point (e.g. the
alternating updates of Chee et al. 2023, QuIP, sec. 4, or of GPTVQ's codebook update, van Baalen et al. 2024).
The default is one pass (what more passes measured: docs/experiments.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .formats import AFFINE_BITS, GROUP_SIZES, FormatError, QuantizedWeight
from .rtn import REFINES, quantize_rtn

Progress = Callable[[str, int, int], None]


FACTOR_ROWS = 512  # rows of H permuted / of the factor cast at a time (``hessian_factor``)
CHUNK_ELEMENTS = 1 << 25  # gptq_quantize works on at most this many weights at once (larger: slices of rows)


def inverse_cholesky(H: np.ndarray, damp: float = 0.01, overwrite: bool = False) -> np.ndarray:
    """H [in, in] (dead inputs already fixed) -> upper U [in, in] with U^T U = (H + damp * mean(diag H) I)^-1.

    float64, the factorisation being the numerically delicate step, and in place: one [in, in] float64 array is
    the whole working set (``overwrite``: H's own, when it is a float64 C-ordered array the caller no longer needs).
    As the GPTQ reference does it: the Cholesky factor of the damped H, the inverse from it (LAPACK potri), and the
    upper Cholesky factor of that inverse. LAPACK reads the C-ordered array as its Fortran-ordered transpose, so
    its "lower" factors land in the upper triangle here.
    """
    from scipy.linalg import lapack

    A = H if overwrite and H.dtype == np.float64 and H.flags.c_contiguous else np.array(H, dtype=np.float64)
    n = A.shape[0]
    A.flat[:: n + 1] += damp * float(np.mean(np.diag(A)))
    B = A.T  # the same memory, Fortran-ordered: LAPACK works on it in place
    for step, fn in (("factor", lapack.dpotrf), ("invert", lapack.dpotri), ("factor the inverse", lapack.dpotrf)):
        out, info = fn(B, lower=1, overwrite_a=1) if fn is lapack.dpotrf else fn(B, lower=1, overwrite_c=1)
        if info != 0 or out.ctypes.data != B.ctypes.data:
            if info != 0:
                raise ValueError(f"H + {damp} * mean(diag H) * I is not positive definite ({step}: LAPACK info "
                                 f"{info}); raise damp or check the calibration statistics (NaN/inf?)")
            B[...] = out  # LAPACK made a copy after all: take its result
    for i in range(1, n):  # what potri/potrf leave below the diagonal is not part of U
        A[i, :i] = 0.0
    return A


@dataclass
class HessianFactor:
    """What GPTQ derives from H alone, shared by every row slice of a weight (rows are independent given H): the
    column order, the dead inputs, H's diagonal and the upper factor U of the damped inverse (``inverse_cholesky``,
    in the column order) -- the O(in^3) step, done once per H instead of once per slice."""
    perm: np.ndarray   # [in] int: columns by decreasing H_ii (act-order) or 0..in-1
    dead: np.ndarray   # [in] bool: H_ii == 0
    diag: np.ndarray   # [in] float64: H_ii, dead ones set to 1
    U: np.ndarray      # [in, in] float32, upper, permuted
    damp: float
    act_order: bool


def hessian_factor(H: mx.array | np.ndarray, damp: float = 0.01, act_order: bool = True) -> HessianFactor:
    """H [in, in] -> its ``HessianFactor`` (dead inputs get H_ii = 1; ``damp`` as in ``inverse_cholesky``).

    The float64 working copy is made already permuted, a block of rows at a time, and the float32 factor a block of
    rows at a time: beside H itself, one float64 and one float32 [in, in] array at the peak."""
    if isinstance(H, mx.array):
        mx.eval(H)
    H32 = np.asarray(H)  # a view of an MLX array's buffer (or the caller's NumPy array)
    if H32.ndim != 2 or H32.shape[0] != H32.shape[1]:
        raise ValueError(f"H must be square, got {H32.shape}")
    n = H32.shape[0]
    diag = np.diag(H32).astype(np.float64)
    dead = diag == 0
    diag[dead] = 1.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    Hn = np.empty((n, n), np.float64)  # H[perm][:, perm] in float64
    for r in range(0, n, FACTOR_ROWS):
        rows = H32[perm[r:r + FACTOR_ROWS]]
        Hn[r:r + FACTOR_ROWS] = rows[:, perm] if act_order else rows
    if not np.isfinite(Hn.sum()):  # a NaN or inf anywhere makes the sum non-finite
        raise ValueError("H contains NaN or inf")
    pdead = np.flatnonzero(dead[perm])
    Hn[pdead, pdead] = 1.0
    A = inverse_cholesky(Hn, damp, overwrite=True)  # [in, in] upper, permuted, float64 (Hn's memory)
    del Hn
    U = np.empty((n, n), np.float32)
    for r in range(0, n, FACTOR_ROWS):
        U[r:r + FACTOR_ROWS] = A[r:r + FACTOR_ROWS]
    del A
    return HessianFactor(perm, dead, diag, U, damp, act_order)


def solve_spd(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched symmetric positive definite systems A [n, k, k] x = b [n, k] -> x [n, k] by Cholesky (LAPACK posv:
    half the work of a general solve); a system that is not numerically positive definite by LU instead."""
    from scipy.linalg import LinAlgError, solve

    try:
        return solve(A, b[..., None], assume_a="pos")[..., 0]
    except LinAlgError:
        return np.linalg.solve(A, b[..., None])[..., 0]


def refit_params(w: mx.array, H: np.ndarray, codes: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                 ridge: float = 1e-6, scale_dtype=mx.float16) -> tuple[mx.array, mx.array]:
    """Least-squares (scale, bias) per group for frozen codes under the layer objective (module docstring).

    w [out, in], H [in, in] float64, codes [out, in] (0..2**bits-1), scales/biases [out, G] -> new (scales, biases),
    storage-rounded; rows whose objective did not go down keep their old parameters.
    """
    n_out, n_in = w.shape
    g = n_in if group_size == -1 else group_size
    G = n_in // g
    rows = max(1, int(3e7 // (n_in * G)))  # float64 work arrays of ~out * in * G: bounded by chunks of rows
    if n_out > rows:
        parts = [refit_params(w[r: r + rows], H, codes[r: r + rows], scales[r: r + rows], biases[r: r + rows],
                              group_size, ridge, scale_dtype) for r in range(0, n_out, rows)]
        return mx.concatenate([p[0] for p in parts]), mx.concatenate([p[1] for p in parts])
    W = np.asarray(w, np.float64)  # [out, in]
    Q = np.asarray(codes, np.float64).reshape(n_out, G, g)  # [out, G, g]
    Hg = np.asarray(H, np.float64).reshape(n_in, G, g)  # [in, G, g]
    T = np.matmul(Q.transpose(1, 0, 2), Hg.transpose(1, 2, 0))  # [G, out, in]: sum_{k in b} q[o, k] H[j, k] (BLAS)
    SS = np.einsum("oaj,boaj->oab", Q, T.reshape(G, n_out, G, g), optimize=True)  # [out, G, G]
    Hk = Hg.sum(axis=2).reshape(G, g, G)  # [G, g, G]: sum_{k in b} H[j, k]
    SB = np.einsum("oaj,ajb->oab", Q, Hk)  # [out, G, G]
    BB = Hk.sum(axis=1)  # [G, G]
    HW = W @ H  # [out, in]
    rhs = np.concatenate([(Q * HW.reshape(n_out, G, g)).sum(-1), HW.reshape(n_out, G, g).sum(-1)], axis=1)
    M = np.concatenate([np.concatenate([SS, SB], axis=2),
                        np.concatenate([SB.transpose(0, 2, 1), np.broadcast_to(BB, SB.shape)], axis=2)], axis=1)
    lam = ridge * np.trace(M, axis1=1, axis2=2)[:, None] / (2 * G) + 1e-30  # [out, 1]
    theta0 = np.concatenate([np.asarray(scales, np.float64), np.asarray(biases, np.float64)], axis=1)  # [out, 2G]
    theta = solve_spd(M + lam[:, :, None] * np.eye(2 * G)[None], rhs + lam * theta0)
    new_s = mx.array(theta[:, :G].astype(np.float32)).astype(scale_dtype).astype(mx.float32)
    new_b = mx.array(theta[:, G:].astype(np.float32)).astype(scale_dtype).astype(mx.float32)
    wHw = np.einsum("oj,oj->o", W, HW)  # [out]

    def row_obj(s, b):  # [out]: (w - A theta) H (w - A theta)^T = wHw - 2 rhs.theta + theta M theta, from the sums
        t = np.concatenate([np.asarray(s, np.float64), np.asarray(b, np.float64)], axis=1)  # [out, 2G]
        return wHw - 2 * np.einsum("oa,oa->o", rhs, t) + np.einsum("oa,oab,ob->o", t, M, t)

    better = mx.array(row_obj(new_s, new_b) < row_obj(scales, biases))[:, None]
    ok = better & mx.isfinite(new_s).all(axis=1, keepdims=True) & mx.isfinite(new_b).all(axis=1, keepdims=True)
    return mx.where(ok, new_s, scales), mx.where(ok, new_b, biases)


def gptq_pass(w: mx.array, H: mx.array, bits: int, group_size: int, *, act_order: bool = True, damp: float = 0.01,
          block_size: int = 128, scale_dtype=mx.float16, clip_search: bool = False,
          static_groups: bool | None = None, keep: mx.array | None = None, on_progress: Progress | None = None,
          fit: str = "lsq", refit: bool = True, grid: tuple[mx.array, mx.array] | None = None,
          iters: int = 1, factor: HessianFactor | None = None) -> tuple[QuantizedWeight, mx.array]:
    """GPTQ core -> (QuantizedWeight, committed weight [out, in]); qw.dequantize() == committed exactly.

    grid: fixed (scales, biases) [out, G] to round on (static groups); iters: see the module docstring;
    factor: ``hessian_factor(H, damp, act_order)`` when the caller already has it (slices of one weight)."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if iters > 1:
        factor = factor or hessian_factor(H, damp, act_order)
        kw = dict(act_order=act_order, damp=damp, block_size=block_size, scale_dtype=scale_dtype,
                  clip_search=clip_search, keep=keep, on_progress=on_progress, fit=fit, refit=refit, factor=factor)
        qw, C = gptq_pass(w, H, bits, group_size, static_groups=static_groups, grid=grid, **kw)
        H_obj = layer_objective_hessian(H)
        best = _objective(w, C, H_obj)
        for _ in range(iters - 1):
            qw2, C2 = gptq_pass(w, H, bits, group_size, static_groups=True, grid=(qw.scales, qw.biases), **kw)
            obj = _objective(w, C2, H_obj)
            if not obj < best:
                break
            qw, C, best = qw2, C2, obj
        return qw, C
    if bits not in AFFINE_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {AFFINE_BITS}")
    if group_size not in GROUP_SIZES + (-1,):
        raise FormatError(f"group_size={group_size} is not supported; choose one of {GROUP_SIZES} or -1")
    n_out, n_in = w.shape
    g = n_in if group_size == -1 else group_size
    if n_in % g:
        raise FormatError(f"input width {n_in} is not a multiple of group_size={g}")
    if tuple(H.shape) != (n_in, n_in):
        raise ValueError(f"H must be [{n_in}, {n_in}] for a weight of shape {tuple(w.shape)}, got {tuple(H.shape)}")
    maxq = 2**bits - 1
    static = act_order if static_groups is None else static_groups
    if act_order and not static:
        raise ValueError("act_order needs static groups: dynamic groups over permuted columns are not MLX format")
    static = static or group_size == -1 or grid is not None  # per-row groups: range known before the loop anyway

    if factor is None:
        factor = hessian_factor(H, damp, act_order)
    elif (factor.damp, factor.act_order, factor.U.shape[0]) != (damp, act_order, n_in):
        raise ValueError("factor was made for another damp, act_order or width")
    perm, dead, diag = factor.perm, factor.dead, factor.diag
    W = w.astype(mx.float32) * mx.array((~dead).astype(np.float32))[None, :]  # w: [out, in], dead columns zeroed
    exact_zero = keep is not None
    if exact_zero:
        if tuple(keep.shape) != (n_out, n_in):
            raise ValueError(f"keep must be [{n_out}, {n_in}], got {tuple(keep.shape)}")
        W = W * keep.astype(mx.float32)
    importance = mx.array(diag.astype(np.float32)) if clip_search or fit in REFINES else None  # E[x_i^2]

    if grid is not None:
        scales, biases = grid
        if tuple(scales.shape) != (n_out, n_in // g) or tuple(biases.shape) != (n_out, n_in // g):
            raise ValueError(f"grid must be two [{n_out}, {n_in // g}] arrays")
    elif static:
        ref = quantize_rtn(W, bits, group_size, clip_search=clip_search, importance=importance,
                           scale_dtype=scale_dtype, exact_zero=exact_zero, fit=fit)
        scales, biases = ref.scales, ref.biases  # [out, G]
    if static:
        gid = mx.array((perm // g).astype(np.int32))
        col_s, col_b = scales[:, gid], biases[:, gid]  # [out, in], permuted column order
        bs = block_size
    else:  # dynamic groups need every group inside one block, so the block sees all updates when it starts
        bs = max(block_size // g, 1) * g
        s_groups, b_groups = [], []

    # The column loop runs in numpy float32: per-column work is tiny vector ops, where MLX's per-op overhead dominates.
    cols = mx.array(perm.astype(np.int32))
    rest = np.array(W[:, cols] if act_order else W, dtype=np.float32)  # [out, in], permuted
    Un = factor.U
    K = None if keep is None else np.array(keep[:, cols] if act_order else keep, dtype=bool)  # [out, in], permuted
    if static:
        cs, cb = np.array(col_s, dtype=np.float32), np.array(col_b, dtype=np.float32)
    codes, commits = [], []
    for i1 in range(0, n_in, bs):
        i2 = min(i1 + bs, n_in)
        W1, U1 = rest[:, i1:i2].copy(), Un[i1:i2, i1:i2]  # [out, B], [B, B]
        Q1, D1, E1 = np.zeros_like(W1), np.zeros_like(W1), np.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                s, b = cs[:, col], cb[:, col]  # [out]
            elif col % g == 0:
                imp = None if importance is None else importance[col: col + g]
                Wg = W1[:, i: i + g] if K is None else W1[:, i: i + g] * K[:, col: col + g]
                grp = quantize_rtn(mx.array(Wg), bits, g, clip_search=clip_search, importance=imp,  # many small
                                   scale_dtype=scale_dtype, exact_zero=exact_zero, fit=fit, cpu_face=False)  # calls
                s, b = np.array(grp.scales[:, 0]), np.array(grp.biases[:, 0])
                s_groups.append(grp.scales)
                b_groups.append(grp.biases)
            wc = W1[:, i]  # [out]
            q = np.clip(np.round((wc - b) / s), 0, maxq)
            if K is not None:  # pruned: the zero code (exact: b = -z * s holds in fp16)
                q = np.where(K[:, col], q, np.clip(np.round(-b / s), 0, maxq))
            dq = q * s + b
            e = (wc - dq) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]  # U1 is upper: only columns >= i move
            Q1[:, i], D1[:, i], E1[:, i] = q, dq, e
        rest[:, i2:] -= E1 @ Un[i1:i2, i2:]  # lazy batch update of the remaining columns
        codes.append(Q1)
        commits.append(D1)
        if on_progress is not None:
            on_progress("gptq", i2, n_in)

    rest = Un = factor = None  # the loop's work arrays (and a factor only this call held) before the refit's
    Q = mx.array(np.concatenate(codes, axis=1))  # [out, in], permuted order
    C = mx.array(np.concatenate(commits, axis=1))
    codes = commits = None
    if act_order:
        inv = mx.array(np.argsort(perm).astype(np.int32))
        Q, C = Q[:, inv], C[:, inv]
    if not static:
        scales, biases = mx.concatenate(s_groups, axis=1), mx.concatenate(b_groups, axis=1)
    if refits(refit, keep, fit):
        scales, biases = refit_params(w.astype(mx.float32), layer_objective_hessian(H), Q, scales, biases, group_size,
                                      scale_dtype=scale_dtype)
        C = (Q.astype(mx.float32).reshape(n_out, -1, g) * scales[..., None] + biases[..., None]).reshape(n_out, n_in)
    qw = QuantizedWeight(Q.astype(mx.uint8), scales, biases, bits, group_size)
    return qw, C


def refits(refit: bool, keep: mx.array | None, fit: str) -> bool:
    """Does a pass refit its group parameters for the final codes? Not for a pruned weight (its zero code must stay
    0) nor on a symmetric grid (it must stay symmetric)."""
    return refit and keep is None and fit != "sym"


def layer_objective_hessian(H: mx.array) -> np.ndarray:
    """H [in, in] -> the undamped float64 H of the layer objective, dead inputs (H_ii == 0) cut out: their columns
    are committed as 0 by design, so the original weight's values there are no error to fit."""
    Hn = np.array(H, dtype=np.float64)
    dead = np.diag(Hn) == 0
    Hn[dead, :] = 0.0
    Hn[:, dead] = 0.0
    return Hn


def _objective(w: mx.array, C: mx.array, H_obj: np.ndarray) -> float:
    """trace((w - C) H (w - C)^T) with H_obj = ``layer_objective_hessian(H)``."""
    d = np.asarray(w.astype(mx.float32), np.float64) - np.asarray(C, np.float64)
    return float(((d @ H_obj) * d).sum())


def gptq_quantize(w: mx.array, H: mx.array, bits: int, group_size: int, *, act_order: bool = True,
                  damp: float = 0.01, block_size: int = 128, scale_dtype=mx.float16, clip_search: bool = False,
                  static_groups: bool | None = None, keep: mx.array | None = None,
                  on_progress: Progress | None = None, fit: str = "lsq", refit: bool = True,
                  iters: int = 1, factor: HessianFactor | None = None) -> QuantizedWeight:
    """w: [out, in], H: [in, in] = mean over calibration tokens of x x^T -> QuantizedWeight (MLX affine groups).

    Dead inputs (H_ii == 0) get H_ii = 1 and w[:, i] = 0. ``damp`` adds damp * mean(diag H) to the diagonal.
    ``static_groups`` (default: same as ``act_order``) fixes all group scales/biases from the original weight before
    the loop; otherwise they are computed from the updated weight when the loop enters each group.
    ``clip_search`` picks each group's range with rtn's clip search, weighted by diag(H).
    ``keep`` [out, in] bool: a fixed sparsity mask (prune, then quantize). Pruned weights are committed at the grid's
    zero, which the groups hold exactly (``rtn.affine_params(exact_zero=True)``), and their error is compensated by
    the kept weights of later columns like any rounding error (SparseGPT's joint sparsify-and-quantize, sec. 3.5).
    ``fit``: how the groups' grids are fitted (``rtn.quantize_rtn``); "lsq"/"zlsq" weight their least squares by diag(H)
    whether or not ``clip_search`` is on. ``refit``: re-solve the group parameters for the final codes on the layer
    objective (module docstring; skipped with ``keep``). ``iters``: GPTQ passes alternated with the refit, each
    on the last refitted grid, while the layer objective goes down (module docstring). ``factor``: H's
    ``hessian_factor`` when the caller quantizes several weights (or slices of one) on the same H.
    """
    kw = dict(act_order=act_order, damp=damp, block_size=block_size, scale_dtype=scale_dtype,
              clip_search=clip_search, static_groups=static_groups, on_progress=on_progress, fit=fit, refit=refit,
              iters=iters)
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])
    if w.shape[0] <= rows:
        return gptq_pass(w, H, bits, group_size, keep=keep, factor=factor, **kw)[0]
    # Rows are independent given H (each row's errors feed only its own later columns): a large matrix (an LM head)
    # in slices of rows bounds the dozen [out, in] work copies the pass holds; H's factor is made once for all of
    # them. (With iters > 1 each slice decides its own passes.)
    kw["factor"] = factor or hessian_factor(H, damp, act_order)
    late_refit = iters == 1 and refits(refit, keep, fit)
    if late_refit:  # every slice's loop on the factor, then the factor released before the refit's float64 H
        kw["refit"] = False
    parts = []
    for r in range(0, w.shape[0], rows):
        q = gptq_pass(w[r:r + rows], H, bits, group_size, keep=None if keep is None else keep[r:r + rows], **kw)[0]
        mx.eval(q.codes, q.scales, q.biases)
        parts.append(q)
    if late_refit:
        kw = None  # the factor, unless the caller holds it
        H_obj = layer_objective_hessian(H)
        for k, r in enumerate(range(0, w.shape[0], rows)):
            q = parts[k]
            s, b = refit_params(w[r:r + rows].astype(mx.float32), H_obj, q.codes, q.scales, q.biases, group_size,
                                scale_dtype=scale_dtype)
            mx.eval(s, b)
            parts[k] = QuantizedWeight(q.codes, s, b, bits, group_size)
        H_obj = None
    return QuantizedWeight(mx.concatenate([q.codes for q in parts]), mx.concatenate([q.scales for q in parts]),
                           mx.concatenate([q.biases for q in parts]), bits, group_size)
