"""Streaming block-by-block compression (the sequential convention of GPTQ, Frantar et al. 2022, sec. 3).

Calibration windows enter block 0; for each transformer block in turn we record the inputs of its linear layers,
compress those layers (RTN, GPTQ, AWQ, pruning, or a per-layer mix), and push the calibration activations through
the *compressed* block to get the next block's inputs. A finished block's float weights are dropped at once, so
peak memory is about one block in float32 plus the calibration activations, whatever the depth of the model.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..distributed import World
from ..model.experts import expert_modules
from ..model.open import dequantize_model
from ..model.structure import block_prefix, blocks, find_module, get_module, linear_modules, release_block
from ..options import PRUNE_METHODS
from ..model.tables import reread_tables, table_width
from ..quant import awq_fold
from ..quant.rotate import make_rotation, rotate_block, rotate_outside
from ..recipe import Recipe
from ..tune.block import tune_block
from .capture import block_inputs, capture_linear_inputs, hessian, rel_error
from .attention import QKV, choose_updates
from .head import finish_outside_blocks, head_inputs, tied_table_first
from .layer import LayerRecord, compress_experts, compress_weight, layer_format, prune_weight


@dataclass
class PipelineResult:
    quantized: dict = field(default_factory=dict)   # module path -> QuantizedWeight
    floats: dict = field(default_factory=dict)      # parameter path -> float array (kept weights, norms, pruned)
    layers: list = field(default_factory=list)      # LayerRecord
    peak_memory_bytes: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)       # allocation details etc.
    fallback: dict = field(default_factory=dict)    # layer -> fitted group size (None: kept float), see layer_format
    block_seconds: list = field(default_factory=list)  # wall time of each block
    n_quant_params: int = 0                         # weights stored quantized, drained ones included

    def layer_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.layers]


def run(model: nn.Module, calib: mx.array | None, recipe: Recipe, *, layer_bits: dict[str, int | None] | None = None,
        layer_sparsity: list[float] | None = None, head_x_first: mx.array | None = None, sink=None,
        prefetch=None, reload=None, world: World | None = None, on_progress=None) -> PipelineResult:
    """Compress ``model`` block by block with ``recipe``.

    calib: [N, S] calibration token windows (None for data-free RTN / magnitude).
    layer_bits: optional per-linear choice (full paths, e.g. from mixed precision): bits, (bits, group size), or
    None = keep float.
    layer_sparsity: optional per-block sparsity (OWL / zero-order allocation).
    head_x_first: the float model's head inputs [n, D] (``forward_head_inputs``). Given, a tied embedding table is
    GPTQ'd on them *before* the blocks and the compressed stream starts from the quantized table, so every block's
    GPTQ (and QEP) sees, and can compensate, the input embedding's rounding (``recipe.embed_first``).
    sink(floats, quantized): given (e.g. ``model.save.FolderWriter.add``), each finished block's tensors are handed
    to it and dropped from the result (the embeddings and head at the end), so finished blocks do not stay in
    memory; without it they accumulate in ``res.floats`` / ``res.quantized``.
    prefetch(prefix): given (``model.files.prefetcher``), called with the next block's parameter prefix when a
    block starts, so that its weights are read from disk while this one is worked on.
    reload(name): given (``model.files.reloader``), the tables outside the blocks that the calibration inputs read
    are swapped for fresh lazy reads once those inputs are made (``model.tables.reread_tables``): they are not held
    through the block loop.
    world: the ranks of a distributed job (``distributed.World``): each pushes its share of the windows through
    the blocks, the linears' inputs are gathered in rank order (every method sees a single process's rows), each
    layer is compressed by one rank and its result exchanged, so every rank ends with the same result.
    The model is consumed: its float weights are released as blocks finish.
    """
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    res = PipelineResult()
    world = world or World()
    n_windows = 0 if calib is None else calib.shape[0]
    if world.distributed and calib is not None:
        a, b = world.share(n_windows)
        calib = calib[a:b]  # this rank's windows; every gathered array comes back in rank order
    gather = _gatherer(world, n_windows)
    sent0 = world.sent
    dequantize_model(model)  # an already quantized input (e.g. re-compressing a 4-bit model) works on floats
    bs = blocks(model)
    rot = None
    if recipe.rotate != "none":  # the tables now; each block as it is read (quant.rotate)
        rot = make_rotation(table_width(getattr(model, "model", model).embed_tokens), recipe.seed)
        res.extra["rotation"] = {"kind": recipe.rotate, "seed": recipe.seed, "dim": rot.dim, **rotate_outside(model, rot),
                                 "blocks": 0, "head_rotations": 0}
    # the quantizer that follows: mixed and SparseGPT use GPTQ (Hessians at hand), the other pruners RTN
    quant_method = {"mixed": "gptq", "sparsegpt": "gptq", "d2prune": "gptq", "magnitude": "rtn",
                    "wanda": "rtn"}.get(recipe.method,
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
            first = tied_table_first(model, recipe, layer_bits, head_x_first, res.fallback)
            if first is not None:
                path, qw = first
                res.quantized[path] = qw
                table = get_module(model, path)
                w_float = table.weight
                table.weight = qw.dequantize()
                x, _ = block_inputs(model, calib)  # the compressed stream starts from the quantized table
                mx.eval(x)
                table.weight = w_float
                del w_float
        if reload is not None and rot is None:  # a rotated table was changed in memory: it stays
            res.extra["tables_released_bytes"] = reread_tables(model, reload)
    prefix = block_prefix(model)
    for i, block in enumerate(bs):
        tb = time.perf_counter()
        if prefetch is not None:
            prefetch(f"{prefix}.{i + 1}.")
        mx.eval(block.parameters())
        if rot is not None:
            done = rotate_block(block, rot, seed=recipe.seed + i)
            res.extra["rotation"]["blocks"] += 1
            res.extra["rotation"]["head_rotations"] += int(done["heads"])
        X, X_fp, stages = {}, {}, []
        y_float = None  # the still-float block's output on x
        if x is not None:
            y_float, X = capture_linear_inputs(block, x, mask, stages)  # this rank's rows (gathered per group)
        if recipe.method == "awq" or recipe.awq_scales:  # AWQ alone, or AWQ's scales then GPTQ (AWQ sec. 5)
            alphas = awq_fold.apply(block, gather(X), recipe, gather(x), mask)  # the search on every window
            for key, n in (("awq_unscaled_groups", sum(a is None for a in alphas)),
                           ("awq_alpha_zero_groups", sum(a == 0.0 for a in alphas)),
                           ("awq_blocks_without_groups", int(not alphas))):
                res.extra[key] = res.extra.get(key, 0) + n
            X = {}
            y_float, X = capture_linear_inputs(block, x, mask)  # inputs after the scale fold
        if x_fp is not None:  # the block is still float here (a scale fold leaves its function unchanged)
            x_fp, X_fp = capture_linear_inputs(block, x_fp, mask)
        block_recipe = recipe
        if recipe.method == "d2prune" and recipe.d2_targets == "auto" and x is not None:
            block_recipe = _d2_choice(block, X, x, mask, recipe, i,
                                      layer_sparsity[i] if layer_sparsity is not None else recipe.sparsity, res)
        target = y_float if recipe.tune_steps else None  # what the block-wise tuning should reproduce
        y_float = None
        mods = dict(linear_modules(block))
        staged = [p for st in stages for p in st]
        recapture = {st[0] for st in stages[1:]} if recipe.true_sequential else set()  # first linear of a later stage
        order = staged + [p for p in mods if p not in staged]
        s = layer_sparsity[i] if layer_sparsity is not None else recipe.sparsity
        for group in _groups(order, recapture):
            if group[0] in recapture:
                X = {}  # drop the stale inputs first: a block's captures are the pipeline's largest arrays
                _, X = capture_linear_inputs(block, x, mask)  # the inputs after the stages already compressed
            Xg = gather({p: X[p] for p in group if p in X})  # every window's rows of this group's inputs
            Xg_fp = gather({p: X_fp[p] for p in group if p in X_fp})
            owners = world.assign([mods[p].weight.size for p in group])
            done = {}
            for j, path in enumerate(group):
                lin = mods[path]
                full = f"{prefix}.{i}.{path}"
                # every rank records the layer's format (its group-size fallback goes into the evidence)
                bits, g = layer_format(full, lin.weight.shape[-1], layer_bits, recipe, res.fallback)
                if owners[j] != world.rank:
                    continue
                ts = time.perf_counter()
                w = lin.weight.astype(mx.float32)
                Xl = Xg.get(path)
                H = hessian(Xl) if Xl is not None else None
                q, w_hat, sparsity = compress_weight(w, Xl, H, Xg_fp.get(path), block_recipe, quant_method, bits, g,
                                                     s, full)
                if q is None or x is not None:  # data-free: no later step reads the dequantized weight
                    lin.weight = w_hat  # later blocks see the compressed block (sequential calibration)
                    mx.eval(lin.weight)
                err = rel_error(w, w_hat, H) if H is not None else None
                done[path] = (q, None if q is not None else w_hat,
                              LayerRecord(full, bits, g if bits is not None else None, sparsity, err,
                                          time.perf_counter() - ts))
                w = w_hat = None
            Xg = Xg_fp = None
            if world.distributed:
                done = _exchange(world, done)
            for j, path in enumerate(group):
                q, w_float, record = done[path]
                if q is not None:
                    res.quantized[record.name] = q
                else:
                    res.floats[f"{record.name}.weight"] = w_float
                if owners[j] != world.rank and (q is None or x is not None):
                    mods[path].weight = q.dequantize() if q is not None else w_float
                    mx.eval(mods[path].weight)
                res.layers.append(record)
        experts = list(expert_modules(block))
        owners = world.assign([sw.weight.size for _, sw in experts])
        done = {}
        for j, (path, sw) in enumerate(experts):
            routed = gather(X.get(path, (None, None)))  # a collective: every rank takes part
            full = f"{prefix}.{i}.{path}"
            bits, g = layer_format(full, sw.weight.shape[-1], layer_bits, recipe, res.fallback)
            if owners[j] != world.rank:
                continue
            record, q, w_hat = compress_experts(sw.weight, full, routed, recipe, quant_method, bits, g, s)
            sw.weight = w_hat  # later blocks see the compressed experts
            done[path] = (q, None if q is not None else w_hat, record)
        if world.distributed and experts:
            done = _exchange(world, done)
        for j, (path, sw) in enumerate(experts):
            q, w_float, record = done[path]
            if q is not None:
                res.quantized[record.name] = q
            else:
                res.floats[f"{record.name}.weight"] = w_float
            if owners[j] != world.rank:
                sw.weight = q.dequantize() if q is not None else w_float
                mx.eval(sw.weight)
            res.layers.append(record)
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
        release_block(block)
        if sink is not None:
            _drain(res, f"{prefix}.{i}.", sink)
        res.peak_memory_bytes = max(res.peak_memory_bytes, mx.get_peak_memory())
        res.block_seconds.append(time.perf_counter() - tb)
        if world.distributed:
            res.extra.setdefault("sent_bytes_per_block", []).append(world.sent - sent0)
            sent0 = world.sent
        if on_progress:
            on_progress("compress", i + 1, len(bs))
    head_x = head_x_fp = None
    if x is not None and quant_method == "gptq":
        head_x = gather(head_inputs(model, x))
        if x_fp is not None:
            head_x_fp = gather(head_inputs(model, x_fp))
    del x, x_fp
    finish_outside_blocks(model, recipe, res, layer_bits, head_x, head_x_fp, world)
    if sink is not None:
        _drain(res, "", sink)
    if res.fallback:
        res.extra["group_fallback"] = res.fallback
    res.peak_memory_bytes = max(res.peak_memory_bytes, mx.get_peak_memory())
    res.seconds = time.perf_counter() - t0
    return res


def _groups(order: list[str], recapture: set[str]) -> list[list[str]]:
    """The block's linears in the order they are compressed, cut before each one whose inputs are captured again
    (GPTQ's true-sequential stages): the layers of a group are independent of each other."""
    groups: list[list[str]] = []
    for p in order:
        if not groups or p in recapture:
            groups.append([])
        groups[-1].append(p)
    return groups


def _gatherer(world: World, n_windows: int):
    """-> gather(a): a [rows of this rank's windows, ...] (or a dict of such, a capture's; a tuple for an expert's
    routed rows) -> the rows of every window in rank order; the identity for a single process. Arrays a dict holds
    twice (q/k/v read one input) travel once."""
    if not world.distributed:
        return lambda a: a

    def gather(a):
        if a is None:
            return None
        if isinstance(a, mx.array):
            return world.gather_rows(a, n_windows)
        if isinstance(a, tuple):
            return tuple(gather(v) for v in a)
        seen: dict[int, object] = {}
        out = {}
        for k, v in a.items():
            key = id(v) if isinstance(v, mx.array) else tuple(id(t) for t in v)
            if key not in seen:
                seen[key] = gather(v)
            out[k] = seen[key]
        return out

    return gather


def _exchange(world: World, done: dict) -> dict:
    """Each rank's finished layers {path: (QuantizedWeight | None, float weight | None, LayerRecord)} -> every
    rank's, on every rank (codes, scales and biases travel packed: bits/8 bytes a weight plus the group's
    scale and bias)."""
    return {p: v for part in world.exchange_objects(done) for p, v in part.items()}


def _drain(res: PipelineResult, prefix: str, sink) -> None:
    """Hand the finished tensors under ``prefix`` to ``sink`` and drop them from ``res``."""
    floats = {k: res.floats.pop(k) for k in [k for k in res.floats if k.startswith(prefix)]}
    quantized = {k: res.quantized.pop(k) for k in [k for k in res.quantized if k.startswith(prefix)]}
    res.n_quant_params += sum(q.shape[0] * q.shape[1] for q in quantized.values())
    sink(floats, quantized)


def _d2_choice(block, X: dict, x, mask, recipe: Recipe, i: int, sparsity: float, res: PipelineResult) -> Recipe:
    """D2Prune's attention-aware update for block i (``pipeline.attention``): each of q/k/v pruned both ways, the
    best choice on the calibration windows -> the recipe for this block's layers (its ``d2_targets``)."""
    variants = {}
    for name in QKV:
        path = f"self_attn.{name}"
        lin = find_module(block, path)
        if not isinstance(lin, nn.Linear) or path not in X:
            continue
        w = lin.weight.astype(mx.float32)
        H = hessian(X[path])
        variants[name] = tuple(
            prune_weight(w, X[path], H, "d2prune", sparsity, recipe.nm, None, recipe.damp,
                         replace(recipe, d2_targets=t), path)[0] for t in ("", name))
    if not variants:
        return replace(recipe, d2_targets="")
    masked, scores = choose_updates(block, variants, x, mask, recipe.d2_rho)
    res.extra.setdefault("d2_attention", []).append({"block": i, "masked_only": sorted(masked), "scores": scores})
    return replace(recipe, d2_targets=",".join(sorted(masked)))


def _tune_block(block, i, prefix, x, mask, target, recipe, res, on_progress) -> None:
    """Block-wise tuning of block i's quantized scales/biases (``tune.block``); updates res in place."""
    qws = {p: q for p, _ in linear_modules(block)
           if (q := res.quantized.get(f"{prefix}.{i}.{p}")) is not None and q.mode == "affine"}
    if not qws:
        return
    new, tr = tune_block(block, qws, x, mask, target, steps=recipe.tune_steps, lr=recipe.tune_lr,
                         seed=recipe.seed + i, on_progress=on_progress)
    for p, qw in new.items():
        res.quantized[f"{prefix}.{i}.{p}"] = qw.compact()
    res.extra.setdefault("block_tune", []).append(
        {"block": i, "loss_before": tr.loss_before, "loss_after": tr.loss_after, "kept": tr.kept})
