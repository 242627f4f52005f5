"""A read-only pass over the unmodified model, block by block: per-linear statistics for the allocators."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..model.experts import expert_modules
from ..model.structure import block_prefix, blocks, linear_modules, release_block
from .capture import block_inputs, capture_linear_inputs


def scan(model: nn.Module, calib: mx.array, fn, *, release: bool = True, residual: bool = False,
         experts: bool = False, on_progress=None) -> list:
    """Run the *unmodified* model block by block over calib [N, S]; call fn(block_index, path, w, X) for every
    linear (w [out, in] float32, X [n, in] its calibration input) and collect the results. Used for sensitivities
    (mixed precision) and outlier ratios (OWL). Blocks are released as they finish when ``release``.
    experts: also call fn for MoE expert layers, with w [E, out, in] and X = (rows [n, in], expert index [n]).
    residual: also pass ``h_ms``, the typical (median over tokens) mean square of the residual stream entering the
    block, as a 5th argument."""
    out = []
    x, mask = block_inputs(model, calib)
    prefix = block_prefix(model)
    bs = blocks(model)
    for i, block in enumerate(bs):
        mx.eval(block.parameters())
        y, X = capture_linear_inputs(block, x, mask)
        # median over tokens of the per-token mean square: robust to the few "massive activation" tokens
        extra = (float(mx.median((x.astype(mx.float32) ** 2).mean(axis=-1)).item()),) if residual else ()
        for path, lin in linear_modules(block) + (expert_modules(block) if experts else []):
            out.append(fn(i, f"{prefix}.{i}.{path}", lin.weight.astype(mx.float32), X[path], *extra))
        x = y
        if release:
            release_block(block)
        if on_progress:
            on_progress("scan", i + 1, len(bs))
    return out
