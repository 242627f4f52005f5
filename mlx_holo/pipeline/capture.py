"""Capture hooks: what a block sees and produces during a forward pass, without changing its function.

``block_inputs``: the hidden states (and mask) entering block 0, as the model prepares them; ``capture_linear_inputs``:
the input of every linear (and the rows routed to every expert) of one block; ``capture_block_outputs``: every
block's output during a model's forward passes. Each patches the class of the module it watches for the duration
of the call and restores it after.
"""
from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import mlx.nn as nn

from ..model.experts import expert_modules, routed_rows
from ..model.structure import blocks, linear_modules


class _StopForward(Exception):
    pass


def block_inputs(model: nn.Module, tokens: mx.array) -> tuple[mx.array, object]:
    """tokens [N, S] -> (hidden [N, S, D] entering block 0, attention mask) exactly as the model prepares them."""
    layer0 = blocks(model)[0]
    cls = type(layer0)
    got = {}
    box = [got]  # the throw-away class lives in a reference cycle (freed only by gc): it must not keep `got` alive

    def grab(self, x, mask=None, *a, **k):
        box[0]["x"], box[0]["mask"] = x, mask
        raise _StopForward

    layer0.__class__ = type("Grab" + cls.__name__, (cls,), {"__call__": grab})
    try:
        model(tokens)
    except _StopForward:
        pass
    finally:
        layer0.__class__ = cls
        box.clear()
    return got["x"], got["mask"]


def capture_linear_inputs(block: nn.Module, x: mx.array, mask, stages: list | None = None
                          ) -> tuple[mx.array, dict[str, mx.array]]:
    """Run block on x [N, S, D]; -> (output, {linear path: its input [N*S, in]}), the dict in call order.
    A MoE expert layer's entry is (rows [n, in], expert index [n]), one row per (token, expert it was routed to).

    stages: if a list is given, it is filled with the linears grouped by the input they read, in call order
    (a llama block: [q, k, v], [o], [gate, up], [down]) -- the order of GPTQ's "true sequential" quantization.
    """
    seen: dict[str, mx.array] = {}
    box = [seen]  # see block_inputs: the patched classes are cyclic garbage and must not hold the inputs
    mods = linear_modules(block)
    saved = []
    inputs: list = []  # the distinct input arrays, in call order (kept only for the identity test below)
    flats: list = []   # each one flattened to [N*S, in]
    for path, m in mods:
        cls = type(m)

        def call(self, inp, _cls=cls, _path=path):
            k = next((i for i, a in enumerate(inputs) if a is inp), None)
            if k is None:  # a new input; linears that read the same one (q/k/v) share one flattened array
                inputs.append(inp)
                flats.append(inp.reshape(-1, inp.shape[-1]))
                if stages is not None:
                    stages.append([])
                k = len(inputs) - 1
            box[0][_path] = flats[k]
            if stages is not None:
                stages[k].append(_path)
            return _cls.__call__(self, inp)

        saved.append((m, cls))
        m.__class__ = type("Cap" + cls.__name__, (cls,), {"__call__": call})
    for path, m in expert_modules(block):
        cls = type(m)

        def call_experts(self, inp, indices, sorted_indices=False, _cls=cls, _path=path):
            box[0][_path] = routed_rows(inp, indices)
            return _cls.__call__(self, inp, indices, sorted_indices=sorted_indices)

        saved.append((m, cls))
        m.__class__ = type("Cap" + cls.__name__, (cls,), {"__call__": call_experts})
    try:
        y = block(x, mask)
        mx.eval(y, seen)
    finally:
        for m, cls in saved:
            m.__class__ = cls
        box.clear()
        inputs.clear()
        flats.clear()
    return y, seen


def hessian(x: mx.array) -> mx.array:
    """x [n, in] -> H = x^T x / n [in, in] (float32)."""
    x = x.astype(mx.float32)
    return (x.T @ x) / x.shape[0]


def error_terms(w: mx.array, w_hat: mx.array, H: mx.array) -> tuple[float, float]:
    """w, w_hat [out, in] (any rows of a layer) -> (trace((w_hat - w) H (w_hat - w)^T), trace(w H w^T)): the sums
    behind ``rel_error``, which add up over slices of rows."""
    d = (w_hat - w).astype(mx.float32)
    num = ((d @ H) * d).sum()
    den = ((w.astype(mx.float32) @ H) * w).sum()
    mx.eval(num, den)
    return num.item(), den.item()


def rel_error(w: mx.array, w_hat: mx.array, H: mx.array) -> float:
    num, den = error_terms(w, w_hat, H)
    return float(np.float32(num) / np.float32(max(den, 1e-12)))  # divided in float32, as the terms are


@contextmanager
def capture_block_outputs(model: nn.Module):
    """Record every transformer block's output during forward passes: yields a list that fills with [B, S, D]."""
    outs: list[mx.array] = []
    layers = blocks(model)
    originals = []
    for layer in layers:
        cls = type(layer)
        hooked = type(f"Hooked{cls.__name__}", (cls,), {
            "__call__": lambda self, *a, _cls=cls, **k: outs.append(_cls.__call__(self, *a, **k)) or outs[-1]})
        originals.append(cls)
        layer.__class__ = hooked
    try:
        yield outs
    finally:
        for layer, cls in zip(layers, originals):
            layer.__class__ = cls


def run_head(model: nn.Module, tokens: mx.array, h: mx.array) -> mx.array:
    """The model's own head -- final norm, lm_head or tied table, any logit scaling or soft-capping -- on hidden
    states h [B, S, D] leaving the last block (of the windows tokens [B, S]) -> logits [B, S, V]. The model's forward
    runs with its first block returning h and the others passing their input through, so nothing of the blocks is
    read (their weights may already be released) and the embedding lookup, unused, is never computed."""
    layers = blocks(model)
    saved = []

    def first(self, x, *a, **k):
        return h

    def skip(self, x, *a, **k):
        return x

    for j, layer in enumerate(layers):
        cls = type(layer)
        layer.__class__ = type("Head" + cls.__name__, (cls,), {"__call__": first if j == 0 else skip})
        saved.append((layer, cls))
    try:
        return model(tokens)
    finally:
        for layer, cls in saved:
            layer.__class__ = cls
