"""Measured sensitivity for mixed precision: the KL divergence one layer's quantization alone adds to the output.

ZeroQ (Cai et al. 2020, "ZeroQ: A Novel Zero Shot Quantization Framework", arXiv:2001.00281, sec. 3.2-3.3): the
sensitivity of layer i at k bits is Omega_i(k) = KL(M(theta; x) || M(theta~_i(k); x)), the model with only layer i
quantized, and an allocation's loss is estimated by the sum over layers. Unlike a second-order estimate (Hessian,
diagonal Fisher), it is not a Taylor expansion around the float weights: it sees how fast a layer's damage grows
below the operating point (2 bits), where second-order estimates go wrong (``Recipe.mixed_bits``).

Cost: one forward per (layer, measured choice). A block's layer is scored from that block on: the blocks before it
replay their cached float outputs (the model's own forward runs, so embeddings, masks and a tied head are the
model's). Only the measured choices are run; ``extrapolate`` fills in the others (other group sizes, more bits)
from a cheap proxy's ratios.

How additive the layers' damage is can be checked with ``experiments/additivity.py``; what this sensitivity measured
against the Hessian and Fisher ones is in docs/experiments.md ("measured sensitivity").
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..model.structure import block_prefix, blocks
from ..pipeline.capture import block_inputs

Progress = Callable[[str, int, int], None]


def scored_tokens(calib: mx.array, n_tokens: int) -> mx.array:
    """calib [N, S] windows -> the first n_tokens of them [ceil(n_tokens / S), min(S, n_tokens)] (what is scored)."""
    S = calib.shape[1]
    return calib[: -(-n_tokens // S), : min(S, n_tokens)]


def kl_after(model: nn.Module, tokens: mx.array, base_logits: mx.array) -> float:
    """Mean KL(p_base || p_model) over the positions of tokens [N, S]; base_logits [N, S, V] float32."""
    from ..tune.optim import kl_to_base

    return float(kl_to_base(model(tokens).astype(mx.float32), base_logits).item())


def block_outputs(model: nn.Module, tokens: mx.array) -> list[mx.array]:
    """tokens [N, S] -> every block's float output [N, S, D], in order (what ``replay`` feeds back)."""

    x, mask = block_inputs(model, tokens)
    outs = []
    for block in blocks(model):
        x = block(x, mask)
        mx.eval(x)
        outs.append(x)
    return outs


@contextmanager
def replay(blocks: list[nn.Module], outputs: list[mx.array]):
    """While open, blocks[j] returns outputs[j] without computing (the forward skips to the first block not given)."""
    saved = []
    try:
        for block, out in zip(blocks, outputs):
            cls = type(block)
            saved.append((block, cls))
            block.__class__ = type("Replay" + cls.__name__, (cls,), {"__call__": lambda self, *a, _o=out, **k: _o})
        yield
    finally:
        for block, cls in saved:
            block.__class__ = cls


def measured_errors(model: nn.Module, tokens: mx.array, paths: list[str], options: Callable[[str], list],
                    quantize: Callable[[str, mx.array, object], mx.array], *,
                    on_progress: Progress | None = None) -> dict[str, dict]:
    """-> {weight path: {choice: KL(base || the model with only that weight replaced by quantize(path, w, choice))}}.

    model: the float model (weights restored on return); tokens [N, S] scored; paths: weight paths, e.g.
    "model.layers.3.mlp.up_proj.weight" or "model.embed_tokens.weight" (a tied table is scored as both);
    options(path) -> the choices to measure; quantize(path, w [out, in], choice) -> w_hat [out, in] (dequantized)."""
    from mlx.utils import tree_flatten


    params = dict(tree_flatten(model.parameters()))
    missing = [p for p in paths if p not in params]
    if missing:
        raise KeyError(f"no such parameters: {missing[:3]}")
    mods = dict(model.named_modules())
    bs = blocks(model)
    prefix = block_prefix(model) + "."
    base = model(tokens).astype(mx.float32)  # [N, S, V]
    outs = block_outputs(model, tokens)
    mx.eval(base)
    res, total, done = {}, sum(len(options(p)) for p in paths), 0
    for p in paths:
        mod, name = p.rsplit(".", 1)
        w = params[p]
        start = int(p[len(prefix):].split(".", 1)[0]) if p.startswith(prefix) else 0  # first block to compute
        res[p] = {}
        with replay(bs[:start], outs[:start]):
            for c in options(p):
                setattr(mods[mod], name, quantize(p, w, c).astype(w.dtype))
                try:
                    res[p][c] = kl_after(model, tokens, base)
                finally:
                    setattr(mods[mod], name, w)
                done += 1
                if on_progress:
                    on_progress("sensitivity", done, total)
    return res


def extrapolate(measured: dict, proxy: dict, anchor: Callable[[object], object]) -> dict:
    """Fill every proxy choice: err(c) = measured[a] * proxy[c] / proxy[a] with a = anchor(c) a measured choice
    (itself when measured). measured, proxy: {choice: value}; the proxy is any error of the same shape (e.g. the
    weight-space error of RTN at c), used only through its ratios within one layer."""
    out = {}
    for c, v in proxy.items():
        if c in measured:
            out[c] = measured[c]
        else:
            a = anchor(c)
            out[c] = measured[a] * v / proxy[a] if proxy[a] > 0 else measured[a]
    return out
