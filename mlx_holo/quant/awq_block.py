"""AWQ on a whole llama/qwen-style transformer block: which linears share an input, and where the scale folds.

Groups (as in the AWQ reference code, Lin et al. 2023): input_layernorm -> q/k/v; v_proj -> o_proj (only when
v_proj's output rows map one-to-one onto o_proj's inputs, i.e. no grouped-query attention); post_attention_layernorm
-> gate/up; up_proj -> down_proj. Any block with these attribute names works, whatever the model_type. In a mixture-of-experts block only the
attention groups are scaled (see ``_dense``).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .awq import apply_awq_scale, awq_search


def _find(block: nn.Module, *names: str):
    m = block
    for n in names:
        m = getattr(m, n, None)
        if m is None:
            return None
    return m


def groups(block: nn.Module) -> list[tuple[object, str, list[str]]]:
    """-> [(prev module (norm or linear), its kind 'norm'|'linear', [linear paths reading its output])]."""
    attn = _find(block, "self_attn")
    ln1, ln2 = _find(block, "input_layernorm"), _find(block, "post_attention_layernorm")
    if attn is None or ln1 is None or not all(_find(attn, n) is not None for n in ("q_proj", "k_proj", "v_proj")):
        raise ValueError(f"AWQ needs a llama/qwen-style block (input_layernorm, self_attn.q/k/v_proj); "
                         f"{type(block).__name__} has another layout")
    out = [(ln1, "norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    v, o = _find(attn, "v_proj"), _find(attn, "o_proj")
    if v is not None and o is not None and v.weight.shape[0] == o.weight.shape[1]:
        out.append((v, "linear", ["self_attn.o_proj"]))
    mlp = _find(block, "mlp")
    gate, up, down = (_find(block, "mlp", n) for n in ("gate_proj", "up_proj", "down_proj"))
    if ln2 is not None and gate is not None and up is not None and _dense(mlp):
        out.append((ln2, "norm", ["mlp.gate_proj", "mlp.up_proj"]))
        if down is not None:
            out.append((up, "linear", ["mlp.down_proj"]))
    return out


def _dense(mlp: nn.Module) -> bool:
    """A plain gated MLP: its gate/up projections are the only readers of post_attention_layernorm's output. In a
    mixture of experts the router and every expert read it too, so no scale is folded there (the experts' grids
    still get AWQ's clip search)."""
    return all(isinstance(m, nn.Linear) for _, m in mlp.named_modules() if m is not mlp and "weight" in m)


def apply(block: nn.Module, X: dict[str, mx.array], recipe) -> list[float]:
    """Search and fold AWQ scales into ``block`` in place (float function unchanged). -> chosen alpha per group."""
    alphas = []
    for prev, kind, paths in groups(block):
        lins = [_find(block, *p.split(".")) for p in paths]
        x = X[paths[0]]
        res = awq_search([m.weight.astype(mx.float32) for m in lins], x, recipe.bits, recipe.group_size,
                         fit="mlx" if recipe.fit == "mlx" else "minmax")
        new_prev, new_ws = apply_awq_scale(prev.weight.astype(mx.float32), [m.weight.astype(mx.float32) for m in lins],
                                           res.scales)
        if kind == "linear" and "bias" in prev:
            prev.bias = prev.bias / res.scales
        prev.weight = new_prev
        for m, w in zip(lins, new_ws):
            m.weight = w
        mx.eval(block.parameters())
        alphas.append(res.ratio)
    return alphas
