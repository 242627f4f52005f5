"""OWL: outlier-weighted layerwise sparsity.

Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High
Sparsity" (arXiv:2310.05175), Section 3. The layer outlier distribution D_l is the fraction of Wanda scores
|W_ij| * ||X_j||_2 larger than M times the layer's mean score; layers with more outliers are pruned less. As in the
authors' code, the ratios are mapped linearly onto an interval of width 2 * lambda (lowest ratio -> highest
sparsity) and shifted so that the mean sparsity is exactly the target; here the result is also kept inside
[0, 0.99] by redistributing what clipping removes over the unclipped layers (mean still exactly the target).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..prune.wanda import wanda_score

CLIP = (0.0, 0.99)


def outlier_ratio(w: mx.array, x_norm: mx.array, M: float = 5.0) -> float:
    """w: [out, in], x_norm: [in] -> fraction of Wanda scores above M * mean score (the layer's D_l)."""
    s = wanda_score(w, x_norm)  # [out, in]
    return float(mx.mean((s > M * mx.mean(s)).astype(mx.float32)).item())


def _mean_preserving_clip(s: np.ndarray, target: float, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi] and shift the unclipped entries so the mean stays ``target`` (repeat until stable)."""
    s = s.copy()
    free = np.ones(len(s), dtype=bool)
    for _ in range(len(s) + 1):
        s = np.clip(s, lo, hi)
        gap = target * len(s) - s.sum()
        if abs(gap) < 1e-12 or not free.any():
            break
        s[free] += gap / free.sum()
        free &= (s > lo) & (s < hi)
    return np.clip(s, lo, hi)


def owl_allocation(outlier_ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsities with mean exactly ``target``; spread 2*lam, more outliers -> lower sparsity."""
    if not CLIP[0] <= target <= CLIP[1]:
        raise ValueError(f"target sparsity {target} outside {CLIP}")
    r = np.asarray(outlier_ratios, dtype=np.float64)
    if r.size == 0:
        return []
    span = r.max() - r.min()
    density = (r - r.min()) / span * (2 * lam) if span > 0 else np.zeros_like(r)  # [0, 2 lam]
    s = 1.0 - (density - density.mean() + (1.0 - target))  # mean = target
    return [float(x) for x in _mean_preserving_clip(s, target, *CLIP)]
