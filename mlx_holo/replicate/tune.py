"""Quantization-parameter-only tuning of replicated ensembles (codes frozen).

Only the replicas' scales, biases and the mixing weights move; the shared integer codes never change (asserted after
every run). This is the scale-only fine-tuning of PEQA (Kim et al. 2023, arXiv:2305.14152) extended to biases and to
K replicas, in two stages:
- ``tune_ensemble_block``: per block, Adam on the MSE between the ensemble MLP's output and the float MLP's output on
  calibration activations (the block-reconstruction objective of BRECQ, Li et al. 2021, restricted to quantization
  parameters);
- ``tune_ensemble_kl``: optionally end to end, Adam on KL(p_base || p_model) over calibration windows, every other weight of
  the model frozen.
Parameters are tuned in float32 and rounded to the storage dtype (fp16) at the end; reported errors use the rounded
values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..tune.optim import PerTensorAdam, adam_steps, kl_to_base, round_params


@dataclass
class TuneResult:
    mse_before: float
    mse_after: float
    rel_before: float           # ||f_q - f||^2 / ||f||^2 on all calibration rows
    rel_after: float
    losses: list = field(default_factory=list)
    steps: int = 0


def _codes(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(module.parameters()) if k.endswith("codes")}


def assert_codes_frozen(before: dict[str, np.ndarray], module: nn.Module) -> None:
    after = _codes(module)
    assert before.keys() == after.keys(), "code tensors appeared or vanished during tuning"
    for k, v in before.items():
        assert after[k].dtype == v.dtype and np.array_equal(after[k], v), f"codes {k} changed during tuning"


def _mse(module, x, y):
    d = module(x).astype(mx.float32) - y
    return (d * d).mean()


def _full_mse(module, x, y, chunk=1024) -> tuple[float, float]:
    num = den = 0.0
    for i in range(0, x.shape[0], chunk):
        d = module(x[i:i + chunk]).astype(mx.float32) - y[i:i + chunk]
        num += float((d * d).sum().item())
        den += float((y[i:i + chunk] ** 2).sum().item())
    return num / (y.size), num / max(den, 1e-30)


def tune_ensemble_block(module: nn.Module, x: mx.array, target: mx.array, *, steps: int = 100, lr: float = 1e-3,
               batch: int = 256, seed: int = 0, storage_dtype=mx.float16, on_progress=None) -> TuneResult:
    """Tune an EnsembleMLP's scales/biases/mix so module(x) matches target.

    x: [n, D] calibration inputs of the block, target: [n, D] the float block's outputs on them. Adam with a cosine
    learning-rate decay over ``steps`` minibatches of ``batch`` rows. lr is relative: each tensor gets its own Adam
    with learning rate lr * RMS(tensor) (mixing weights: lr * 1), so tiny scales and O(1) mixing logits move alike.
    """
    x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    target = target.reshape(-1, target.shape[-1]).astype(mx.float32)
    frozen = _codes(module)
    mse0, rel0 = _full_mse(module, x, target)
    opt = PerTensorAdam(module, lr, steps)
    loss_grad = nn.value_and_grad(module, _mse)
    rng = np.random.default_rng(seed)

    def sample(_):
        idx = mx.array(rng.integers(0, x.shape[0], size=min(batch, x.shape[0])).astype(np.int32))
        return x[idx], target[idx]

    losses = adam_steps(module, loss_grad, opt, sample, steps, on_progress)
    round_params(module, storage_dtype)
    mse1, rel1 = _full_mse(module, x, target)
    assert_codes_frozen(frozen, module)
    return TuneResult(mse0, mse1, rel0, rel1, losses, steps)


def tune_ensemble_kl(model: nn.Module, base_logits: list[mx.array], windows: mx.array, *, steps: int = 20, lr: float = 3e-4,
            seed: int = 0, storage_dtype=mx.float16, on_progress=None) -> list[float]:
    """End-to-end KL tuning of every ensemble module's quantization parameters.

    model: LM with EnsembleMLP / EnsembleSwitchGLU modules swapped in; windows: [N, S] calibration tokens;
    base_logits: the base model's logits per window ([1, S, V] each, computed beforehand). Everything except the
    ensembles' scales, biases and mixing weights is frozen. -> KL per step (on the minibatch window).
    """
    from .ensembles import EnsembleMLP, EnsembleSwitchGLU

    ens = [(p, m) for p, m in model.named_modules() if isinstance(m, (EnsembleMLP, EnsembleSwitchGLU))]
    frozen = {p: _codes(m) for p, m in ens}
    model.freeze()
    for _, m in ens:
        m.unfreeze()
        m.gate_proj.freeze(keys=["codes"], recurse=False)
        m.up_proj.freeze(keys=["codes"], recurse=False)
        m.down_proj.freeze(keys=["codes"], recurse=False)
        if m.mixing == "mean":
            m.freeze(keys=["mix"], recurse=False)
    opt = PerTensorAdam(model, lr, steps)

    def loss_fn(m, toks, blog):
        return kl_to_base(m(toks).astype(mx.float32), blog)

    loss_grad = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(seed)

    def sample(_):
        i = int(rng.integers(0, windows.shape[0]))
        return windows[i:i + 1], base_logits[i]

    losses = adam_steps(model, loss_grad, opt, sample, steps, on_progress, "tune-kl")
    for p, m in ens:
        round_params(m, storage_dtype)
        assert_codes_frozen(frozen[p], m)
    model.unfreeze()
    for _, m in ens:  # restore the modules' own freeze state (codes, and mix under mean mixing)
        for lin in (m.gate_proj, m.up_proj, m.down_proj):
            lin.freeze(keys=["codes"], recurse=False)
        if m.mixing == "mean":
            m.freeze(keys=["mix"], recurse=False)
    return losses
