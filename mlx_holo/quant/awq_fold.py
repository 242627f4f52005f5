"""AWQ on a whole transformer block: which linears share an input, and where the scale folds.

Groups (as in the AWQ reference code, Lin et al. 2023): input_layernorm -> q/k/v (or phi3's fused qkv_proj);
v_proj -> o_proj (only when v_proj's output rows map one-to-one onto o_proj's inputs, i.e. no grouped-query
attention); the MLP's input norm -> gate/up (gate_up_proj, c_fc); up_proj -> down_proj. Any block with these
attribute names works, whatever the model_type; every fold is checked on the block's output (``apply``).

In a mixture-of-experts block (as AutoAWQ does for Mixtral) the MLP's input norm scales every reader of its output
at once: each expert's gate/up (mlx-lm ``SwitchLinear`` [E, out, in]), a shared expert's gate/up, and the routers,
which stay float, so their fold is exact and routing is unchanged; the scale is searched on the experts' errors,
each expert on the tokens routed to it. Each expert's up -> down pair gets its own scale (``experts``).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..model.experts import expert_modules, is_switch, moe_container, router_paths, split_by_expert
from ..model.structure import find_module
from .awq import apply_awq_scale, awq_search
from .formats import fit_group
from .rtn import quantize_rtn


ATTN_INPUTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",),        # llama/qwen/gemma/starcoder2, phi3
               ("q_proj", "kv_a_proj_with_mqa"), ("q_a_proj", "kv_a_proj_with_mqa"))  # DeepSeek-V2/V3 (MLA)
MLP_INPUTS = (("gate_proj", "up_proj"), ("gate_up_proj",), ("c_fc",))   # gated, phi3 fused, GELU (starcoder2)


def groups(block: nn.Module) -> list[tuple[object, str, list[str]]]:
    """-> [(prev module (norm, linear or expert layer), its kind 'norm'|'linear'|'experts', [paths reading its
    output])]. 'experts': prev is a SwitchLinear up projection and the one path its SwitchLinear down projection,
    folded expert by expert.

    Found by name; a guess that is wrong for some architecture (e.g. OLMo-2's post_attention_layernorm, which
    normalises the attention's output) is caught by ``apply``'s check and undone. A block with no group found
    gets none (its linears still get AWQ's clip search)."""
    attn = find_module(block, "self_attn")
    # the MLP's input norm: Gemma-2/3 name it pre_feedforward_layernorm (their post_attention_layernorm normalises
    # the attention's output before the residual add)
    ln1 = find_module(block, "input_layernorm")
    ln2 = find_module(block, "pre_feedforward_layernorm") or find_module(block, "post_attention_layernorm")
    out = []
    if attn is not None:
        names = next((ns for ns in ATTN_INPUTS if all(find_module(attn, n) is not None for n in ns)), None)
        if ln1 is not None and names:
            out.append((ln1, "norm", [f"self_attn.{n}" for n in names]))
        v, o = find_module(attn, "v_proj"), find_module(attn, "o_proj")
        if v is not None and o is not None and v.weight.shape[0] == o.weight.shape[1]:
            out.append((v, "linear", ["self_attn.o_proj"]))
    moe = next((c for c in (moe_container(p) for p, _ in expert_modules(block)) if c is not None), None)
    mlp = find_module(block, "mlp")
    if moe is not None:
        if ln2 is not None and "weight" in ln2:
            out.append((ln2, "norm", _moe_readers(block, moe, ln2.weight.shape[0])))
    elif mlp is not None:
        names = next((ns for ns in MLP_INPUTS if all(find_module(mlp, n) is not None for n in ns)), None)
        if ln2 is not None and names:
            out.append((ln2, "norm", [f"mlp.{n}" for n in names]))
    # up -> down (SwiGLU is linear in up's output; no fold across c_fc's GELU): the dense MLP, a MoE's shared
    # expert, and each expert of a switch MLP
    for path, m in block.named_modules():
        up, down = find_module(m, "up_proj"), find_module(m, "down_proj")
        if up is None or down is None:
            continue
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
            out.append((up, "linear", [f"{path}.down_proj"]))
        elif is_switch(up) and is_switch(down):
            out.append((up, "experts", [f"{path}.down_proj"]))
    return out


SECOND_LAYERS = ("down_proj", "c_proj", "fc2", "w2", "output_linear")  # an MLP's second layer reads its hidden


def _moe_readers(block: nn.Module, moe: str, width: int) -> list[str]:
    """Every layer inside the MoE container that reads its input (width ``width``): the experts' first layers, a
    shared expert's gate/up, the routers (nn.Linear or a custom gate with a [E, width] weight). A second layer
    whose hidden width happens to equal ``width`` is told apart by name; a wrong guess is undone by ``apply``."""
    return sorted(p for p, m in block.named_modules()
                  if p.startswith(moe + ".") and "weight" in m and m.weight.ndim in (2, 3)
                  and m.weight.shape[-1] == width and not isinstance(m, nn.Embedding)
                  and p.rsplit(".", 1)[-1] not in SECOND_LAYERS)


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


def apply(block: nn.Module, X: dict, recipe, x: mx.array | None = None, mask=None) -> list[float | None]:
    """Search and fold AWQ scales into ``block`` in place (float function unchanged). -> chosen alpha per group
    (an 'experts' group: the mean over its experts), None for a group left unscaled.

    X: the block's captured inputs (``pipeline.capture_linear_inputs``; an expert layer's entry is (rows, expert)).
    x [N, S, D] (the block's input) and mask given, every fold is checked: a group whose fold changes the block's
    output (relative error > 1e-4, float32) is undone -- e.g. a Gemma-2/OLMo-2 block whose norm of that name
    normalises the attention *output*, not the MLP's input. The norms themselves are folded by ``fold_norm``.
    alpha is chosen on the error of ``score`` (``awq_search``'s ``final``), never worse than no scaling."""
    alphas: list[float | None] = []
    y0 = block(x, mask).astype(mx.float32) if x is not None else None
    for prev, kind, paths in groups(block):
        lins = [find_module(block, p) for p in paths]
        before = [dict(m.parameters()) for m in (prev, *lins)]
        if kind == "experts":
            alpha = _fold_experts(prev, lins[0], X[paths[0]], recipe)
        else:
            alpha = _fold_group(block, prev, kind, paths, lins, X, recipe, x, mask)
        if alpha is not None:
            mx.eval(block.parameters())
            if y0 is not None and _rel(block(x, mask).astype(mx.float32), y0) > 1e-4:
                alpha = None
        if alpha is None:
            for m, p in zip((prev, *lins), before):
                m.update(p)
        alphas.append(alpha)
    return alphas


def _search_inputs(block, paths, lins, X) -> tuple[list, list, mx.array]:
    """The quantized readers' weights [out, in] with their inputs, one pair per expert that saw tokens (float
    routers left out), and the rows the activation statistics come from (a dense reader's, else all routed rows)."""
    ws, xs, stat = [], [], None
    routers = router_paths(block)
    for p, m in zip(paths, lins):
        if is_switch(m):
            for e, xe in enumerate(split_by_expert(*X[p], m.weight.shape[0])):
                if xe is not None:
                    ws.append(m.weight[e].astype(mx.float32))
                    xs.append(xe)
            if stat is None:
                stat = X[p][0]
        else:
            if isinstance(m, nn.Linear) and p not in routers:  # a router (or a custom gate module) stays float
                ws.append(m.weight.astype(mx.float32))
                xs.append(X[p])
            if p in X and (stat is None or stat.shape[0] < X[p].shape[0]):
                stat = X[p]
    return ws, xs, stat


def score(recipe, g: int):
    """The rounding AWQ's alpha is chosen on: the least-squares group grid weighted by each input channel's energy
    mean x_j^2 (the diagonal of the layer objective), i.e. what the final quantizer (AWQ's output-aware clip search
    with a least-squares grid, or GPTQ) optimises, without the clip search (2-3x cheaper). AWQ's own proxy, the
    min/max grid, can disagree with the final quantizer on which alpha is best (``experiments/awq_alpha.py``
    measures both on a model; docs/experiments.md)."""
    fit = "lsq" if recipe.fit in ("auto", "lsq") else recipe.fit

    def final(w: mx.array, x: mx.array) -> mx.array:
        return quantize_rtn(w, recipe.bits, g, fit=fit, importance=(x * x).mean(axis=0)).dequantize()
    return final


def _search(ws: list[mx.array], x: mx.array, recipe, xs: list[mx.array] | None = None, objective=None):
    """awq_search at the group size the pipeline will quantize these inputs' width with, alpha chosen on ``score``
    (or on ``objective``, given the scored weights)."""
    g = fit_group(x.shape[-1], recipe.group_size) or recipe.group_size
    return awq_search(ws, x, recipe.bits, g, fit="mlx" if recipe.fit == "mlx" else "minmax", xs=xs,
                      final=score(recipe, g), objective=objective)


def module_objective(block: nn.Module, paths: list[str], lins: list, X: dict, x: mx.array | None, mask):
    """The AWQ reference code's loss for a group read from a norm: the output of the module holding the readers
    (``self_attn`` through its softmax, or the whole MLP through its gate), float readers replaced by candidates,
    against the float module, on the calibration inputs. -> objective([w_hat_i]) -> float, or None where that
    module is not a plain attention/MLP of nn.Linear readers (experts, a router, another container, no block
    input to take the sequence shape from)."""
    parent = paths[0].rsplit(".", 1)[0]
    if x is None or any(p.rsplit(".", 1)[0] != parent for p in paths) or parent not in ("self_attn", "mlp"):
        return None
    if not all(isinstance(m, nn.Linear) for m in lins):
        return None
    mod = find_module(block, parent)
    xin = X[paths[0]].reshape(*x.shape[:-1], -1)  # [N, S, D]

    def run() -> mx.array:
        return (mod(xin, mask=mask) if parent == "self_attn" else mod(xin)).astype(mx.float32)
    try:
        y0 = run()
    except Exception:  # noqa: BLE001 -- an attention/MLP with another call signature keeps the layer loss
        return None
    mx.eval(y0)

    def objective(w_hat: list[mx.array]) -> float:
        old = [m.weight for m in lins]
        for m, w, w0 in zip(lins, w_hat, old):
            m.weight = w.astype(w0.dtype)
        err = float(((run() - y0) ** 2).sum().item())
        for m, w in zip(lins, old):
            m.weight = w
        return err
    return objective


def _fold_group(block, prev, kind, paths, lins, X, recipe, x=None, mask=None) -> float | None:
    """One scale for the readers of prev's output: searched, then folded (prev / s, each reader's columns * s)."""
    ws, xs, stat = _search_inputs(block, paths, lins, X)
    if not ws:
        return None
    objective = None
    if kind == "norm" and recipe.awq_objective == "module" and len(ws) == len(lins):
        objective = module_objective(block, paths, lins, X, x, mask)
    res = _search(ws, stat, recipe, xs=xs, objective=objective)
    s = res.scales
    if kind == "norm":
        try:
            prev.update(fold_norm(prev, s, stat[:64]))
        except ValueError:
            return None
    else:
        prev.weight, _ = apply_awq_scale(prev.weight.astype(mx.float32), [], s)
        if "bias" in prev:
            prev.bias = prev.bias / s
    for m in lins:  # [out, in] or an expert layer's [E, out, in]: every column j times s_j
        m.weight = (m.weight.astype(mx.float32) * s).astype(m.weight.dtype)
    return res.ratio


def _fold_experts(up: nn.Module, down: nn.Module, routed: tuple, recipe) -> float | None:
    """Each expert's up -> down pair (SwitchLinear [E, inter, D] -> [E, D, inter]) with its own scale [inter],
    searched on the down projection's rows routed to that expert; an expert no token reached keeps s = 1."""
    n_experts, inter = down.weight.shape[0], down.weight.shape[-1]
    scales, ratios = [], []
    for e, xe in enumerate(split_by_expert(*routed, n_experts)):
        if xe is None:
            scales.append(mx.ones((inter,), mx.float32))
            continue
        res = _search([down.weight[e].astype(mx.float32)], xe, recipe)
        scales.append(res.scales.astype(mx.float32))
        ratios.append(res.ratio)
    if not ratios:
        return None
    s = mx.stack(scales)  # [E, inter]
    up.weight = (up.weight.astype(mx.float32) / s[:, :, None]).astype(up.weight.dtype)
    if "bias" in up:
        up.bias = (up.bias.astype(mx.float32) / s).astype(up.bias.dtype)
    down.weight = (down.weight.astype(mx.float32) * s[:, None, :]).astype(down.weight.dtype)
    return sum(ratios) / len(ratios)
