"""ADMM weight recovery for a fixed sparsity mask.

Boža 2024, "Fast and Effective Weight Update for Pruned Large Language Models" (arXiv:2401.02938), Section 3.
Minimise ||(W - W0) X^T||_F^2 subject to W being zero off the mask, split as W (free) and Z (masked) with scaled
dual U:
    W <- (W0 H + rho (Z - U)) (H + rho I)^-1          (one [in, in] inverse, shared by all rows and iterations)
    Z <- (W + U) * mask
    U <- U + W - Z
As in the paper, inputs are first normalised so that diag(H) = 1 (then one rho fits all layers), H is damped by
``damp * mean(diag H)``, and the returned weight is Z (exact zeros off the mask). A few masked preconditioned
conjugate-gradient steps on the exact masked least-squares problem finish the job (the paper's final refinement);
``cg_iters=0`` returns plain ADMM.
"""
from __future__ import annotations

from typing import Callable

import mlx.core as mx

ProgressFn = Callable[[str, int, int], None]


def admm_recover(w0: mx.array, mask: mx.array, H: mx.array, *, iters: int = 20, rho: float = 1.0,
                 damp: float = 0.01, cg_iters: int = 10, on_progress: ProgressFn | None = None) -> mx.array:
    """w0: [out, in] dense original, mask: bool [out, in] (True = kept), H: [in, in] = mean X^T X -> W [out, in]."""
    W0 = w0.astype(mx.float32)
    H = H.astype(mx.float32)
    out, n = W0.shape
    assert mask.shape == W0.shape and H.shape == (n, n), (mask.shape, W0.shape, H.shape)
    maskf = mask.astype(mx.float32)
    eye = mx.eye(n, dtype=mx.float32)

    hd = mx.diagonal(H)
    norm = mx.where(hd > 0, mx.sqrt(mx.maximum(hd, 1e-30)), 1.0)  # [in]; dead inputs (H_jj = 0) keep scale 1
    Hn = H / norm[:, None] / norm[None, :]  # [in, in], unit diagonal (0 for dead inputs, then damped)
    Hn = Hn + damp * mx.mean(mx.diagonal(Hn)) * eye
    W0n = W0 * norm[None, :]  # [out, in], the same outputs in the normalised basis
    B = W0n @ Hn  # [out, in]
    L = mx.linalg.cholesky(Hn + rho * eye, stream=mx.cpu)
    A_inv = mx.linalg.cholesky_inv(L, stream=mx.cpu)  # (Hn + rho I)^-1, symmetric

    Z = W0n * maskf
    U = mx.zeros_like(Z)
    for it in range(iters):
        W = (B + rho * (Z - U)) @ A_inv
        Z = (W + U) * maskf
        U = U + W - Z
        mx.eval(Z, U)
        if on_progress is not None:
            on_progress("admm", it + 1, iters + cg_iters)

    # masked PCG on  min_Z ||(Z - W0n) Hn^(1/2)||^2, Z off-mask = 0; rows are independent, solved together.
    # gradient G = (Z - W0n) Hn masked; Jacobi preconditioner diag(Hn) (~1 after normalisation).
    pre = 1.0 / mx.diagonal(Hn)[None, :]  # [1, in]
    R = (B - Z @ Hn) * maskf  # residual = -gradient/2, [out, in]
    Y = R * pre
    P = Y
    ry = mx.sum(R * Y, axis=1, keepdims=True)  # [out, 1]
    for it in range(cg_iters):
        AP = (P @ Hn) * maskf
        alpha = ry / mx.maximum(mx.sum(P * AP, axis=1, keepdims=True), 1e-30)
        Z = Z + alpha * P
        R = R - alpha * AP
        Y = R * pre
        ry_new = mx.sum(R * Y, axis=1, keepdims=True)
        P = Y + (ry_new / mx.maximum(ry, 1e-30)) * P
        ry = ry_new
        mx.eval(Z, R, P, ry)
        if on_progress is not None:
            on_progress("admm", iters + it + 1, iters + cg_iters)
    return mx.where(mask, Z / norm[None, :], 0.0)
