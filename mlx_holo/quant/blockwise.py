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

Measured: it loses. SmolLM2-135M, GPTQ 3-bit g64 linears (QEP on, 8192 c4 calibration tokens), 100 steps, lr 1e-3,
2048 wiki tokens, base 16.57: 22.07 (KL 0.371) without tuning, 22.83 (KL 0.381) with it, although the held-out loss
dropped in 21 of 30 blocks (by up to 48%) and the tuning was kept there. (An earlier variant that aimed at the float
model's stream, with and without the per-token normalisation, lost as well.)
A lower block error on the calibration text (c4) did not carry over to the model's loss on wiki: GPTQ's per-layer
solution is the better one here. Off by default (``Recipe.tune_steps = 0``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx.utils import tree_unflatten

from .formats import QuantizedWeight


@dataclass
class BlockTuneResult:
    loss_before: float          # held-out windows' loss (relative per-token error), quantization parameters as given
    loss_after: float           # ... after tuning (fp16-rounded); == loss_before when the tuning was not kept
    kept: bool
    losses: list = field(default_factory=list)  # minibatch loss per step


class _CodeLinear(nn.Module):
    """A linear whose weight is scales * codes + biases per group; only ``scales`` and ``biases`` train."""

    def __init__(self, qw: QuantizedWeight, bias: mx.array | None):
        super().__init__()
        out, n = qw.shape
        self._qw = qw
        self._codes = qw.unpacked().astype(mx.float32).reshape(out, n // qw.group_size, qw.group_size)
        self.scales = qw.scales.astype(mx.float32)   # [out, G]
        self.biases = qw.biases.astype(mx.float32)   # [out, G]
        self._bias = bias

    def tuned(self) -> QuantizedWeight:
        """The given QuantizedWeight (same codes) with the current scales/biases, in its own dtypes."""
        qw = self._qw
        return QuantizedWeight(qw.codes, self.scales.astype(qw.scales.dtype), self.biases.astype(qw.biases.dtype),
                               qw.bits, qw.group_size, qw.wq, experts=qw.experts)

    def weight(self) -> mx.array:
        out, G, g = self._codes.shape
        return (self._codes * self.scales[..., None] + self.biases[..., None]).reshape(out, G * g)

    def __call__(self, x):
        y = x @ self.weight().T
        return y if self._bias is None else y + self._bias


class _CodeEmbedding(_CodeLinear):
    """An embedding table (rows = tokens) held as frozen codes with trainable scales/biases; ``as_linear`` serves a
    tied output head from the same parameters."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__(qw, None)

    def __call__(self, ids):
        G, g = self._codes.shape[1:]
        rows = self._codes[ids] * self.scales[ids][..., None] + self.biases[ids][..., None]  # [..., G, g]
        return rows.reshape(*ids.shape, G * g)

    def as_linear(self, x):
        return x @ self.weight().T


def swap_modules(root: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module of ``modules`` (path relative to root -> module) in place of the one at its path."""
    root.update_modules(tree_unflatten(list(modules.items())))


def holdout_split(n: int, holdout: float) -> int:
    """How many of n calibration windows (the last ones) to hold out: round(holdout * n), at least one and leaving
    at least one to train on when n >= 2; 0 when holdout is 0 or n < 2 (then the training windows are judged)."""
    return min(max(1, round(holdout * n)), n - 1) if holdout > 0 and n > 1 else 0


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
    windows, each tensor with learning rate lr * RMS(tensor) and a cosine decay (``replicate.tune.PerTensorAdam``).
    holdout: the fraction of windows (the last ones; at least one when N >= 2) not trained on; the tuning is kept
    only if the loss on them went down.
    -> (path -> QuantizedWeight with the tuned fp16 parameters, or the given ones if tuning did not help; result).
    """
    from ..pipeline import _get
    from ..replicate.tune import PerTensorAdam, adam_steps, round_params

    linears = {p: _get(block, p) for p in qws}
    y = y.astype(mx.float32)
    block.freeze()
    swapped = {p: _CodeLinear(qw, linears[p].get("bias")) for p, qw in qws.items()}
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

