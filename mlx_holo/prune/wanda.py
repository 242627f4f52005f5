"""Wanda: pruning by weights and activations.

Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models" (arXiv:2306.11695).
Score S_ij = |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input feature j over all calibration tokens, and
weights are compared *per output row* (Section 3, "comparison group"); no weight update. N:M uses the same score
within each group of M consecutive inputs.
"""
from __future__ import annotations

import mlx.core as mx

from .masks import PruneResult, make_mask


def wanda_score(w: mx.array, x_norm: mx.array) -> mx.array:
    """w: [out, in], x_norm: [in] -> |W| * ||X_j|| [out, in]."""
    assert x_norm.shape == (w.shape[1],), (x_norm.shape, w.shape)
    return mx.abs(w.astype(mx.float32)) * x_norm.astype(mx.float32)[None, :]


def wanda_prune(w: mx.array, x_norm: mx.array, sparsity: float,
                nm: str | tuple[int, int] | None = None) -> PruneResult:
    """w: [out, in], x_norm: [in] (column L2 norms of the calibration inputs) -> PruneResult."""
    w = w.astype(mx.float32)
    mask = make_mask(wanda_score(w, x_norm), sparsity, nm, per_row=True)  # [out, in]
    return PruneResult(mx.where(mask, w, 0.0), mask)
