"""Magnitude pruning: zero the weights of smallest |w|.

The classic baseline (Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks");
the comparison point of Wanda (Sun et al. 2023, Table 2) and SparseGPT (Frantar & Alistarh 2023, Figure 1), where
the comparison group is the whole layer. ``per_row=True`` ranks within each output row instead.
"""
from __future__ import annotations

import mlx.core as mx

from .masks import PruneResult, make_mask


def magnitude_prune(w: mx.array, sparsity: float, nm: str | tuple[int, int] | None = None, *,
                    per_row: bool = False) -> PruneResult:
    """w: [out, in] -> PruneResult(weight [out, in] float32, keep-mask [out, in])."""
    w = w.astype(mx.float32)
    mask = make_mask(mx.abs(w), sparsity, nm, per_row=per_row)  # [out, in]
    return PruneResult(mx.where(mask, w, 0.0), mask)
