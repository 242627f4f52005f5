"""Streaming block-by-block compression (the sequential convention of GPTQ, Frantar et al. 2022, sec. 3).

Calibration windows enter block 0; for each transformer block in turn we record the inputs of its linear layers,
compress those layers (RTN, GPTQ, AWQ, pruning, or a per-layer mix), and push the calibration activations through
the *compressed* block to get the next block's inputs. A finished block's float weights are dropped at once, so
peak memory is about one block in float32 plus the calibration activations, whatever the depth of the model.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import models
from .experts import expert_modules, routed_rows, router_paths, split_by_expert, stack
from .quant.formats import FLOAT_MODES, QuantizedWeight, fit_group
from .quant.mixed import bits_group
from .recipe import PRUNE_METHODS, Recipe


class _StopForward(Exception):
    pass


@dataclass
class LayerRecord:
    name: str
    bits: int | None
    group_size: int | None
    sparsity: float = 0.0
    error: float | None = None      # relative Hessian-weighted output error trace(dW H dW^T) / trace(W H W^T)
    seconds: float = 0.0


@dataclass
class PipelineResult:
    quantized: dict = field(default_factory=dict)   # module path -> QuantizedWeight
    floats: dict = field(default_factory=dict)      # parameter path -> float array (kept weights, norms, pruned)
    layers: list = field(default_factory=list)      # LayerRecord
    peak_memory_bytes: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)       # allocation details etc.

    def layer_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.layers]


# ------------------------------------------------------------------------------------------------ hooks

def block_inputs(model: nn.Module, tokens: mx.array) -> tuple[mx.array, object]:
    """tokens [N, S] -> (hidden [N, S, D] entering block 0, attention mask) exactly as the model prepares them."""
    layer0 = models.blocks(model)[0]
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


def linear_modules(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The block's nn.Linear layers to compress, in call order; a MoE router stays float (``experts.py``)."""
    routers = router_paths(block)
    return [(p, m) for p, m in block.named_modules() if isinstance(m, nn.Linear) and p not in routers][::-1]


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
    for path, m in mods:
        cls = type(m)

        def call(self, inp, _cls=cls, _path=path):
            box[0][_path] = inp.reshape(-1, inp.shape[-1])
            if stages is not None:
                k = next((i for i, a in enumerate(inputs) if a is inp), None)
                if k is None:
                    inputs.append(inp)
                    stages.append([])
                    k = len(inputs) - 1
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
    return y, seen


def hessian(x: mx.array) -> mx.array:
    """x [n, in] -> H = x^T x / n [in, in] (float32)."""
    x = x.astype(mx.float32)
    return (x.T @ x) / x.shape[0]


def rel_error(w: mx.array, w_hat: mx.array, H: mx.array) -> float:
    d = (w_hat - w).astype(mx.float32)
    num = ((d @ H) * d).sum()
    den = ((w.astype(mx.float32) @ H) * w).sum()
    return float((num / mx.maximum(den, 1e-12)).item())


def _get(block: nn.Module, path: str) -> nn.Module:
    m = block
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else getattr(m, part)
    return m


# ------------------------------------------------------------------------------------------------ per-layer methods

def quantize_weight(w: mx.array, X: mx.array | None, H: mx.array | None, recipe: Recipe, bits: int,
                    method: str, keep: mx.array | None = None, group_size: int | None = None) -> QuantizedWeight:
    """One linear: w [out, in], its calibration input X [n, in] / Hessian H [in, in] -> QuantizedWeight.

    keep: the [out, in] mask of a pruned weight; its zeros are then stored exactly (grids that hold 0 exactly).
    group_size: this layer's (mixed precision), default the recipe's."""
    from .quant.rtn import quantize_rtn

    g = recipe.group_size if group_size is None else group_size
    if method == "gptq":
        from .quant.gptq import gptq_quantize
        return gptq_quantize(w, H, bits, g, act_order=recipe.act_order, damp=recipe.damp,
                             clip_search=recipe.clip_search, keep=keep, fit=grid_fit(recipe, bits, compensated=True),
                             iters=recipe.gptq_iters)
    if method == "awq":
        from .quant.awq import awq_clip
        return awq_clip(w, X, bits, g, fit=grid_fit(recipe, bits, compensated=True))
    imp = None
    if recipe.clip_search and H is not None:
        imp = mx.diag(H)
    return quantize_rtn(w, bits, g, clip_search=recipe.clip_search, importance=imp, grid_offset=recipe.grid_offset,
                        rounding=recipe.rounding, seed=recipe.seed, exact_zero=keep is not None,
                        fit=grid_fit(recipe, bits, compensated=False))


def grid_fit(recipe: Recipe, bits: int, compensated: bool) -> str:
    """The group-grid rule (``rtn.FITS``) for one layer. ``recipe.fit="auto"``: "zlsq" (0 kept on the grid) for
    plain data-free rounding at 3 bits or fewer, "lsq" otherwise. Measured on SmolLM2 (2048 wiki tokens, base 16.57):
    RTN 3-bit g64 59.4 with zlsq vs 110.8 with lsq (mlx-lm's RTN: 91.9); RTN 4-bit 22.40 vs 22.01 (KL 0.41 vs 0.32);
    GPTQ 3-bit (linears) 26.2 vs 23.2. Rounding that nothing compensates moves a weight by up to half a step; a free
    grid sends the many small weights to a common +-offset, which the attention-sink token's value projection
    turned out to feel most (its v_proj output error: 1.48x the mlx grid's with lsq, 0.95x with zlsq, averaged over
    the blocks: ``python benchmarks/sink_error.py --bits 3``). GPTQ
    compensates each rounding with the calibration inputs and does better on the free grid; AWQ (grids chosen on the
    output error) keeps lsq too (zlsq not measured there)."""
    if recipe.fit != "auto":
        return recipe.fit
    return "zlsq" if bits <= 3 and not compensated else "lsq"


def prune_weight(w: mx.array, X: mx.array | None, H: mx.array | None, method: str, sparsity: float,
                 nm: str | None, recover: str | None, damp: float) -> tuple[mx.array, mx.array]:
    """-> (pruned weight, keep mask)."""
    if method == "magnitude":
        from .prune.magnitude import magnitude_prune
        r = magnitude_prune(w, sparsity, nm)
    elif method == "wanda":
        from .prune.wanda import wanda_prune
        r = wanda_prune(w, mx.sqrt((X.astype(mx.float32) ** 2).sum(axis=0)), sparsity, nm)
    elif method == "sparsegpt":
        from .prune.sparsegpt import sparsegpt_prune
        r = sparsegpt_prune(w, H, sparsity, nm, damp=damp)
    else:
        raise ValueError(f"unknown pruner {method!r}")
    weight = r.weight
    if recover == "admm":
        from .prune.admm import admm_recover
        weight = admm_recover(w, r.mask, H, damp=damp)
    return weight, r.mask


def _layer_format(full: str, width: int, layer_bits: dict | None, recipe: Recipe, res: PipelineResult,
                  default: int | None = None) -> tuple[int | None, int]:
    """A layer's (bits or None = float, group size): its ``layer_bits`` entry or ``default`` (the recipe's bits),
    with the group size fitted to its input width (``formats.fit_group``); a change is recorded in
    ``res.extra["group_fallback"]`` (layer -> group size, or None where the layer stays float)."""
    bits, g = bits_group((layer_bits or {}).get(full, recipe.bits if default is None else default),
                         recipe.group_size)
    if bits is None:
        return None, g
    fit = fit_group(width, g) if recipe.mode == "affine" else (g if width % FLOAT_MODES[recipe.mode][1] == 0
                                                               else None)
    if fit != g:
        res.extra.setdefault("group_fallback", {})[full] = fit
    return (bits, fit) if fit is not None else (None, g)


def _compress_weight(w: mx.array, X: mx.array | None, H: mx.array | None, X_fp: mx.array | None, recipe: Recipe,
                     quant_method: str, bits: int | None, g: int, sparsity: float):
    """One weight w [out, in] (float32) with its calibration input X [n, in] / Hessian H (None: data-free) ->
    (QuantizedWeight (compact) or float-mode tuple, or None when kept float; w_hat [out, in]; measured sparsity).
    X_fp: the float model's input (QEP)."""
    pruned = 0.0
    w_new, keep = w, None
    if recipe.method in PRUNE_METHODS:
        method = recipe.method if X is not None else "magnitude"  # an expert no calibration token reached
        w_new, keep = prune_weight(w, X, H, method, sparsity, recipe.nm, recipe.recover if H is not None else None,
                                   recipe.damp)
        pruned = 1.0 - float(keep.astype(mx.float32).mean().item())
    if bits is None:
        return None, w_new, pruned
    if recipe.mode != "affine":
        q, w_hat = float_quantize(w_new, recipe.mode)
        return q, w_hat, pruned
    if X_fp is not None:
        w_new = _qep_target(w_new, X_fp, X, recipe)
    method = quant_method if X is not None else "rtn"
    qw = quantize_weight(w_new, X, H, recipe, bits, method, keep, g)
    w_hat = qw.dequantize()
    mx.eval(w_hat)
    return qw.compact(), w_hat, pruned  # hold packed codes only: bits/8 bytes per weight


def _compress_experts(sw: nn.Module, full: str, routed: tuple, recipe: Recipe, quant_method: str,
                      bits: int | None, g: int, sparsity: float, res: PipelineResult) -> LayerRecord:
    """A MoE SwitchLinear (weight [E, out, in]): each expert compressed on the rows routed to it (experts.py);
    updates sw.weight (for the later blocks) and res in place. The record's error is the experts' mean relative
    Hessian-weighted error over those that saw calibration tokens."""
    ts = time.perf_counter()
    w = sw.weight.astype(mx.float32)
    xs = split_by_expert(*routed, w.shape[0])
    qs, w_hats, errs, pruned = [], [], [], []
    for e, x in enumerate(xs):
        H = hessian(x) if x is not None else None
        q, w_hat, p = _compress_weight(w[e], x, H, None, recipe, quant_method, bits, g, sparsity)
        qs.append(q)
        w_hats.append(w_hat)
        pruned.append(p)
        if H is not None:
            errs.append(rel_error(w[e], w_hat, H))
    w_hat = mx.stack(w_hats)
    if bits is None:
        res.floats[f"{full}.weight"] = w_hat
    elif recipe.mode == "affine":
        res.quantized[full] = stack(qs)
    else:  # float modes: (wq, scales, biases|None, bits, group) per expert -> [E, out, ...] tensors
        wq, sc, bi = (None if qs[0][j] is None else mx.stack([q[j] for q in qs]) for j in range(3))
        res.quantized[full] = (wq, sc, bi, *qs[0][3:])
    sw.weight = w_hat
    mx.eval(sw.weight)
    return LayerRecord(full, bits, g if bits is not None else None, float(np.mean(pruned)),
                       float(np.mean(errs)) if errs else None, time.perf_counter() - ts)


# ------------------------------------------------------------------------------------------------ the pipeline

def run(model: nn.Module, calib: mx.array | None, recipe: Recipe, *, layer_bits: dict[str, int | None] | None = None,
        layer_sparsity: list[float] | None = None, head_x_first: mx.array | None = None,
        on_progress=None) -> PipelineResult:
    """Compress ``model`` block by block with ``recipe``.

    calib: [N, S] calibration token windows (None for data-free RTN / magnitude).
    layer_bits: optional per-linear choice (full paths, e.g. from mixed precision): bits, (bits, group size), or
    None = keep float.
    layer_sparsity: optional per-block sparsity (OWL / zero-order allocation).
    head_x_first: the float model's head inputs [n, D] (``forward_head_inputs``). Given, a tied embedding table is
    GPTQ'd on them *before* the blocks and the compressed stream starts from the quantized table, so every block's
    GPTQ (and QEP) sees, and can compensate, the input embedding's rounding (``recipe.embed_first``).
    The model is consumed: its float weights are released as blocks finish.
    """
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    res = PipelineResult()
    models.dequantize_model(model)  # an already quantized input (e.g. re-compressing a 4-bit model) works on floats
    blocks = models.blocks(model)
    # the quantizer that follows: mixed and SparseGPT use GPTQ (Hessians at hand), the other pruners RTN
    quant_method = {"mixed": "gptq", "sparsegpt": "gptq", "magnitude": "rtn", "wanda": "rtn"}.get(recipe.method,
                                                                                                 recipe.method)
    pruning = recipe.method in PRUNE_METHODS
    needs_data = (recipe.method not in ("rtn", "magnitude") or recipe.tune_steps > 0 or recipe.recover is not None
                  or (recipe.clip_search and calib is not None))
    x = mask = x_fp = None
    qep = recipe.qep_alpha > 0 and quant_method == "gptq" and not pruning
    if needs_data:
        if calib is None:
            raise ValueError(f"method {recipe.method} needs calibration data")
        x, mask = block_inputs(model, calib)
        mx.eval(x)
        x_fp = x if qep else None  # QEP: the float model's own activations flow beside the compressed ones
        if head_x_first is not None:
            first = _tied_table_first(model, recipe, layer_bits, head_x_first, res)
            if first is not None:
                path, qw = first
                res.quantized[path] = qw
                table = _get(model, path)
                w_float = table.weight
                table.weight = qw.dequantize()
                x, _ = block_inputs(model, calib)  # the compressed stream starts from the quantized table
                mx.eval(x)
                table.weight = w_float
    prefix = _block_prefix(model)
    for i, block in enumerate(blocks):
        mx.eval(block.parameters())
        X, X_fp, stages = {}, {}, []
        y_float = None  # the still-float block's output on x
        if x is not None:
            y_float, X = capture_linear_inputs(block, x, mask, stages)
        if recipe.method == "awq" or recipe.awq_scales:  # AWQ alone, or AWQ's scales then GPTQ (AWQ sec. 5)
            from .quant import awq_block
            alphas = awq_block.apply(block, X, recipe, x, mask)
            for key, n in (("awq_unscaled_groups", sum(a is None for a in alphas)),
                           ("awq_alpha_zero_groups", sum(a == 0.0 for a in alphas)),
                           ("awq_blocks_without_groups", int(not alphas))):
                res.extra[key] = res.extra.get(key, 0) + n
            X = {}
            y_float, X = capture_linear_inputs(block, x, mask)  # inputs after the scale fold
        if x_fp is not None:  # the block is still float here (a scale fold leaves its function unchanged)
            x_fp, X_fp = capture_linear_inputs(block, x_fp, mask)
        target = y_float if recipe.tune_steps else None  # what the block-wise tuning should reproduce
        y_float = None
        mods = dict(linear_modules(block))
        staged = [p for st in stages for p in st]
        recapture = {st[0] for st in stages[1:]} if recipe.true_sequential else set()  # first linear of a later stage
        for path in staged + [p for p in mods if p not in staged]:
            lin = mods[path]
            if path in recapture:
                X = {}  # drop the stale inputs first: a block's captures are the pipeline's largest arrays
                _, X = capture_linear_inputs(block, x, mask)  # the inputs after the stages already compressed
            full = f"{prefix}.{i}.{path}"
            ts = time.perf_counter()
            w = lin.weight.astype(mx.float32)
            Xl = X.get(path)
            H = hessian(Xl) if Xl is not None else None
            bits, g = _layer_format(full, w.shape[-1], layer_bits, recipe, res)
            s = layer_sparsity[i] if layer_sparsity is not None else recipe.sparsity
            q, w_hat, sparsity = _compress_weight(w, Xl, H, X_fp.get(path), recipe, quant_method, bits, g, s)
            if q is not None:
                res.quantized[full] = q
            else:
                res.floats[f"{full}.weight"] = w_hat
            lin.weight = w_hat  # later blocks see the compressed block (sequential calibration)
            mx.eval(lin.weight)
            err = rel_error(w, w_hat, H) if H is not None else None
            res.layers.append(LayerRecord(full, bits, g if bits is not None else None, sparsity, err,
                                          time.perf_counter() - ts))
        for path, sw in expert_modules(block):
            full = f"{prefix}.{i}.{path}"
            bits, g = _layer_format(full, sw.weight.shape[-1], layer_bits, recipe, res)
            s = layer_sparsity[i] if layer_sparsity is not None else recipe.sparsity
            res.layers.append(_compress_experts(sw, full, X.get(path, (None, None)), recipe, quant_method, bits, g,
                                                s, res))
        X = X_fp = {}
        if target is not None:
            _tune_block(block, i, prefix, x, mask, target, recipe, res, on_progress)
            target = None
        if x is not None:
            x = block(x, mask)
            mx.eval(x)
        for k, v in tree_flatten(block.parameters()):
            full = f"{prefix}.{i}.{k}"
            # a quantized layer's weight is in res.quantized; everything else (its bias too) is saved as is
            if not (k.endswith(".weight") and full[: -len(".weight")] in res.quantized) and full not in res.floats:
                res.floats[full] = v
        block.update(tree_map(lambda a: mx.zeros((0,), a.dtype), block.parameters()))  # release the block
        res.peak_memory_bytes = max(res.peak_memory_bytes, mx.get_peak_memory())
        if on_progress:
            on_progress("compress", i + 1, len(blocks))
    head_x = head_x_fp = None
    if x is not None and quant_method == "gptq":
        head_x = head_inputs(model, x)
        if x_fp is not None:
            head_x_fp = head_inputs(model, x_fp)
    del x, x_fp
    _finish_outside_blocks(model, recipe, res, layer_bits, head_x, head_x_fp)
    res.peak_memory_bytes = max(res.peak_memory_bytes, mx.get_peak_memory())
    res.seconds = time.perf_counter() - t0
    return res


def _tune_block(block, i, prefix, x, mask, target, recipe, res, on_progress) -> None:
    """Block-wise tuning of block i's quantized scales/biases (quant/blockwise.py); updates res in place."""
    from .quant.blockwise import tune_block

    qws = {p: res.quantized[f"{prefix}.{i}.{p}"] for p, _ in linear_modules(block)
           if isinstance(res.quantized.get(f"{prefix}.{i}.{p}"), QuantizedWeight)}
    if not qws:
        return
    new, tr = tune_block(block, qws, x, mask, target, steps=recipe.tune_steps, lr=recipe.tune_lr,
                         seed=recipe.seed + i, on_progress=on_progress)
    for p, qw in new.items():
        res.quantized[f"{prefix}.{i}.{p}"] = qw.compact()
    res.extra.setdefault("block_tune", []).append(
        {"block": i, "loss_before": tr.loss_before, "loss_after": tr.loss_after, "kept": tr.kept})


def forward_head_inputs(model: nn.Module, calib: mx.array, *, release: bool = True) -> mx.array | None:
    """calib [N, S] -> ``model``'s head inputs [N*S, D] (final norm outputs), run block by block. ``release``: free
    each block as it finishes (bounded memory; the model is then spent -- open a fresh lazy one to compress)."""
    x, mask = block_inputs(model, calib)
    for block in models.blocks(model):
        mx.eval(block.parameters())
        x = block(x, mask)
        mx.eval(x)
        if release:
            block.update(tree_map(lambda a: mx.zeros((0,), a.dtype), block.parameters()))
    return head_inputs(model, x)


def gptq_head(w: mx.array, H: mx.array, bits: int, group_size: int, recipe: Recipe) -> QuantizedWeight:
    """The output head's GPTQ (an lm_head, or a tied table) on its inputs' H, with the head's damping."""
    from .quant.gptq import gptq_quantize

    return gptq_quantize(w, H, bits, group_size, act_order=recipe.act_order, damp=recipe.head_damp,
                         fit=grid_fit(recipe, bits, compensated=True), iters=recipe.gptq_iters)


def _tied_table_first(model: nn.Module, recipe: Recipe, layer_bits: dict | None, head_x: mx.array,
                      res: PipelineResult) -> tuple[str, QuantizedWeight] | None:
    """GPTQ of a tied embedding table on the float model's head inputs -> (module path, compact weight), or None
    when the model has no quantized tied table (an untied lm_head is GPTQ'd after the blocks as usual)."""
    for k, v in outside_quantizable(model, recipe):
        mod = k.rsplit(".", 1)[0]
        if isinstance(_get(model, mod), nn.Embedding) and _head_module(model, mod):
            bits, g = _layer_format(mod, v.shape[-1], layer_bits, recipe, res, recipe.embed_bits or recipe.bits)
            if bits is None:  # mixed precision keeps the table float
                return None
            return mod, gptq_head(v.astype(mx.float32), hessian(head_x), bits, g, recipe).compact()
    return None


def _qep_target(w: mx.array, x_fp: mx.array, x_q: mx.array, recipe: Recipe) -> mx.array:
    """w [out, in] -> the QEP-corrected weight the quantizer should aim at (quant/qep.py), from the same calibration
    tokens' inputs in the float model x_fp and in the compressed one x_q [n, in]."""
    from .quant.qep import propagation_stats, qep_correct

    H, D = propagation_stats(x_fp, x_q)
    w_star = qep_correct(w, H, D, alpha=recipe.qep_alpha, damp=recipe.qep_damp)
    mx.eval(w_star)
    return w_star


def float_quantize(w: mx.array, mode: str) -> tuple[tuple, mx.array]:
    """MLX float modes (mxfp4/nvfp4/mxfp8): w [out, in] -> ((wq, scales, biases|None, bits, group), w_hat)."""
    from .quant.formats import FLOAT_MODES

    bits, g = FLOAT_MODES[mode]
    out = mx.quantize(w, group_size=g, bits=bits, mode=mode)
    wq, sc, bi = out if len(out) == 3 else (*out, None)
    w_hat = mx.dequantize(wq, sc, bi, group_size=g, bits=bits, mode=mode).astype(mx.float32)
    mx.eval(wq, sc, w_hat, *([] if bi is None else [bi]))
    return (wq, sc, bi, bits, g), w_hat


def _block_prefix(model: nn.Module) -> str:
    layers = models.blocks(model)
    for path, m in model.named_modules():
        if m is layers[0]:
            return path.rsplit(".", 1)[0]
    return "model.layers"


def outside_quantizable(model: nn.Module, recipe: Recipe) -> list[tuple[str, mx.array]]:
    """(weight path, tensor) of the layers outside the blocks that the recipe quantizes: embeddings (unless
    ``quantize_embeddings`` is off) and an untied lm_head, when their width fits the group size."""
    if recipe.bits is None:
        return []
    prefix = _block_prefix(model)
    out = []
    for k, v in tree_flatten(model.parameters()):
        if k.startswith(prefix + ".") or v.size == 0 or not k.endswith(".weight"):
            continue
        m = _get(model, k.rsplit(".", 1)[0])
        if (isinstance(m, nn.Linear) or (recipe.quantize_embeddings and isinstance(m, nn.Embedding))) \
                and fit_group(v.shape[-1], recipe.group_size) is not None:
            out.append((k, v))
    return out


def head_inputs(model: nn.Module, x: mx.array) -> mx.array | None:
    """x [N, S, D] leaving the last (compressed) block -> the output head's input [N*S, D]: x through the final norm
    (the ``norm`` beside the blocks, as llama/qwen-style models name it); None where there is no such norm."""
    prefix = _block_prefix(model)
    parent = _get(model, prefix.rsplit(".", 1)[0]) if "." in prefix else model
    norm = getattr(parent, "norm", None)
    if norm is None:
        return None
    h = norm(x).reshape(-1, x.shape[-1])
    mx.eval(h)
    return h


def _head_module(model: nn.Module, mod: str) -> bool:
    """Is ``mod`` the output head's weight: an untied lm_head, or the embedding that the head reads when tied?"""
    m = _get(model, mod)
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Embedding) and not hasattr(model, "lm_head")


def _finish_outside_blocks(model: nn.Module, recipe: Recipe, res: PipelineResult,
                           layer_bits: dict[str, int | None] | None = None, head_x: mx.array | None = None,
                           head_x_fp: mx.array | None = None) -> None:
    """Embeddings and lm_head: RTN at the recipe's bits (as mlx_lm.convert does) or at their entry in
    ``layer_bits`` (mixed precision); everything else kept float.

    head_x [n, D]: the head's calibration inputs (``head_inputs``). Given (and ``recipe.gptq_head``), the head's
    weight -- an untied lm_head or a tied embedding -- is quantized by GPTQ on H = head_x^T head_x / n, so its
    rounding is compensated where the logits see it; its record then carries that H-weighted error either way. A
    tied table is also read row by row as the input embedding, an error GPTQ's objective does not see;
    ``recipe.head_damp`` (a larger damping, i.e. a pull toward plain rounding) weighs that in.
    head_x_fp [n, D]: the same tokens' head inputs in the float model; given, an untied GPTQ head aims at QEP's
    corrected weight (a tied table is not corrected: the input embedding reads it too)."""
    from .quant.rtn import quantize_rtn

    prefix = _block_prefix(model)
    quantized = dict(outside_quantizable(model, recipe))
    for k, v in tree_flatten(model.parameters()):
        if k.startswith(prefix + ".") or v.size == 0:
            continue
        if k not in quantized:
            res.floats[k] = v
            continue
        mod = k.rsplit(".", 1)[0]
        bits, g = _layer_format(mod, v.shape[-1], layer_bits, recipe, res, recipe.embed_bits or recipe.bits)
        if bits is None:  # mixed precision kept it float
            res.floats[k] = v
            res.layers.append(LayerRecord(mod, None, None, 0.0, None, 0.0))
            continue
        H = hessian(head_x) if head_x is not None and _head_module(model, mod) else None
        if mod in res.quantized:  # a tied table quantized before the blocks (``head_x_first``)
            err = rel_error(v.astype(mx.float32), res.quantized[mod].dequantize(), H) if H is not None else None
            res.layers.append(LayerRecord(mod, bits, g, 0.0, err, 0.0))
            continue
        err = None
        if recipe.mode == "affine":
            w = v.astype(mx.float32)
            if H is not None and recipe.gptq_head:
                target = w
                if head_x_fp is not None and isinstance(_get(model, mod), nn.Linear):
                    target = _qep_target(w, head_x_fp, head_x, recipe)
                qw = gptq_head(target, H, bits, g, recipe)
            else:
                qw = quantize_rtn(w, bits, g, fit=grid_fit(recipe, bits, compensated=False))
            if H is not None:
                err = rel_error(w, qw.dequantize(), H)
            res.quantized[mod] = qw.compact()
        else:
            res.quantized[mod], _ = float_quantize(v.astype(mx.float32), recipe.mode)
            bits, g = recipe.bits, recipe.group_size
        res.layers.append(LayerRecord(mod, bits, g, 0.0, err, 0.0))


def scan(model: nn.Module, calib: mx.array, fn, *, release: bool = True, residual: bool = False,
         experts: bool = False, on_progress=None) -> list:
    """Run the *unmodified* model block by block over calib [N, S]; call fn(block_index, path, w, X) for every
    linear (w [out, in] float32, X [n, in] its calibration input) and collect the results. Used for sensitivities
    (mixed precision) and outlier ratios (OWL). Blocks are released as they finish when ``release``.
    experts: also call fn for MoE expert layers, with w [E, out, in] and X = (rows [n, in], expert index [n]).
    residual: also pass ``h_ms``, the typical (median over tokens) mean square of the residual stream entering the
    block, as a 5th argument."""
    out = []
    x, mask = block_inputs(model, calib)
    prefix = _block_prefix(model)
    blocks = models.blocks(model)
    for i, block in enumerate(blocks):
        mx.eval(block.parameters())
        y, X = capture_linear_inputs(block, x, mask)
        # median over tokens of the per-token mean square: robust to the few "massive activation" tokens
        extra = (float(mx.median((x.astype(mx.float32) ** 2).mean(axis=-1)).item()),) if residual else ()
        for path, lin in linear_modules(block) + (expert_modules(block) if experts else []):
            out.append(fn(i, f"{prefix}.{i}.{path}", lin.weight.astype(mx.float32), X[path], *extra))
        x = y
        if release:
            block.update(tree_map(lambda a: mx.zeros((0,), a.dtype), block.parameters()))
        if on_progress:
            on_progress("scan", i + 1, len(blocks))
    return out
