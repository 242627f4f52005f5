"""Mixed precision's driver: per-layer sensitivities (hessian, fisher or kl), then the knapsack (``allocate.bits``)
-> each layer's bit-width (and group size) under the recipe's budget.

hessian streams the model block by block (``pipeline.scan``); fisher and kl differentiate / re-run the whole model
(``allocate.fisher``, ``allocate.measured``).
"""
from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from ..model.experts import expert_modules
from ..model.open import open_model
from ..model.structure import block_prefix, blocks, linear_modules, outside_quantizable
from ..pipeline.capture import hessian
from ..pipeline.scan import scan
from ..quant.formats import bits_group, fit_group
from ..quant.rtn import quantize_rtn
from .bits import (LayerCost, allocate_bits, allocation_bytes, choices, expert_cost, feasible, fisher_error,
                   layer_bytes, rtn_errors, rtn_layer_cost)
from .fisher import diagonal_fisher
from .measured import extrapolate, measured_errors, scored_tokens


def layer_group(width: int, recipe) -> int:
    """The group size a layer of ``width`` inputs is quantized at (``formats.fit_group``: e.g. 64 for a 576-wide
    layer asked 128); the recipe's where none fits (such a layer stays float in the pipeline)."""
    return fit_group(width, recipe.group_size) or recipe.group_size


def mixed_allocation(model_spec, calib, recipe, *, on_progress=None) -> tuple[dict, dict]:
    """Sensitivity pass + knapsack -> ({layer path: bits}, details).

    hessian: streamed block by block, err[b] = RTN's Hessian-weighted output error relative to the residual stream;
    embeddings/lm_head keep ``embed_bits or bits`` and their bytes come off the budget first.
    fisher: err[b] = sum F (W - RTN_b(W))^2 with F the diagonal Fisher of the LM loss (``allocate.fisher``); the
    embeddings/lm_head join the knapsack like any linear (``embed_bits``, when set, still pins them).
    kl: err[b] = the measured KL(base || model with only that layer RTN'd at b) on ``kl_tokens`` calibration tokens
    (``allocate.measured``) for bits <= MEASURED_MAX_BITS at the recipe's group size, the other choices extrapolated by
    RTN's weight-space error ratios; embeddings as for fisher."""
    model = open_model(model_spec, lazy=True, dequantize=True)[0]
    outside = outside_quantizable(model, recipe)
    emb = [(k, v.size) for k, v in outside]
    n_emb = sum(n for _, n in emb)
    pinned = recipe.sensitivity == "hessian" or recipe.embed_bits is not None
    emb_bytes = sum(layer_bytes(v.size, recipe.embed_bits or recipe.bits, layer_group(v.shape[-1], recipe))
                    for _, v in outside) if pinned else 0
    prefix = block_prefix(model)
    lin = [f"{prefix}.{i}.{p}.weight" for i, b in enumerate(blocks(model))
           for p, _ in linear_modules(b)]
    # MoE experts join the knapsack as one layer per SwitchLinear (all E experts at one choice); the hessian scan
    # finds them itself
    experts = [f"{prefix}.{i}.{p}.weight" for i, b in enumerate(blocks(model))
               for p, _ in expert_modules(b)]
    params = dict(tree_flatten(model.parameters()))
    paths = lin + experts + ([] if pinned else [k for k, _ in emb])
    if recipe.sensitivity == "kl":
        costs = _measured_costs(model, calib, recipe, paths, params, on_progress)
    elif recipe.sensitivity == "fisher":
        F = diagonal_fisher(model, calib[: recipe.fisher_windows], paths, on_progress=on_progress)
        costs = []
        for k in paths:
            w = params[k].astype(mx.float32)
            w, f = w.reshape(-1, w.shape[-1]), F[k].reshape(-1, w.shape[-1])  # experts [E, out, in]: rows
            g = layer_group(w.shape[-1], recipe)
            costs.append(LayerCost(k[: -len(".weight")], int(w.size), g,
                                   rtn_errors(w, lambda q: fisher_error(w, f, q), g, recipe.mixed_bits(),
                                              recipe.candidate_groups)))
            del F[k]
            if on_progress:
                on_progress("sensitivity", len(costs), len(paths))
    else:
        def cost(i, path, w, X, h_ms):
            # An error a linear adds to the residual stream matters relative to that stream's size (the next
            # RMSNorm divides it out): without this, early blocks (small activations) look cheap and get 2 bits,
            # and their errors are amplified by every later block (docs/experiments.md, "residual scaling").
            g = layer_group(w.shape[-1], recipe)

            def err(w, H):
                return rtn_layer_cost(path, w, H, g, candidate_bits=recipe.mixed_bits(),
                                      candidate_groups=recipe.candidate_groups).err

            e = expert_cost(w, X, calib.size, err) if w.ndim == 3 else err(w, hessian(X))
            return LayerCost(path, int(w.size), g, {b: v / h_ms for b, v in e.items()})

        costs = scan(model, calib, cost, residual=True, experts=True, on_progress=on_progress)
    n_all = sum(c.n_params for c in costs) + (n_emb if pinned else 0)
    if recipe.bits_per_weight is not None:
        budget = int(recipe.bits_per_weight * n_all / 8) - emb_bytes
    else:
        other = sum(v.size * 2 for k, v in _float_params(model))
        budget = int(recipe.target_mb * 1e6) - emb_bytes - other
    bits = allocate_bits(costs, target_bytes=budget, candidate_bits=recipe.mixed_bits(),
                         candidate_groups=recipe.candidate_groups, allow_float=recipe.allow_float)
    used = allocation_bytes(costs, bits)
    hist = {}
    for c in bits.values():
        b, g = bits_group(c, recipe.group_size)
        key = "float" if b is None else str(b) if not recipe.candidate_groups else f"{b}/g{g}"
        hist[key] = hist.get(key, 0) + 1
    del model
    mx.clear_cache()
    emb_bits = {k.rsplit(".", 1)[0]: (recipe.embed_bits or recipe.bits) if pinned else bits[k.rsplit(".", 1)[0]]
                for k, _ in emb}
    # the allocation's own loss estimate: for kl, the sum of the layers' measured KLs, comparable with the model's
    # scored KL (how additive the layers' damage really is); for fisher/hessian in their own units
    estimate = float(sum(c.err.get(bits[c.name], 0.0) for c in costs))  # a float layer: no error
    return bits, {"sensitivity": recipe.sensitivity, "budget_bytes": budget, "allocated_bytes": used,
                  "bits_histogram": hist, "embedding_bits": emb_bits, "estimated_loss": estimate}


MEASURED_MAX_BITS = 4  # kl sensitivity: choices with more bits are extrapolated (their KL is tiny and noisy)


def _measured_costs(model, calib, recipe, paths: list[str], params: dict, on_progress) -> list:
    """LayerCosts of the kl sensitivity: measured KL at few bits, the rest extrapolated (``allocate.measured``)."""
    def g_of(p):
        return layer_group(params[p].shape[-1], recipe)

    tokens = scored_tokens(calib, recipe.kl_tokens)
    opts = {p: feasible(choices(recipe.mixed_bits(), recipe.candidate_groups), params[p].shape[-1], g_of(p))
            for p in paths}

    def measured(p):
        g0 = g_of(p)
        at_g0 = [c for c in opts[p] if bits_group(c, g0)[1] == g0]
        few = [c for c in at_g0 if bits_group(c, g0)[0] <= MEASURED_MAX_BITS]
        return few or sorted(at_g0 or opts[p], key=lambda c: bits_group(c, g0))[:1]

    def rtn(p, w, c):  # MoE experts [E, out, in] are rounded as rows, i.e. each expert on its own groups
        return quantize_rtn(w.astype(mx.float32).reshape(-1, w.shape[-1]), *bits_group(c, g_of(p))).dequantize() \
            .reshape(w.shape)

    kl = measured_errors(model, tokens, paths, measured, rtn, on_progress=on_progress)
    costs = []
    for p in paths:
        g0 = g_of(p)
        w = params[p].astype(mx.float32)
        w = w.reshape(-1, w.shape[-1])
        proxy = rtn_errors(w, lambda q: float(((w - q.dequantize()) ** 2).sum().item()), g0, recipe.mixed_bits(),
                           recipe.candidate_groups)
        m = kl[p]

        def anchor(c, m=m):  # the measured choice with c's bits at g0, else the one with the most bits
            b = bits_group(c, g0)[0]
            same = [a for a in m if bits_group(a, g0)[0] == b]
            return same[0] if same else max(m, key=lambda a: bits_group(a, g0)[0])

        costs.append(LayerCost(p[: -len(".weight")], int(w.size), g0, extrapolate(m, proxy, anchor)))
    return costs


def _float_params(model):
    return [(k, v) for k, v in tree_flatten(model.parameters()) if v.ndim == 1]
