"""The optimiser shared by every code-frozen tuner (block-wise, end-to-end, replicated ensembles).

``PerTensorAdam``: one Adam per trainable tensor with learning rate lr * RMS(tensor) and a cosine decay (Adam's step
is scale-free per coordinate, so the RMS factor sets each tensor's step; Kingma and Ba 2015); ``adam_steps`` runs
the loop; ``round_params`` rounds trained scales/biases to their storage dtype; ``kl_to_base`` is the
distillation loss KL(p_base || p_model); ``holdout_split`` says how many calibration windows are held out to decide
whether a tuning is kept.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten


def round_params(module: nn.Module, dtype=mx.float16) -> None:
    """Round trainable scales/biases to the storage dtype (kept as float32 arrays holding fp16 values)."""
    upd = tree_map(lambda a: a.astype(dtype).astype(mx.float32), {
        k: v for k, v in module.trainable_parameters().items()})
    module.update({k: v for k, v in upd.items() if k != "mix"})


class PerTensorAdam:
    """One ``mlx.optimizers.Adam`` per trainable tensor, learning rate lr * RMS(tensor) with cosine decay
    (mixing weights: lr). Adam's step is scale-free per coordinate, so the RMS factor sets each tensor's step."""

    def __init__(self, module: nn.Module, lr: float, steps: int):
        self.opts = {}
        for k, v in tree_flatten(module.trainable_parameters()):
            r = 1.0 if k.endswith("mix") else max(float(mx.sqrt((v * v).mean()).item()), 1e-6)
            self.opts[k] = optim.Adam(learning_rate=optim.cosine_decay(lr * r, max(steps, 1), lr * r * 0.05))

    def update(self, module: nn.Module, grads: dict) -> None:
        params = dict(tree_flatten(module.trainable_parameters()))
        new = {k: self.opts[k].apply_gradients({"p": g}, {"p": params[k]})["p"]
               for k, g in tree_flatten(grads) if k in self.opts}
        module.update(_unflatten(new))

    def state(self) -> list:
        return [o.state for o in self.opts.values()]


def adam_steps(module: nn.Module, loss_grad, opt: PerTensorAdam, sample, steps: int, on_progress=None,
               stage: str = "tune") -> list[float]:
    """``steps`` Adam updates of module's trainable parameters; sample(step) -> the arguments of
    loss_grad(module, *args). -> the loss per step."""
    losses = []
    for step in range(steps):
        loss, grads = loss_grad(module, *sample(step))
        opt.update(module, grads)
        mx.eval(module.trainable_parameters(), opt.state(), loss)
        losses.append(float(loss.item()))
        if on_progress:
            on_progress(stage, step + 1, steps)
    return losses


def kl_to_base(logits: mx.array, base_logits: mx.array) -> mx.array:
    """Mean over positions of KL(p_base || p_model): logits [..., V]."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logq = base_logits - mx.logsumexp(base_logits, axis=-1, keepdims=True)
    return (mx.exp(logq) * (logq - logp)).sum(axis=-1).mean()


def holdout_split(n: int, holdout: float) -> int:
    """How many of n calibration windows (the last ones) to hold out: round(holdout * n), at least one and leaving
    at least one to train on when n >= 2; 0 when holdout is 0 or n < 2 (then the training windows are judged)."""
    return min(max(1, round(holdout * n)), n - 1) if holdout > 0 and n > 1 else 0


def _unflatten(flat: dict) -> dict:
    return tree_unflatten(list(flat.items()))
