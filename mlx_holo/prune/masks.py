"""Shared helpers for the pruners: exact-count masks, N:M masks and checks.

Conventions used by every pruner in this package:
- a *mask* is a boolean array shaped like the weight, ``True`` = the weight is **kept**;
- ``sparsity`` is the fraction of weights set to zero; counts are exact (``round(sparsity * size)``), ties are
  broken by position (stable sort), so the fraction never drifts with duplicated scores;
- ``N:M`` means *keep* the N largest of every M consecutive inputs of a row (2:4 keeps 2, prunes 2), the
  semi-structured pattern of Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (NVIDIA 2:4).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class PruneResult:
    """weight: [out, in] float32 with exact zeros where ``mask`` is False; mask: bool [out, in] (True = kept)."""

    weight: mx.array
    mask: mx.array

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.mask.astype(mx.float32).mean().item())


def parse_nm(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """"2:4" / (2, 4) / None -> (n, m) / None, with 0 < n < m."""
    if nm is None:
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(x) for x in nm.split(":"))
        except ValueError:
            raise ValueError(f"nm must look like '2:4', got {nm!r}") from None
    else:
        n, m = (int(x) for x in nm)
    if not 0 < n < m:
        raise ValueError(f"nm must satisfy 0 < N < M, got {n}:{m}")
    return n, m


def prune_lowest(score: mx.array, k: int, axis: int = -1) -> mx.array:
    """Keep-mask shaped like ``score``: False at the k smallest entries along ``axis``, ties broken by position."""
    keep = mx.ones(score.shape, dtype=mx.bool_)
    if k <= 0:
        return keep
    idx = mx.split(mx.argsort(score, axis=axis), [k], axis=axis)[0]
    return mx.put_along_axis(keep, idx, mx.array(False), axis=axis)


def n_pruned(size: int, sparsity: float) -> int:
    """Exact number of entries to zero out of ``size`` at ``sparsity``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return int(round(sparsity * size))


def unstructured_mask(score: mx.array, sparsity: float, per_row: bool = True) -> mx.array:
    """score: [out, in] (higher = more important) -> keep-mask bool [out, in].

    per_row=True prunes exactly round(sparsity * in) entries in every row (Wanda's comparison group);
    per_row=False prunes exactly round(sparsity * out * in) entries over the whole matrix.
    """
    score = score.astype(mx.float32)
    out, n = score.shape
    if per_row:
        return prune_lowest(score, n_pruned(n, sparsity), axis=1)
    return prune_lowest(score.reshape(-1), n_pruned(out * n, sparsity), axis=0).reshape(out, n)


def nm_mask(score: mx.array, n: int, m: int) -> mx.array:
    """score: [out, in] -> keep-mask bool [out, in] with the n largest of every m consecutive inputs per row kept."""
    out, k = score.shape
    if k % m:
        raise ValueError(f"input width {k} is not a multiple of M={m}")
    s = score.astype(mx.float32).reshape(out, k // m, m)  # [out, in/m, m]
    return prune_lowest(s, m - n, axis=2).reshape(out, k)


def check_nm(mask_or_weight: mx.array, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs in each row has at most n non-zeros (N:M pattern holds)."""
    a = np.asarray(mask_or_weight)
    out, k = a.shape
    if k % m:
        return False
    nz = (a != 0).reshape(out, k // m, m).sum(axis=2)
    return bool((nz <= n).all())


def sparsity_of(w: mx.array) -> float:
    """Fraction of exact zeros in ``w`` (or of False entries in a keep-mask)."""
    a = np.asarray(w)
    return float((a == 0).mean())


def make_mask(score: mx.array, sparsity: float, nm: str | tuple[int, int] | None = None,
              per_row: bool = True) -> mx.array:
    """N:M mask when ``nm`` is given (sparsity is then 1 - n/m and the argument is ignored), else unstructured."""
    nm = parse_nm(nm)
    if nm is not None:
        return nm_mask(score, *nm)
    return unstructured_mask(score, sparsity, per_row=per_row)
