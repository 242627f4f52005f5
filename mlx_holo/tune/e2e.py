"""End-to-end tuning of quantization parameters (codes frozen) on the KL to the float model.

EfficientQAT's second stage, "E2E-QP" (Chen et al. 2024, arXiv:2407.11062): with every linear's integer codes fixed,
only the per-group scales and biases train, end to end, here on KL(p_base || p_model) over calibration windows
(the objective the evaluation reports) instead of EfficientQAT's next-token loss. Where block-wise reconstruction
(``tune.block``) matches each block's output, this tunes all blocks jointly against the model's output
distribution. The whole compressed model is held (dequantized, fp32 on CPU) while tuning: this step is not bounded
by one block, unlike the pipeline.

``tune_kl`` tunes code-frozen layers of a model in memory; ``tune_folder`` does it to a compressed mlx-lm folder
(the ``--e2e-steps`` stage of compress and the ``tune`` command).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model.open import cast_floats, dequantize_model, open_model
from .codes import CodeEmbedding, swap_code_linears, to_float
from .optim import PerTensorAdam, adam_steps, holdout_split, kl_to_base, round_params


@dataclass
class KLTuneResult:
    kl_before: float            # mean KL on the held-out calibration windows, parameters as given
    kl_after: float             # ... after tuning (fp16-rounded), kept or not
    kept: bool                  # kl_after < kl_before: the tuned parameters stay, else the given ones are restored
    losses: list = field(default_factory=list)


def _mean_kl(model, base, windows) -> float:
    return float(np.mean([kl_to_base(model(windows[i:i + 1]).astype(mx.float32),
                                     base(windows[i:i + 1]).astype(mx.float32)).item()
                          for i in range(windows.shape[0])]))


def tune_kl(model: nn.Module, base: nn.Module, code_linears: dict, windows: mx.array, *,
            steps: int = 100, lr: float = 1e-3, batch: int = 1, holdout: float = 0.25, seed: int = 0,
            on_progress=None) -> KLTuneResult:
    """Adam on the scales/biases of ``code_linears`` (everything else frozen) to lower KL(base || model).

    windows: [N, S] calibration tokens; each step draws ``batch`` distinct training windows (the gradient of their
    mean KL); the last ``holdout`` fraction (at least one when N >= 2) is not trained on and decides whether the
    tuning is kept (else the parameters are restored)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    n = windows.shape[0]
    n_val = holdout_split(n, holdout)
    train, val = windows[:n - n_val], (windows[n - n_val:] if n_val else windows)
    saved = {p: (cl.scales, cl.biases) for p, cl in code_linears.items()}
    kl0 = _mean_kl(model, base, val)
    model.freeze()
    for cl in code_linears.values():
        cl.unfreeze(keys=["scales", "biases"], recurse=False)
    opt = PerTensorAdam(model, lr, steps)
    loss_grad = nn.value_and_grad(model, lambda m, toks, blog: kl_to_base(m(toks).astype(mx.float32), blog))
    rng = np.random.default_rng(seed)

    def sample(_):
        idx = mx.array(np.sort(rng.choice(train.shape[0], size=min(batch, train.shape[0]), replace=False)))
        toks = train[idx]                                  # [B, S]
        blog = base(toks).astype(mx.float32)               # [B, S, V]
        mx.eval(blog)
        return toks, blog

    losses = adam_steps(model, loss_grad, opt, sample, steps, on_progress, "tune-kl")
    model.unfreeze()
    for cl in code_linears.values():  # as stored: fp16
        round_params(cl)
    kl1 = _mean_kl(model, base, val)
    kept = kl1 < kl0
    if not kept:
        for p, cl in code_linears.items():
            cl.scales, cl.biases = saved[p]
    return KLTuneResult(kl0, kl1, kept, losses)


def tune_folder(folder, base, calib, *, steps: int, lr: float, batch: int = 1, seed: int = 0, on_progress=None):
    """End-to-end KL tuning (``tune_kl``) of a compressed folder's scales/biases (every affine quantized linear
    and embedding table), codes frozen -> (report, tensors, model).

    folder: a compressed mlx-lm folder; base: the float model; calib: [N, S] calibration windows (a quarter held out
    decides whether the tuning is kept). tensors: {"<linear>.scales"/"<linear>.biases": tuned} when kept, else {};
    model: the folder's model with plain float linears holding the (tuned, or restored) dequantized weights."""
    m = open_model(str(folder), dequantize=False)[0]
    code = swap_code_linears(m)
    dequantize_model(m)  # anything still quantized (other modes): float, fixed
    cast_floats(m, mx.float32)
    t = time.perf_counter()
    res = tune_kl(m, base, code, calib, steps=steps, lr=lr, batch=batch, seed=seed, on_progress=on_progress)
    tuned = to_float(m, code)
    k = max(1, len(res.losses) // 10)
    n_emb = sum(isinstance(c, CodeEmbedding) for c in code.values())
    report = {"steps": steps, "lr": lr, "batch": batch, "linears": len(code) - n_emb, "embeddings": n_emb,
              "expert_layers": sum(q.experts > 0 for q in tuned.values()),
              "windows": int(calib.shape[0]),
              "heldout_kl_before": res.kl_before, "heldout_kl_after": res.kl_after, "kept": bool(res.kept),
              "train_kl_first": float(np.mean(res.losses[:k])) if res.losses else None,
              "train_kl_last": float(np.mean(res.losses[-k:])) if res.losses else None,
              "seconds": time.perf_counter() - t}
    tensors = {f"{p}.{key}": q.stored_shape(getattr(q, key))  # MoE experts as stored: [E, out, G]
               for p, q in tuned.items() for key in ("scales", "biases")} if res.kept else {}
    return report, tensors, m
