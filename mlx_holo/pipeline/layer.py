"""One layer of a block: its format (bits, group size), then pruning and/or quantization with the recipe's method.

``compress_weight`` is the per-linear step of the pipeline: prune (magnitude, Wanda, SparseGPT, + ADMM recovery),
aim at QEP's corrected weight, quantize (RTN, GPTQ, AWQ's clip search, or an MLX float mode) -> the stored
``QuantizedWeight`` and the dequantized weight the later blocks see. ``compress_experts`` does the same per expert
of a MoE SwitchLinear, each on the tokens routed to it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..model.experts import split_by_expert
from ..options import PRUNE_METHODS
from ..prune.admm import admm_recover
from ..prune.d2admm import d2admm_prune
from ..prune.d2prune import d2_stats, d2prune_sparsegpt, d2prune_wanda
from ..prune.magnitude import magnitude_prune
from ..prune.sparsegpt import sparsegpt_prune
from ..prune.wanda import wanda_prune
from ..quant.awq import awq_clip
from ..quant.formats import FLOAT_MODES, QuantizedWeight, bits_group, fit_group, float_quantize, stack_experts
from ..quant.gptq import gptq_quantize
from ..quant.qep import qep_correct
from ..quant.rtn import quantize_rtn
from ..recipe import Recipe
from .capture import hessian, rel_error


@dataclass
class LayerRecord:
    name: str
    bits: int | None
    group_size: int | None
    sparsity: float = 0.0
    error: float | None = None      # relative Hessian-weighted output error trace(dW H dW^T) / trace(W H W^T)
    seconds: float = 0.0


def quantize_weight(w: mx.array, X: mx.array | None, H: mx.array | None, recipe: Recipe, bits: int,
                    method: str, keep: mx.array | None = None, group_size: int | None = None) -> QuantizedWeight:
    """One linear: w [out, in], its calibration input X [n, in] / Hessian H [in, in] -> QuantizedWeight.

    keep: the [out, in] mask of a pruned weight; its zeros are then stored exactly (grids that hold 0 exactly).
    group_size: this layer's (mixed precision), default the recipe's."""
    g = recipe.group_size if group_size is None else group_size
    if method == "gptq":
        return gptq_quantize(w, H, bits, g, act_order=recipe.act_order, damp=recipe.damp,
                             clip_search=recipe.clip_search, keep=keep, fit=grid_fit(recipe, bits, compensated=True),
                             iters=recipe.gptq_iters)
    if method == "awq":
        return awq_clip(w, X, bits, g, fit=grid_fit(recipe, bits, compensated=True))
    imp = None
    if recipe.clip_search and H is not None:
        imp = mx.diag(H)
    return quantize_rtn(w, bits, g, clip_search=recipe.clip_search, importance=imp, grid_offset=recipe.grid_offset,
                        rounding=recipe.rounding, seed=recipe.seed, exact_zero=keep is not None,
                        fit=grid_fit(recipe, bits, compensated=False))


def grid_fit(recipe: Recipe, bits: int, compensated: bool) -> str:
    """The group-grid rule (``rtn.FITS``) for one layer. ``recipe.fit="auto"``: "zlsq" (0 kept on the grid) for
    plain data-free rounding at 3 bits or fewer, "lsq" otherwise. Rounding that nothing compensates moves a weight by
    up to half a step, and a free grid sends the many small weights to a common +-offset; GPTQ compensates each
    rounding with the calibration inputs and does better on the free grid, AWQ (grids chosen on the output error)
    keeps lsq too (the measurements behind this rule: docs/experiments.md, "grid fit")."""
    if recipe.gguf and bits == 8:
        return "sym"  # Q8_0
    if recipe.fit != "auto":
        return recipe.fit
    return "zlsq" if bits <= 3 and not compensated else "lsq"


def prune_weight(w: mx.array, X: mx.array | None, H: mx.array | None, method: str, sparsity: float,
                 nm: str | None, recover: str | None, damp: float, recipe: Recipe | None = None,
                 name: str = "") -> tuple[mx.array, mx.array]:
    """-> (pruned weight, keep mask). recipe and name (the layer's path): D2Prune's settings and target layers."""
    rc = recipe or Recipe()
    stats = d2_stats(w, X, X.shape[0] // rc.calib_seq_len, rc.d2_s) if "d2" in (method + (recover or "")) else None
    if method == "d2prune":
        if name.rsplit(".", 1)[-1] in {t.strip() for t in rc.d2_targets.split(",")}:
            r = d2prune_wanda(w, stats, sparsity, nm, lambda1=rc.d2_lambda1, lambda2=rc.d2_lambda2)
        else:
            r = d2prune_sparsegpt(w, H, stats, sparsity, nm, lambda1=rc.d2_lambda1, lambda2=rc.d2_lambda2,
                                  damp=damp)
    elif method == "magnitude":
        r = magnitude_prune(w, sparsity, nm)
    elif method == "wanda":
        r = wanda_prune(w, mx.sqrt((X.astype(mx.float32) ** 2).sum(axis=0)), sparsity, nm)
    elif method == "sparsegpt":
        r = sparsegpt_prune(w, H, sparsity, nm, damp=damp)
    else:
        raise ValueError(f"unknown pruner {method!r}")
    weight, mask = r.weight, r.mask
    if recover == "admm":
        weight = admm_recover(w, r.mask, H, damp=damp)
    elif recover == "d2admm":  # the pruner's mask as the start, re-chosen in the first iterations
        r = d2admm_prune(w, H, sparsity, nm, stats=stats, mask0=r.mask, lambda1=rc.d2_lambda1,
                         lambda2=rc.d2_lambda2, beta=rc.d2_beta)
        weight, mask = r.weight, r.mask
    return weight, mask


def layer_format(full: str, width: int, layer_bits: dict | None, recipe: Recipe, fallback: dict,
                 default: int | None = None) -> tuple[int | None, int]:
    """A layer's (bits or None = float, group size): its ``layer_bits`` entry or ``default`` (the recipe's bits),
    with the group size fitted to its input width (``formats.fit_group``); a change is recorded in ``fallback``
    (layer -> group size, or None where the layer stays float)."""
    bits, g = bits_group((layer_bits or {}).get(full, recipe.bits if default is None else default),
                         recipe.group_size)
    if bits is None:
        return None, g
    fit = fit_group(width, g) if recipe.mode == "affine" else (g if width % FLOAT_MODES[recipe.mode][1] == 0
                                                               else None)
    if fit != g:
        fallback[full] = fit
    return (bits, fit) if fit is not None else (None, g)


def compress_weight(w: mx.array, X: mx.array | None, H: mx.array | None, X_fp: mx.array | None, recipe: Recipe,
                    quant_method: str, bits: int | None, g: int, sparsity: float, name: str = ""
                    ) -> tuple[QuantizedWeight | None, mx.array, float]:
    """One weight w [out, in] (float32) with its calibration input X [n, in] / Hessian H (None: data-free) ->
    (compact QuantizedWeight, or None when kept float; w_hat [out, in], lazy; measured sparsity).
    X_fp: the float model's input (QEP). name: the layer's path (D2Prune's target layers)."""
    pruned = 0.0
    w_new, keep = w, None
    if recipe.method in PRUNE_METHODS:
        method = recipe.method if X is not None else "magnitude"  # an expert no calibration token reached
        w_new, keep = prune_weight(w, X, H, method, sparsity, recipe.nm, recipe.recover if H is not None else None,
                                   recipe.damp, recipe, name)
        pruned = 1.0 - float(keep.astype(mx.float32).mean().item())
    if bits is None:
        return None, w_new, pruned
    if recipe.mode != "affine":
        q = float_quantize(w_new, recipe.mode)
        w_hat = q.dequantize()
        mx.eval(w_hat)
        return q, w_hat, pruned
    if X_fp is not None:
        w_new = qep_target(w_new, X_fp, X, recipe)
    method = quant_method if X is not None else "rtn"
    qw = quantize_weight(w_new, X, H, recipe, bits, method, keep, g)
    w_hat = qw.dequantize()  # lazy: a data-free caller that needs no w_hat never computes it
    return qw.compact(), w_hat, pruned  # hold packed codes only: bits/8 bytes per weight


def compress_experts(w: mx.array, full: str, routed: tuple, recipe: Recipe, quant_method: str, bits: int | None,
                     g: int, sparsity: float) -> tuple[LayerRecord, QuantizedWeight | None, mx.array]:
    """A MoE SwitchLinear's weight w [E, out, in]: each expert compressed on the rows routed to it
    (``model.experts``) -> (record, the experts' stacked QuantizedWeight or None when kept float, w_hat
    [E, out, in]). The record's error is the experts' mean relative Hessian-weighted error over those that saw
    calibration tokens."""
    ts = time.perf_counter()
    w = w.astype(mx.float32)
    xs = split_by_expert(*routed, w.shape[0])
    qs, w_hats, errs, pruned = [], [], [], []
    for e, x in enumerate(xs):
        H = hessian(x) if x is not None else None
        q, w_hat, p = compress_weight(w[e], x, H, None, recipe, quant_method, bits, g, sparsity, full)
        qs.append(q)
        w_hats.append(w_hat)
        pruned.append(p)
        if H is not None:
            errs.append(rel_error(w[e], w_hat, H))
    w_hat = mx.stack(w_hats)
    mx.eval(w_hat)
    record = LayerRecord(full, bits, g if bits is not None else None, float(np.mean(pruned)),
                         float(np.mean(errs)) if errs else None, time.perf_counter() - ts)
    return record, (stack_experts(qs) if bits is not None else None), w_hat


def qep_target(w: mx.array, x_fp: mx.array, x_q: mx.array, recipe: Recipe) -> mx.array:
    """w [out, in] -> the QEP-corrected weight the quantizer should aim at (quant/qep.py), from the same calibration
    tokens' inputs in the float model x_fp and in the compressed one x_q [n, in]."""
    w_star = qep_correct(w, x_fp, x_q, alpha=recipe.qep_alpha, damp=recipe.qep_damp)
    mx.eval(w_star)
    return w_star
