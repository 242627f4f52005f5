"""AWQ on a whole transformer block: which linears share an input, and where the scale folds.

Groups (as in the AWQ reference code, Lin et al. 2023): input_layernorm -> q/k/v (or phi3's fused qkv_proj);
v_proj -> o_proj (only when v_proj's output rows map one-to-one onto o_proj's inputs, i.e. no grouped-query
attention); the MLP's input norm -> gate/up (gate_up_proj, c_fc); up_proj -> down_proj. Any block with these
attribute names works, whatever the model_type; every fold is checked on the block's output (``apply``). In a
mixture-of-experts block only the attention groups are scaled (see ``_dense``).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .awq import apply_awq_scale, awq_search
from .formats import fit_group


def _find(block: nn.Module, *names: str):
    m = block
    for n in names:
        m = getattr(m, n, None)
        if m is None:
            return None
    return m


ATTN_INPUTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",),        # llama/qwen/gemma/starcoder2, phi3
               ("q_proj", "kv_a_proj_with_mqa"), ("q_a_proj", "kv_a_proj_with_mqa"))  # DeepSeek-V2/V3 (MLA)
MLP_INPUTS = (("gate_proj", "up_proj"), ("gate_up_proj",), ("c_fc",))   # gated, phi3 fused, GELU (starcoder2)


def groups(block: nn.Module) -> list[tuple[object, str, list[str]]]:
    """-> [(prev module (norm or linear), its kind 'norm'|'linear', [linear paths reading its output])].

    Found by name; a guess that is wrong for some architecture (e.g. OLMo-2's post_attention_layernorm, which
    normalises the attention's output) is caught by ``apply``'s check and undone. A block with no group found
    gets none (its linears still get AWQ's clip search)."""
    attn, mlp = _find(block, "self_attn"), _find(block, "mlp")
    # the MLP's input norm: Gemma-2/3 name it pre_feedforward_layernorm (their post_attention_layernorm normalises
    # the attention's output before the residual add)
    ln1 = _find(block, "input_layernorm")
    ln2 = _find(block, "pre_feedforward_layernorm") or _find(block, "post_attention_layernorm")
    out = []
    if attn is not None:
        names = next((ns for ns in ATTN_INPUTS if all(_find(attn, n) is not None for n in ns)), None)
        if ln1 is not None and names:
            out.append((ln1, "norm", [f"self_attn.{n}" for n in names]))
        v, o = _find(attn, "v_proj"), _find(attn, "o_proj")
        if v is not None and o is not None and v.weight.shape[0] == o.weight.shape[1]:
            out.append((v, "linear", ["self_attn.o_proj"]))
    if mlp is not None and _dense(mlp):
        names = next((ns for ns in MLP_INPUTS if all(_find(mlp, n) is not None for n in ns)), None)
        if ln2 is not None and names:
            out.append((ln2, "norm", [f"mlp.{n}" for n in names]))
        up, down = _find(mlp, "up_proj"), _find(mlp, "down_proj")
        if up is not None and down is not None:  # SwiGLU is linear in up's output (no fold across c_fc's GELU)
            out.append((up, "linear", ["mlp.down_proj"]))
    return out


def _dense(mlp: nn.Module) -> bool:
    """A plain gated MLP: its gate/up projections are the only readers of post_attention_layernorm's output. In a
    mixture of experts the router and every expert read it too, so no scale is folded there (the experts' grids
    still get AWQ's clip search)."""
    return all(isinstance(m, nn.Linear) for _, m in mlp.named_modules() if m is not mlp and "weight" in m)


def fold_norm(norm: nn.Module, s: mx.array, probe: mx.array) -> dict[str, mx.array]:
    """The parameters that make ``norm`` output norm(x) / s: gamma / s (and a LayerNorm's beta / s), or, for a
    Gemma-style RMSNorm that multiplies by (1 + w), w' = (1 + w) / s - 1. Which rule holds is checked on probe
    [n, in] (any vectors of the norm's width); ValueError when neither reproduces norm(probe) / s."""
    params = {k: v for k, v in norm.parameters().items() if isinstance(v, mx.array)}
    if "weight" not in params:
        raise ValueError(f"{type(norm).__name__} has no weight to fold a scale into")
    want = norm(probe).astype(mx.float32) / s
    w = params["weight"].astype(mx.float32)
    rules = {"gamma": w / s, "one_plus": (1.0 + w) / s - 1.0}
    for new_w in rules.values():
        new = {"weight": new_w.astype(params["weight"].dtype)}
        if "bias" in params:
            new["bias"] = (params["bias"].astype(mx.float32) / s).astype(params["bias"].dtype)
        old = dict(params)
        norm.update(new)
        got = norm(probe).astype(mx.float32)
        norm.update(old)
        if _rel(got, want) < 1e-4:
            return new
    raise ValueError(f"cannot fold a scale into {type(norm).__name__}")


def _rel(a: mx.array, b: mx.array) -> float:
    return float((mx.linalg.norm((a - b).reshape(-1)) / mx.maximum(mx.linalg.norm(b.reshape(-1)), 1e-30)).item())


def apply(block: nn.Module, X: dict[str, mx.array], recipe, x: mx.array | None = None, mask=None
          ) -> list[float | None]:
    """Search and fold AWQ scales into ``block`` in place (float function unchanged). -> chosen alpha per group,
    None for a group left unscaled.

    x [N, S, D] (the block's input) and mask given, every fold is checked: a group whose fold changes the block's
    output (relative error > 1e-4, float32) is undone -- e.g. a Gemma-2/OLMo-2 block whose norm of that name
    normalises the attention *output*, not the MLP's input. The norms themselves are folded by ``fold_norm``."""
    alphas: list[float | None] = []
    y0 = block(x, mask).astype(mx.float32) if x is not None else None
    for prev, kind, paths in groups(block):
        lins = [_find(block, *p.split(".")) for p in paths]
        xin = X[paths[0]]
        g = fit_group(xin.shape[-1], recipe.group_size) or recipe.group_size  # as the pipeline will quantize
        res = awq_search([m.weight.astype(mx.float32) for m in lins], xin, recipe.bits, g,
                         fit="mlx" if recipe.fit == "mlx" else "minmax")
        before = [dict(m.parameters()) for m in (prev, *lins)]
        new_prev, new_ws = apply_awq_scale(prev.weight.astype(mx.float32), [m.weight.astype(mx.float32) for m in lins],
                                           res.scales)
        if kind == "norm":
            try:
                prev.update(fold_norm(prev, res.scales, xin[:64]))
            except ValueError:
                alphas.append(None)
                continue
        else:
            prev.weight = new_prev
            if "bias" in prev:
                prev.bias = prev.bias / res.scales
        for m, w in zip(lins, new_ws):
            m.weight = w
        mx.eval(block.parameters())
        if y0 is not None and _rel(block(x, mask).astype(mx.float32), y0) > 1e-4:
            for m, p in zip((prev, *lins), before):
                m.update(p)
            alphas.append(None)
            continue
        alphas.append(res.ratio)
    return alphas
