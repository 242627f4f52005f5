"""Block-wise reconstruction of quantization parameters, codes frozen.

After a transformer block's linears are quantized (GPTQ, RTN, AWQ...), their integer codes stay fixed and only the
per-group scales and biases move: Adam on the mean squared error between the quantized block's output and the float
block's output on calibration windows,

    min_{s, b} mean_t || block_{s,b}(x_q)_t - y_t ||^2 / || y_t ||^2,   W_l = s_l * codes_l + b_l  for every linear l,

the block-wise objective of BRECQ (Li et al. 2021, arXiv:2102.05426) with the trainable set of EfficientQAT's
"Block-AP"/"E2E-QP" restricted to quantization parameters (Chen et al. 2024, arXiv:2407.11062) and of PEQA's
scale-only tuning (Kim et al. 2023, arXiv:2305.14152). Unlike GPTQ's per-layer objective it sees the block's
non-linearities (attention softmax, SwiGLU) and the interaction of its linears; unlike the per-row ``refit`` of
quant/gptq.py it is a gradient method on the block output.

The error is relative per token: everything that reads the residual stream reads it through an RMSNorm, so a
token's error matters relative to its own norm (a plain MSE is dominated by the few "massive activation" tokens,
whose norms are ~100x the rest).

x_q are the block's inputs in the *compressed* model (the sequential convention) and y the float block's output on
them (BRECQ's target; the block is not asked to undo the earlier blocks' errors -- QEP does that per layer). The tuned
parameters are rounded to fp16 (as stored) and kept only if the loss on held-out calibration windows went down with
the rounded values.
Off by default (``Recipe.tune_steps = 0``; measured results in docs/experiments.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model.structure import get_module
from ..quant.formats import QuantizedWeight
from .codes import CodeLinear, swap_modules
from .optim import PerTensorAdam, adam_steps, holdout_split, round_params


@dataclass
class BlockTuneResult:
    loss_before: float          # held-out windows' loss (relative per-token error), quantization parameters as given
    loss_after: float           # ... after tuning (fp16-rounded); == loss_before when the tuning was not kept
    kept: bool
    losses: list = field(default_factory=list)  # minibatch loss per step


def _loss(out: mx.array, y: mx.array) -> mx.array:
    """Mean over tokens of ||out_t - y_t||^2 / ||y_t||^2 (out, y [..., D])."""
    d = out.astype(mx.float32) - y
    return ((d * d).sum(axis=-1) / mx.maximum((y * y).sum(axis=-1), 1e-12)).mean()


def _block_loss(block, x, mask, y, windows: int = 2) -> float:
    """``_loss`` of block(x) vs y over all calibration windows (x, y [N, S, D])."""
    tot = 0.0
    for i in range(0, x.shape[0], windows):
        tot += float(_loss(block(x[i:i + windows], mask), y[i:i + windows]).item()) * y[i:i + windows].shape[0]
    return tot / y.shape[0]


def tune_block(block: nn.Module, qws: dict[str, QuantizedWeight], x: mx.array, mask, y: mx.array, *,
               steps: int = 50, lr: float = 1e-3, batch: int = 1, holdout: float = 0.25, seed: int = 0,
               on_progress=None) -> tuple[dict[str, QuantizedWeight], BlockTuneResult]:
    """Tune the scales/biases of a block's quantized linears to reconstruct y (``_loss``).

    block: a transformer block whose linears at the paths of ``qws`` (relative to the block) hold any weight -- they
    are swapped for their quantized form during tuning and set back (to the dequantized tuned weight) afterwards.
    qws: path -> QuantizedWeight (codes kept). x: [N, S, D] the block's calibration inputs, mask: the model's
    attention mask for them, y: [N, S, D] the output to reconstruct. Adam over ``steps`` minibatches of ``batch``
    windows, each tensor with learning rate lr * RMS(tensor) and a cosine decay (``tune.optim.PerTensorAdam``).
    holdout: the fraction of windows (the last ones; at least one when N >= 2) not trained on; the tuning is kept
    only if the loss on them went down.
    -> (path -> QuantizedWeight with the tuned fp16 parameters, or the given ones if tuning did not help; result).
    """
    linears = {p: get_module(block, p) for p in qws}
    y = y.astype(mx.float32)
    block.freeze()
    swapped = {p: CodeLinear(qw, linears[p].get("bias")) for p, qw in qws.items()}
    swap_modules(block, swapped)
    n_val = holdout_split(x.shape[0], holdout)
    xt, yt = x[:x.shape[0] - n_val], y[:y.shape[0] - n_val]
    xv, yv = (x[-n_val:], y[-n_val:]) if n_val else (x, y)
    try:
        loss0 = _block_loss(block, xv, mask, yv)
        for cl in swapped.values():
            cl.unfreeze(keys=["scales", "biases"], recurse=False)
        opt = PerTensorAdam(block, lr, steps)

        def loss_fn(b, xb, yb):
            return _loss(b(xb, mask), yb)

        loss_grad = nn.value_and_grad(block, loss_fn)
        rng = np.random.default_rng(seed)

        def sample(_):
            idx = mx.array(rng.choice(xt.shape[0], size=min(batch, xt.shape[0]), replace=False).astype(np.int32))
            return xt[idx], yt[idx]

        losses = adam_steps(block, loss_grad, opt, sample, steps, on_progress)
        for cl in swapped.values():  # as stored: fp16
            round_params(cl)
        loss1 = _block_loss(block, xv, mask, yv)
        kept = loss1 < loss0
        out = {p: swapped[p].tuned() if kept else qw for p, qw in qws.items()}
    finally:
        swap_modules(block, linears)
        block.unfreeze()
    for p, qw in out.items():
        linears[p].weight = qw.dequantize()
    mx.eval([lin.weight for lin in linears.values()])
    return out, BlockTuneResult(loss0, loss1 if kept else loss0, kept, losses)
