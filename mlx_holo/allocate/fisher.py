"""Diagonal empirical Fisher of the language-model loss, for Fisher-weighted mixed-precision sensitivity.

Kim et al. 2023, "SqueezeLLM: Dense-and-Sparse Quantization" (arXiv:2306.07629), sec. 4.1: the loss increase of a
weight perturbation dW is approximated by 1/2 sum F * dW^2 with F the diagonal of the empirical Fisher, the mean over
calibration sequences of the squared gradient of the loss. Unlike a layer's own output error (trace(dW H dW^T)),
this sees how much the *rest of the network* amplifies or absorbs that layer's error, which is what a bit budget
has to be spent on.

The whole model is held (forward + backward through all blocks), so this costs about three times a float model's
memory; the streaming pipeline's bound does not apply to this pass.
"""
from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

Progress = Callable[[str, int, int], None]


def window_loss(model: nn.Module, tokens: mx.array) -> mx.array:
    """tokens [B, S] -> mean next-token cross-entropy (scalar)."""
    logits = model(tokens[:, :-1]).astype(mx.float32)  # [B, S-1, V]
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")


def diagonal_fisher(model: nn.Module, calib: mx.array, paths: list[str], *,
                    on_progress: Progress | None = None) -> dict[str, mx.array]:
    """calib [N, S] windows -> {weight path: F [same shape as the weight]}, F = mean over windows of grad^2.

    paths: the parameter paths (e.g. "model.layers.0.mlp.up_proj.weight") whose Fisher is wanted; only those are
    differentiated. Each window is one sample (the per-sequence gradient, as in SqueezeLLM).
    """
    if calib.ndim != 2 or calib.shape[0] == 0 or calib.shape[1] < 2:
        raise ValueError(f"calib must be [N >= 1, S >= 2] token windows, got {tuple(calib.shape)}")
    params = dict(tree_flatten(model.parameters()))
    missing = [p for p in paths if p not in params]
    if missing:
        raise KeyError(f"no such parameters: {missing[:3]}")
    model.freeze()
    modules = dict(model.named_modules())
    for p in paths:
        mod, name = p.rsplit(".", 1)
        modules[mod].unfreeze(keys=[name], recurse=False)
    grad_fn = nn.value_and_grad(model, window_loss)
    acc = {p: mx.zeros(params[p].shape, mx.float32) for p in paths}
    mx.eval(acc)
    n = calib.shape[0]
    try:
        for i in range(n):
            _, grads = grad_fn(model, calib[i: i + 1])
            g = dict(tree_flatten(grads))
            for p in paths:
                acc[p] = acc[p] + g[p].astype(mx.float32) ** 2
            mx.eval(acc)
            if on_progress:
                on_progress("fisher", i + 1, n)
    finally:
        model.unfreeze()
    return {p: a / n for p, a in acc.items()}

