"""D2Prune's attention-aware update (Xiong et al., AAAI 2026, arXiv:2601.09176, sec. "dynamic attention update"):
which of the attention's q/k/v projections get SparseGPT's weight reconstruction, and which are only masked (the
activation-aware Wanda score, ``prune.d2prune.d2prune_wanda``), is a small combinatorial choice made per block. Each
of the 2^3 choices is scored on the block's calibration windows by the relative error of the attention output
(o_proj's input) plus rho times the KL divergence between the dense and the pruned attention distributions, so that
a long-tail pattern (attention sinks, a few dominant tokens) is kept.

The attention distributions are captured by wrapping the ``scaled_dot_product_attention`` that the attention's
mlx-lm module calls (queries and keys after the rotary embedding), for the duration of one forward.
"""
from __future__ import annotations

import itertools
import sys
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from ..model.structure import find_module
from .capture import capture_linear_inputs

QKV = ("q_proj", "k_proj", "v_proj")
PROBE_WINDOWS = 4  # calibration windows the choices are scored on


def attention_probs(q: mx.array, k: mx.array, scale: float, mask) -> mx.array:
    """q [B, H, S, d], k [B, Hkv, S, d] (grouped-query: H a multiple of Hkv), mask None | "causal" | additive or
    boolean array -> softmax attention probabilities [B, H, S, S] in float32."""
    q, k = q.astype(mx.float32), k.astype(mx.float32)
    if k.shape[1] != q.shape[1]:
        k = mx.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = (q * scale) @ mx.swapaxes(k, -1, -2)
    S, T = s.shape[-2:]
    if isinstance(mask, str):
        s = mx.where(mx.tril(mx.ones((S, T), mx.bool_), k=T - S), s, -mx.inf)
    elif mask is not None:
        s = mx.where(mask, s, -mx.inf) if mask.dtype == mx.bool_ else s + mask.astype(mx.float32)
    return mx.softmax(s, axis=-1)


@contextmanager
def captured_attention(attn: nn.Module, out: list):
    """Within the block, every call of ``attn``'s scaled_dot_product_attention appends its probabilities to out."""
    mod = sys.modules[type(attn).__module__]
    orig = getattr(mod, "scaled_dot_product_attention", None)
    if orig is None:
        raise ValueError(f"{type(attn).__name__}: no scaled_dot_product_attention to watch")

    def watch(queries, keys, values, cache, scale, mask, *a, **k):
        out.append(attention_probs(queries, keys, scale, mask))
        return orig(queries, keys, values, cache, scale=scale, mask=mask, *a, **k)

    mod.scaled_dot_product_attention = watch
    try:
        yield
    finally:
        mod.scaled_dot_product_attention = orig


def attention_kl(p: mx.array, q: mx.array) -> float:
    """Mean over rows of KL(p || q) of two [..., S, S] attention distributions."""
    lp, lq = mx.log(mx.maximum(p, 1e-30)), mx.log(mx.maximum(q, 1e-30))
    return float((p * (lp - lq)).sum(-1).mean().item())


def choose_updates(block: nn.Module, variants: dict, x: mx.array, mask, rho: float) -> tuple[set[str], dict]:
    """variants: {name in q/k/v_proj: (updated weight, masked-only weight)} -> (the names to prune without update,
    the score of every choice). block's q/k/v weights are restored; x [N, S, D] the block's calibration inputs."""
    attn = find_module(block, "self_attn")
    mods = {n: find_module(attn, n) for n in variants}
    dense_w = {n: m.weight for n, m in mods.items()}
    xs = x[:PROBE_WINDOWS]
    m = mask[:PROBE_WINDOWS] if isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[0] == x.shape[0] \
        else mask

    def run():
        probs: list = []
        with captured_attention(attn, probs):
            _, X = capture_linear_inputs(block, xs, m)
        o = X["self_attn.o_proj"]
        mx.eval(o, probs)
        return o, probs[0]

    o0, p0 = run()
    scores = {}
    names = sorted(variants)
    try:
        for picks in itertools.product((False, True), repeat=len(names)):
            for n, masked_only in zip(names, picks):
                mods[n].weight = variants[n][1 if masked_only else 0]
            o, p = run()
            err = float((mx.linalg.norm((o - o0).reshape(-1)) / mx.linalg.norm(o0.reshape(-1))).item()) ** 2
            scores[tuple(n for n, k in zip(names, picks) if k)] = err + rho * attention_kl(p0, p)
    finally:
        for n, w in dense_w.items():
            mods[n].weight = w
    best = min(scores, key=scores.get)
    return set(best), {",".join(k) or "-": v for k, v in scores.items()}
