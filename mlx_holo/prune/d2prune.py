"""D2Prune: pruning with a dual Taylor expansion in the weights and the activations.

Xiong et al., AAAI 2026, "D2Prune" (arXiv:2601.09176). SparseGPT's OBS saliency assumes the layer's inputs fixed;
D2Prune expands the layer error in both the weights and the activations,
    dE ~ lambda1 * y * w^T dx + lambda2 * dx^T (w w^T) dx + 1/2 dw^T H dw,
so that a weight's score also counts how much its removal moves the output under a shift dx of the activations
between calibration and use. Per weight W[o, j]:
    score = H-scale * w^2 / U_jj^2  +  lambda1 * y_o * |w| * x_j  -  lambda2 * w^2 * x_j^2,
with U = chol(H^-1) (SparseGPT's saliency), y_o the magnitude of output channel o and x_j that of input channel j,
both divided by the activation scale ``s``. The mask keeps the highest scores and SparseGPT's OBS update reconstructs
the kept weights (``sparsegpt_prune`` with this saliency). Layers named as "targets" (by default the attention's
value projection) get the same activation terms on Wanda's score, per output row, without weight update -- the
paper's attention-aware update: changing V's kept weights moves every attention output at once.

The magnitudes follow the reference code's units (so that its published defaults, s = 1500, lambda1 = 1,
lambda2 = 0, mean the same thing here): over N calibration windows of L tokens, y_o = sum_i i ||Y_io|| / (N s),
x_j = sum_i sqrt(2 i) ||X_ij|| / (N s) (Wanda's targets: sum_i i ||X_ij|| / (N s)), and the SparseGPT term is taken
on H = 2 L X^T X / n, i.e. ``2 L`` times the H used here. With lambda1 = lambda2 = 0 the result is SparseGPT's.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .masks import PruneResult, make_mask
from .sparsegpt import sparsegpt_prune

D2_S = 1500.0        # the reference's activation scale s
D2_LAMBDA1 = 1.0     # lambda1: the first-order activation term y w x
D2_LAMBDA2 = 0.0     # lambda2: the second-order activation term w^2 x^2
D2_TARGETS = ("v_proj",)  # layers pruned by the activation-aware Wanda score, without weight update


@dataclass
class D2Stats:
    """Activation magnitudes of one layer (module docstring): y [out], x_obs [in] (with SparseGPT), x_wanda [in]
    and wanda_row [in] = mean over windows of ||X_ij||^2 (Wanda's own term), h_scale = 2 L."""
    y: mx.array
    x_obs: mx.array
    x_wanda: mx.array
    wanda_row: mx.array
    h_scale: float


def d2_stats(w: mx.array, X: mx.array, windows: int, s: float = D2_S) -> D2Stats:
    """w [out, in] (the dense weight), X [n, in] its calibration inputs, ``windows`` windows of n / windows tokens
    each, in order (one window when they are not windows, e.g. an expert's routed rows) -> D2Stats."""
    n, d_in = X.shape
    N = windows if windows > 0 and n % windows == 0 else 1
    L = n // N
    w = w.astype(mx.float32)
    xn, yn = [], []
    for i in range(N):  # per window: ||X_ij|| [in] and ||Y_io|| = ||X_i w^T|| [out]
        xi = X[i * L:(i + 1) * L].astype(mx.float32)
        xn.append(mx.sqrt((xi * xi).sum(axis=0)))
        yi = xi @ w.T
        yn.append(mx.sqrt((yi * yi).sum(axis=0)))
        mx.eval(xn[-1], yn[-1])
    xn, yn = mx.stack(xn), mx.stack(yn)                    # [N, in], [N, out]
    k = mx.arange(1, N + 1, dtype=mx.float32)[:, None]     # window index i = 1..N
    return D2Stats(y=(k * yn).sum(axis=0) / (N * s), x_obs=(mx.sqrt(2.0 * k) * xn).sum(axis=0) / (N * s),
                   x_wanda=(k * xn).sum(axis=0) / (N * s), wanda_row=(xn * xn).mean(axis=0), h_scale=2.0 * L)


def activation_terms(W: mx.array, y: mx.array, x: mx.array, lambda1: float, lambda2: float) -> mx.array:
    """W [out, k], y [out], x [k] -> lambda1 y |W| x - lambda2 W^2 x^2 [out, k]."""
    out = mx.zeros(W.shape, mx.float32)
    if lambda1:
        out = out + lambda1 * y[:, None] * mx.abs(W) * x[None, :]
    if lambda2:
        out = out - lambda2 * W ** 2 * (x ** 2)[None, :]
    return out


def d2prune_sparsegpt(w: mx.array, H: mx.array, stats: D2Stats, sparsity: float, nm=None, *,
                      lambda1: float = D2_LAMBDA1, lambda2: float = D2_LAMBDA2, damp: float = 0.01,
                      block_size: int = 128) -> PruneResult:
    """w [out, in], H [in, in] = mean X^T X -> PruneResult: D2Prune's score with SparseGPT's reconstruction."""

    def saliency(W, d, c0, c1):
        obs = stats.h_scale * W ** 2 / (d ** 2)[None, :]
        return obs + activation_terms(W, stats.y, stats.x_obs[c0:c1], lambda1, lambda2)

    return sparsegpt_prune(w, H, sparsity, nm, block_size=block_size, damp=damp, saliency=saliency)


def d2prune_wanda(w: mx.array, stats: D2Stats, sparsity: float, nm=None, *, lambda1: float = D2_LAMBDA1,
                  lambda2: float = D2_LAMBDA2) -> PruneResult:
    """w [out, in] -> PruneResult without weight update: Wanda's score w^2 ||X_j||^2 (per output row) plus the
    activation terms."""
    w = w.astype(mx.float32)
    score = w ** 2 * stats.wanda_row[None, :] + activation_terms(w, stats.y, stats.x_wanda, lambda1, lambda2)
    mask = make_mask(score, sparsity, nm, per_row=True)
    return PruneResult(mx.where(mask, w, 0.0), mask)
