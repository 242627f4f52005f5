"""End-to-end tuning of quantization parameters (codes frozen) on the KL to the float model.

EfficientQAT's second stage, "E2E-QP" (Chen et al. 2024, arXiv:2407.11062): with every linear's integer codes fixed,
only the per-group scales and biases train, end to end, here on KL(p_base || p_model) over calibration windows
(the objective the evaluation reports) instead of EfficientQAT's next-token loss. Where block-wise reconstruction
(quant/blockwise.py) matches each block's output, this tunes all blocks jointly against the model's output
distribution. The whole compressed model is held (dequantized, fp32 on CPU) while tuning: this step is not bounded
by one block, unlike the pipeline.

Measured (``benchmarks/e2e_tune.py``, SmolLM2-135M, 8192 c4 calibration tokens in 16 windows, one window a step, 4
held out; 2048 wiki tokens, base 16.57): the learning rate decides everything. GPTQ 3-bit linears
(``runs/e-gptq3-qep05-d1``, 22.07, KL 0.371): lr 3e-5, 20 steps -> **21.54, KL 0.359** (held-out KL 0.184 ->
0.180; ``--out`` saves it, ``python -m mlx_holo.eval`` on the saved folder gives 21.55); lr 3e-4, 60 steps: the
training KL rose 0.196 -> 0.418 and the held-out KL to 0.355, dropped; lr 1e-3, 100 steps: dropped. GPTQ 4-bit
linears (17.50, KL 0.0685): lr 3e-5, 20 steps: held-out KL 0.0366 -> 0.0381, dropped; lr 1e-5: 17.46, KL 0.0679;
lr 1e-5, 80 steps on 16384 tokens: 17.35, KL 0.0666 (21.47, +4.65% on 8192 wiki tokens).
GPTQ 3-bit defaults with the 3-bit tied table (``runs/gptq3``, 25.53, KL 0.530): lr 3e-5, 20 steps -> 24.78, KL
0.511 with the table fixed, 24.78, KL 0.510 with the table tuned too (``swap_code_linears(embeddings=True)``, the
default: a quantized embedding becomes a ``_CodeEmbedding`` whose lookups and tied head share the parameters);
lr 1e-5, 80 steps on 16384 tokens, table tuned: 24.38, KL 0.498 (32.74, 1.60x base, on 8192 wiki tokens); four
windows a step (``batch=4``) at lr 1e-4, three rounds of 20 steps on different windows: 23.05, KL 0.450 (30.51,
1.488x base, on 8192 wiki tokens; README, "Measured"). Adam
moves every group by about lr x RMS per step whatever its gradient, and one 512-token window is a noisy gradient:
small rates; more steps over more windows helped (at 2048 calibration tokens, 4 windows, the held-out check dropped
the tuning at 3 and 4 bits).

``swap_code_linears`` turns a loaded quantized model's ``QuantizedLinear`` (and ``QuantizedEmbedding``) layers into
trainable code modules; ``tune_kl`` tunes them; ``to_float`` puts plain dequantized float layers back (for scoring)
and returns the tuned QuantizedWeights (for saving).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..replicate.tune import PerTensorAdam, adam_steps, kl_to_base, round_params
from .blockwise import _CodeEmbedding, _CodeLinear, holdout_split, swap_modules
from .formats import QuantizedWeight


@dataclass
class KLTuneResult:
    kl_before: float            # mean KL on the held-out calibration windows, parameters as given
    kl_after: float             # ... after tuning (fp16-rounded), kept or not
    kept: bool                  # kl_after < kl_before: the tuned parameters stay, else the given ones are restored
    losses: list = field(default_factory=list)


class _CodeSwitchLinear(_CodeLinear):
    """A MoE ``QuantizedSwitchLinear`` (E experts) as frozen codes with trainable scales/biases, held as the stacked
    [E * out, in] rows of ``experts.py``; called like mlx-lm's SwitchLinear."""

    def expert_weight(self) -> mx.array:
        w = self.weight()
        return w.reshape(self._qw.experts, -1, w.shape[1])  # [E, out, in]

    def __call__(self, x, indices, sorted_indices=False):
        y = mx.gather_mm(x, self.expert_weight().swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        return y if self._bias is None else y + mx.expand_dims(self._bias[indices], -2)


def swap_code_linears(model: nn.Module, *, embeddings: bool = True) -> dict[str, _CodeLinear]:
    """Replace every affine ``nn.QuantizedLinear`` of model by a ``_CodeLinear`` (codes frozen), every affine MoE
    ``QuantizedSwitchLinear`` by a ``_CodeSwitchLinear``, and with ``embeddings`` every affine
    ``nn.QuantizedEmbedding`` (a tied table serves the head too) by a ``_CodeEmbedding`` -> path -> module."""
    def qw(m):
        return QuantizedWeight(None, m.scales, m.biases, m.bits, m.group_size, wq=m.weight)

    out = {}
    for path, m in model.named_modules():
        if getattr(m, "mode", "affine") != "affine":
            continue
        if isinstance(m, nn.QuantizedLinear):
            out[path] = _CodeLinear(qw(m), m.get("bias"))
        elif type(m).__name__ == "QuantizedSwitchLinear" and m.get("biases") is not None:
            e = m.weight.shape[0]
            rows = QuantizedWeight(None, m.scales.reshape(-1, m.scales.shape[-1]),
                                   m.biases.reshape(-1, m.biases.shape[-1]), m.bits, m.group_size,
                                   wq=m.weight.reshape(-1, m.weight.shape[-1]), experts=e)
            out[path] = _CodeSwitchLinear(rows, m.get("bias"))
        elif embeddings and isinstance(m, nn.QuantizedEmbedding):
            out[path] = _CodeEmbedding(qw(m))
    swap_modules(model, out)
    return out


def to_float(model: nn.Module, code_linears: dict[str, _CodeLinear]) -> dict[str, QuantizedWeight]:
    """Put float layers (nn.Linear, nn.Embedding) holding the dequantized (tuned) weights back -> path -> tuned
    QuantizedWeight."""
    from mlx_lm.models.switch_layers import SwitchLinear

    layers = {}
    for path, cl in code_linears.items():
        w = cl.weight()
        if isinstance(cl, _CodeSwitchLinear):
            w = cl.expert_weight()
            layer = layers[path] = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias=cl._bias is not None)
            if cl._bias is not None:
                layer.bias = cl._bias
        elif isinstance(cl, _CodeEmbedding):
            layer = layers[path] = nn.Embedding(*w.shape)
        else:
            layer = layers[path] = nn.Linear(w.shape[1], w.shape[0], bias=cl._bias is not None)
            if cl._bias is not None:
                layer.bias = cl._bias
        layer.weight = w
    swap_modules(model, layers)
    return {path: cl.tuned() for path, cl in code_linears.items()}


def _mean_kl(model, base, windows) -> float:
    return float(np.mean([kl_to_base(model(windows[i:i + 1]).astype(mx.float32),
                                     base(windows[i:i + 1]).astype(mx.float32)).item()
                          for i in range(windows.shape[0])]))


def tune_kl(model: nn.Module, base: nn.Module, code_linears: dict[str, _CodeLinear], windows: mx.array, *,
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
