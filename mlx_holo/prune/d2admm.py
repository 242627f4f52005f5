"""D2ADMM (D2Prune++): ADMM pruning with an activation-aware pre-scaling and the mask chosen during the iterations.

The ADMM of Boza 2024 ("Fast and Effective Weight Update for Pruned Large Language Models", arXiv:2401.02938,
``prune/admm.py``) on the layer objective ||(W - W0) X^T||^2, as the D2Prune authors' D2ADMM runs it (Xiong et al.,
D2Prune, arXiv:2601.09176, and its public code): inputs pre-scaled by ``beta * ||x_j||`` (so the normalised Hessian
has a unit diagonal and one rho fits every layer; beta scales the penalty's weight), and the mask re-chosen at each
of the first ``prune_iters`` iterations from W + U, the ADMM iterate plus its dual, then kept for the remaining ones.
The mask's score is D2Prune's activation-aware Wanda score of that iterate (``prune.d2prune``): its Wanda term
w^2 ||X_j||^2 -- in the pre-scaled basis simply (W + U)^2 -- plus lambda1 y |w| x - lambda2 w^2 x^2. Unstructured
masks prune the lowest scores of the whole matrix (exact count), N:M masks the lowest of every M inputs of a row.
"""
from __future__ import annotations

import mlx.core as mx

from .d2prune import D2Stats, activation_terms
from .masks import PruneResult, make_mask


def d2admm_prune(w0: mx.array, H: mx.array, sparsity: float, nm=None, *, stats: D2Stats | None = None,
                 mask0: mx.array | None = None, lambda1: float = 1.0, lambda2: float = 0.0, beta: float = 1.0,
                 rho: float = 1.0, iters: int = 20, prune_iters: int = 15, damp: float = 0.1) -> PruneResult:
    """w0 [out, in] dense, H [in, in] = mean X^T X -> PruneResult. stats: D2Prune's activation magnitudes (None:
    the plain Wanda score); mask0: a starting mask (e.g. the pruner's; default: the score of w0); damp: Tikhonov
    damping of the normalised H (the reference's 0.1 of its mean diagonal)."""
    W0 = w0.astype(mx.float32)
    H = H.astype(mx.float32)
    n = H.shape[0]
    eye = mx.eye(n, dtype=mx.float32)
    hd = mx.diagonal(H)
    norm = beta * mx.where(hd > 0, mx.sqrt(mx.maximum(hd, 1e-30)), 1.0)   # [in]
    Hn = H / norm[:, None] / norm[None, :]
    Hn = Hn + damp * mx.mean(mx.diagonal(Hn)) * eye
    W = W0 * norm[None, :]                                                 # [out, in], the pre-scaled basis
    B = W @ Hn
    A_inv = mx.linalg.inv(Hn + rho * eye, stream=mx.cpu)
    wanda_scale = stats.wanda_row / mx.maximum(hd * beta ** 2, 1e-30) if stats is not None else None

    def score(V):  # V [out, in] in the pre-scaled basis -> D2Prune's Wanda-form score
        if stats is None:
            return V ** 2
        w = V / norm[None, :]
        return V ** 2 * wanda_scale[None, :] + activation_terms(w, stats.y, stats.x_wanda, lambda1, lambda2)

    U = mx.zeros_like(W)
    mask = mask0 if mask0 is not None else make_mask(score(W), sparsity, nm, per_row=False)
    for it in range(iters):
        if it < prune_iters:
            mask = make_mask(score(W + U), sparsity, nm, per_row=False)
        Z = (W + U) * mask
        U = U + W - Z
        W = (B + rho * (Z - U)) @ A_inv
        mx.eval(W, U, mask)
    Z = mx.where(mask, W + U, 0.0)
    return PruneResult(mx.where(mask, Z / norm[None, :], 0.0), mask)
