"""SparseGPT: one-shot pruning with OBS weight reconstruction.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(arXiv:2301.00774), Algorithm 1. With H = X^T X / n (+ damping) and U = chol(H^-1) (upper), columns are processed
left to right in lazy blocks of ``block_size``; at the start of each block the mask is chosen adaptively by the OBS
saliency w^2 / U_jj^2 (for N:M: every M columns, within each group of M), each column's pruning error
err = (w - q) / U_jj is pushed onto the not-yet-processed columns of the block through row j of U, and the block's
accumulated error onto all later columns at once.

Sparsity is exact: block b prunes round(s * out * end_b) - round(s * out * start_b) weights (the paper thresholds
each block's saliencies, which is the same up to ties and rounding). Dead inputs (H_jj == 0) get H_jj = 1 and
W[:, j] = 0, as in the reference implementation.
"""
from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .masks import PruneResult, n_pruned, nm_mask, parse_nm, prune_lowest

ProgressFn = Callable[[str, int, int], None]
SaliencyFn = Callable[[mx.array, mx.array, int, int], mx.array]


def inverse_hessian_chol(H: mx.array, damp: float = 0.01, max_tries: int = 5) -> mx.array:
    """H: [in, in] -> upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 ([in, in], H^-1 = U^T U).

    Damping is raised 10x per retry if the factorisation is not finite (numerically indefinite H).
    """
    n = H.shape[0]
    eye = mx.eye(n, dtype=mx.float32)
    mean_diag = mx.mean(mx.diagonal(H))
    for t in range(max_tries):
        Hd = H + (damp * 10**t) * mean_diag * eye
        L = mx.linalg.cholesky(Hd, stream=mx.cpu)
        U = mx.linalg.cholesky(mx.linalg.cholesky_inv(L, stream=mx.cpu), upper=True, stream=mx.cpu)
        if bool(mx.all(mx.isfinite(U)).item()):
            return U
    raise ValueError("Hessian is not positive definite even after damping")


def obs_saliency(W: mx.array, d: mx.array, c0: int, c1: int) -> mx.array:
    """The OBS saliency of SparseGPT: W [out, k] (columns c0:c1 as updated so far), d [k] = U_jj -> w^2 / U_jj^2."""
    return W ** 2 / (d ** 2)[None, :]


def sparsegpt_prune(w: mx.array, H: mx.array, sparsity: float, nm: str | tuple[int, int] | None = None, *,
                    block_size: int = 128, damp: float = 0.01, saliency: SaliencyFn = obs_saliency,
                    on_progress: ProgressFn | None = None) -> PruneResult:
    """w: [out, in], H: [in, in] = mean X^T X over calibration tokens -> PruneResult (weight [out, in], keep-mask).

    With ``nm`` ("2:4") the pattern is N:M (sparsity argument ignored); block_size must then be a multiple of M.
    saliency(W, d, c0, c1): the score the mask keeps the highest of (default ``obs_saliency``; D2Prune adds its
    activation terms, ``prune/d2prune.py``).
    """
    nm = parse_nm(nm)
    W = w.astype(mx.float32)
    H = H.astype(mx.float32)
    out, cols = W.shape
    assert H.shape == (cols, cols), (H.shape, W.shape)
    if nm is not None:
        n_keep, m = nm
        if cols % m or block_size % m:
            raise ValueError(f"input width {cols} and block_size {block_size} must be multiples of M={m}")

    dead = mx.diagonal(H) == 0  # [in]
    H = H + mx.diag(dead.astype(mx.float32))
    W = mx.where(dead[None, :], 0.0, W)
    U = inverse_hessian_chol(H, damp)  # [in, in] upper
    diag_u = mx.diagonal(U)  # [in]

    masks = []
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2]  # [out, bs]
        U1 = U[i1:i2, i1:i2]  # [bs, bs] upper
        d1 = diag_u[i1:i2]  # [bs]
        if nm is None:
            # adaptive mask for the whole block: exact count, chosen over all rows of the block
            k = n_pruned(out * i2, sparsity) - n_pruned(out * i1, sparsity)
            sal = saliency(W1, d1, i1, i2).reshape(-1)  # [out * bs]
            mask1 = prune_lowest(sal, k, axis=0).reshape(out, i2 - i1)  # [out, bs]
            mask_cols = None
        else:
            mask_cols = []
        errs = []
        for j in range(i2 - i1):
            if nm is not None and j % m == 0:
                sal = saliency(W1[:, j:j + m], d1[j:j + m], i1 + j, i1 + j + m)  # [out, m]
                mask_cols.append(nm_mask(sal, n_keep, m))
            keep_j = mask_cols[j // m][:, j % m] if nm is not None else mask1[:, j]  # [out]
            err = mx.where(keep_j, 0.0, W1[:, j]) / d1[j]  # [out]
            W1 = W1 - err[:, None] * U1[j][None, :]  # U1 upper: only columns >= j change
            errs.append(err)
        if nm is not None:
            mask1 = mx.concatenate(mask_cols, axis=1)
        E = mx.stack(errs, axis=1)  # [out, bs]
        W1 = mx.where(mask1, W1, 0.0)
        if i2 < cols:
            W = mx.concatenate([W[:, :i1], W1, W[:, i2:] - E @ U[i1:i2, i2:]], axis=1)
        else:
            W = mx.concatenate([W[:, :i1], W1], axis=1)
        masks.append(mask1)
        mx.eval(W, mask1)
        if on_progress is not None:
            on_progress("sparsegpt", i2, cols)
    mask = mx.concatenate(masks, axis=1)
    return PruneResult(mx.where(mask, W, 0.0), mask)
