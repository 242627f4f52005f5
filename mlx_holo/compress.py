"""python -m mlx_holo.compress: load a model, calibrate, compress, save MLX weights + evidence.json.

Example: python -m mlx_holo.compress --method gptq --bits 4 --group-size 64 --out runs/smollm2-gptq4
The output folder opens with stock ``mlx_lm.load``; ``evidence.json`` beside the weights records what was done and
measured, with gates and a GO/NO-GO verdict. Everything is written to a temp folder first and renamed at the end.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

from .hardware import ensure_fast_blas


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _layer_group(width: int, recipe) -> int:
    """The group size a layer of ``width`` inputs is quantized at (``formats.fit_group``: e.g. 64 for a 576-wide
    layer asked 128); the recipe's where none fits (such a layer stays float in the pipeline)."""
    from .quant.formats import fit_group

    return fit_group(width, recipe.group_size) or recipe.group_size


def mixed_allocation(model_spec, calib, recipe, *, on_progress=None) -> tuple[dict, dict]:
    """Sensitivity pass + knapsack -> ({layer path: bits}, details).

    hessian: streamed block by block, err[b] = RTN's Hessian-weighted output error relative to the residual stream;
    embeddings/lm_head keep ``embed_bits or bits`` and their bytes come off the budget first.
    fisher: err[b] = sum F (W - RTN_b(W))^2 with F the diagonal Fisher of the LM loss (quant/fisher.py); the
    embeddings/lm_head join the knapsack like any linear (``embed_bits``, when set, still pins them).
    kl: err[b] = the measured KL(base || model with only that layer RTN'd at b) on ``kl_tokens`` calibration tokens
    (quant/measured.py) for bits <= MEASURED_MAX_BITS at the recipe's group size, the other choices extrapolated by
    RTN's weight-space error ratios; embeddings as for fisher."""
    import mlx.core as mx

    from . import models, pipeline
    from .experts import expert_cost, expert_modules
    from .quant.mixed import (LayerCost, allocate_bits, allocation_bytes, bits_group, fisher_error, layer_bytes,
                              rtn_errors, rtn_layer_cost)
    from mlx.utils import tree_flatten

    model = models.open_model(model_spec, lazy=True, dequantize=True)[0]
    outside = pipeline.outside_quantizable(model, recipe)
    emb = [(k, v.size) for k, v in outside]
    n_emb = sum(n for _, n in emb)
    pinned = recipe.sensitivity == "hessian" or recipe.embed_bits is not None
    emb_bytes = sum(layer_bytes(v.size, recipe.embed_bits or recipe.bits, _layer_group(v.shape[-1], recipe))
                    for _, v in outside) if pinned else 0
    prefix = pipeline._block_prefix(model)
    lin = [f"{prefix}.{i}.{p}.weight" for i, b in enumerate(models.blocks(model))
           for p, _ in pipeline.linear_modules(b)]
    # MoE experts join the knapsack as one layer per SwitchLinear (all E experts at one choice); the hessian scan
    # finds them itself
    experts = [f"{prefix}.{i}.{p}.weight" for i, b in enumerate(models.blocks(model))
               for p, _ in expert_modules(b)]
    params = dict(tree_flatten(model.parameters()))
    paths = lin + experts + ([] if pinned else [k for k, _ in emb])
    if recipe.sensitivity == "kl":
        costs = _measured_costs(model, calib, recipe, paths, params, on_progress)
    elif recipe.sensitivity == "fisher":
        from .quant.fisher import diagonal_fisher

        F = diagonal_fisher(model, calib[: recipe.fisher_windows], paths, on_progress=on_progress)
        costs = []
        for k in paths:
            w = params[k].astype(mx.float32)
            w, f = w.reshape(-1, w.shape[-1]), F[k].reshape(-1, w.shape[-1])  # experts [E, out, in]: rows
            g = _layer_group(w.shape[-1], recipe)
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
            # and their errors are amplified by every later block (measured: PPL 141 vs 92 for uniform 3-bit).
            g = _layer_group(w.shape[-1], recipe)

            def err(w, H):
                return rtn_layer_cost(path, w, H, g, candidate_bits=recipe.mixed_bits(),
                                      candidate_groups=recipe.candidate_groups).err

            e = expert_cost(w, X, calib.size, err) if w.ndim == 3 else err(w, pipeline.hessian(X))
            return LayerCost(path, int(w.size), g, {b: v / h_ms for b, v in e.items()})

        costs = pipeline.scan(model, calib, cost, residual=True, experts=True, on_progress=on_progress)
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
    """LayerCosts of the kl sensitivity: measured KL at few bits, the rest extrapolated (quant/measured.py)."""
    import mlx.core as mx

    from .quant.measured import extrapolate, measured_errors, scored_tokens
    from .quant.mixed import LayerCost, bits_group, choices, feasible, rtn_errors
    from .quant.rtn import quantize_rtn

    def g_of(p):
        return _layer_group(params[p].shape[-1], recipe)

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
    from mlx.utils import tree_flatten
    return [(k, v) for k, v in tree_flatten(model.parameters()) if v.ndim == 1]


def sparsity_report(folder, layers: list, nm: str | None) -> dict:
    """Read the saved tensors back and check the claimed sparsity / N:M pattern of the pruned (block) linears.

    Every pruned linear is read from the saved folder (quantized ones dequantized with the stored bits/group size
    as mlx-lm will), its exact zeros counted (``sparsity_saved`` per layer) and, with ``nm``, its N:M pattern
    checked. ``claims_hold`` is True when every layer keeps at least the zeros its mask claimed (``sparsity``);
    a quantizer that moves pruned weights off zero makes it False. Embeddings / lm_head (paths without a layer
    index) are never pruned and are left out; MoE experts are checked expert by expert.
    """
    import mlx.core as mx

    from . import models
    from .prune.masks import check_nm, parse_nm

    weights = models.load_weights(folder)
    qcfg = models.read_config(folder).get("quantization") or {}
    total = zeros = 0
    claimed = 0.0
    nm_ok = claims_ok = True
    checked = quantized = 0
    for r in layers:
        name = r["name"]
        w = weights.get(f"{name}.weight")
        if w is None or w.ndim not in (2, 3) or not any(p.isdigit() for p in name.split(".")):
            continue
        if f"{name}.scales" in weights:
            q = qcfg.get(name) or qcfg
            w = mx.dequantize(w, weights[f"{name}.scales"], weights.get(f"{name}.biases"),
                              group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"))
            quantized += 1
        w = w.reshape(-1, w.shape[-1])  # MoE experts [E, out, in]: each expert's rows
        z = int((w == 0).sum().item())
        r["sparsity_saved"] = z / w.size
        claims_ok &= z >= round(r["sparsity"] * w.size)
        claimed += r["sparsity"] * w.size
        total += w.size
        zeros += z
        checked += 1
        if nm:
            n_, m_ = parse_nm(nm)
            nm_ok &= bool(check_nm(w != 0, n_, m_))
    return {"overall": zeros / total if total else 0.0, "overall_claimed": claimed / total if total else 0.0,
            "checked": checked > 0, "claims_hold": bool(claims_ok and checked > 0), "layers_checked": checked,
            "layers_quantized": quantized, "nm": nm, "nm_pattern_holds": (nm_ok if nm and checked else None)}


def e2e_tune(folder, base, calib, *, steps: int, lr: float, batch: int = 1, seed: int = 0, on_progress=None):
    """End-to-end KL tuning (quant/e2e_qp.py) of a compressed folder's scales/biases (every affine quantized linear
    and embedding table), codes frozen -> (report, tensors, model).

    folder: a compressed mlx-lm folder; base: the float model; calib: [N, S] calibration windows (a quarter held out
    decides whether the tuning is kept). tensors: {"<linear>.scales"/"<linear>.biases": tuned} when kept, else {};
    model: the folder's model with plain float linears holding the (tuned, or restored) dequantized weights."""
    import mlx.core as mx
    import numpy as np

    from . import models
    from .quant.blockwise import _CodeEmbedding
    from .quant.e2e_qp import swap_code_linears, to_float, tune_kl

    m = models.open_model(str(folder), dequantize=False)[0]
    code = swap_code_linears(m)
    models.dequantize_model(m)  # anything still quantized (other modes): float, fixed
    models.cast_floats(m, mx.float32)
    t = time.perf_counter()
    res = tune_kl(m, base, code, calib, steps=steps, lr=lr, batch=batch, seed=seed, on_progress=on_progress)
    tuned = to_float(m, code)
    k = max(1, len(res.losses) // 10)
    n_emb = sum(isinstance(c, _CodeEmbedding) for c in code.values())
    report = {"steps": steps, "lr": lr, "batch": batch, "linears": len(code) - n_emb, "embeddings": n_emb,
              "expert_layers": sum(q.experts > 0 for q in tuned.values()),
              "windows": int(calib.shape[0]),
              "heldout_kl_before": res.kl_before, "heldout_kl_after": res.kl_after, "kept": bool(res.kept),
              "train_kl_first": float(np.mean(res.losses[:k])) if res.losses else None,
              "train_kl_last": float(np.mean(res.losses[-k:])) if res.losses else None,
              "seconds": time.perf_counter() - t}
    tensors = {f"{p}.{key}": q.stored_shape(getattr(q, key))  # MoE experts as stored: [E, out, G]
               for p, q in tuned.items() for key in ("scales", "biases")} if res.kept else {}
    return report, tensors, m


def compress(model: str | None, recipe, out: str, *, eval_tokens: int = 8192, eval_seq_len: int = 512,
             calib_corpus: str = "c4", eval_corpus: str = "wiki", gates: list[str] | None = None,
             overwrite: bool = False, base_model=None, on_progress=None) -> dict:
    """Compress ``model`` with ``recipe`` into ``out`` -> evidence dict (also written to out/evidence.json).

    base_model: an already opened float base (``models.open_model(model)[0]``) to score against; reusing one object
    across calls lets ``evaluate.compare`` reuse its cached base outputs."""
    import mlx.core as mx

    from . import data, evaluate, evidence, hardware, models, pipeline
    from .recipe import PRUNE_METHODS

    recipe.validate()
    t0 = time.perf_counter()
    base, tok, config, info = models.open_model(model, lazy=True, dequantize=True)
    needs_calib = (recipe.method not in ("rtn", "magnitude") or recipe.allocation != "uniform" or recipe.tune_steps > 0
                   or recipe.e2e_steps > 0 or recipe.recover is not None)  # ADMM recovery fits the inputs' H
    calib = corpus_c = None
    if needs_calib:
        corpus_c = data.load_corpus(calib_corpus)
        calib = data.calibration_windows(tok, corpus_c, recipe.calib_tokens, recipe.calib_seq_len, recipe.seed)
    details = {}
    layer_bits = layer_sparsity = None
    if recipe.method == "mixed":
        layer_bits, details["allocation"] = mixed_allocation(model, calib, recipe, on_progress=on_progress)
    if recipe.method in PRUNE_METHODS and recipe.allocation != "uniform":
        from .allocation import allocate_sparsity
        layer_sparsity, details["allocation"] = allocate_sparsity(model, calib, recipe, on_progress=on_progress)
    head_x_first = None
    if recipe.embed_first and calib is not None:
        head_x_first = pipeline.forward_head_inputs(models.open_model(model, lazy=True, dequantize=True)[0], calib)
    res = pipeline.run(base, calib, recipe, layer_bits=layer_bits, layer_sparsity=layer_sparsity,
                       head_x_first=head_x_first, on_progress=on_progress)
    del head_x_first
    if res.extra.get("group_fallback"):
        fb = res.extra["group_fallback"]
        kept = sorted(k for k, g in fb.items() if g is None)
        print(f"note: group size {recipe.group_size} does not divide the input width of {len(fb)} layer(s): "
              f"{len(fb) - len(kept)} take a smaller group size, {len(kept)} stay float "
              f"(evidence: group_fallback)", file=sys.stderr)
    compress_s = time.perf_counter() - t0
    del base
    mx.clear_cache()
    with models.atomic_dir(out, overwrite=overwrite) as tmp:
        nbytes = models.save_compressed(res.floats, res.quantized, config, info.path, tmp,
                                        default_bits=recipe.bits, default_group_size=max(recipe.group_size, 32)
                                        if recipe.group_size != -1 else 128, mode=recipe.mode,
                                        keep_float={r.name for r in res.layers if r.bits is None}
                                        if recipe.bits is not None else None)
        nbytes["original"] = 2 * info.n_params
        layers = res.layer_dicts()
        extra = dict(details, **res.extra)
        if recipe.method in PRUNE_METHODS:
            extra["sparsity"] = sparsity_report(tmp, layers, recipe.nm)
        bm = base_model
        e2e_s = 0.0
        if recipe.e2e_steps > 0:
            bm = bm if bm is not None else models.open_model(model)[0]
            extra["e2e_tune"], tensors, _ = e2e_tune(tmp, bm, calib, steps=recipe.e2e_steps, lr=recipe.e2e_lr,
                                                     batch=recipe.e2e_batch, seed=recipe.seed, on_progress=on_progress)
            if tensors:
                models.replace_tensors(tmp, tensors)
            e2e_s = extra["e2e_tune"]["seconds"]
            mx.clear_cache()
        t1 = time.perf_counter()
        metrics: dict = {}
        corpus_e = data.load_corpus(eval_corpus)
        if eval_tokens > 0:
            cm = models.open_model(str(tmp))[0]
            bm = bm if bm is not None else models.open_model(model)[0]
            wins = data.windows(data.tokenize(tok, corpus_e, eval_tokens), eval_seq_len)
            metrics = evaluate.compare(cm, bm, wins, on_progress=on_progress).to_dict()
            del cm, bm
        else:
            wins = None
            metrics = {k: None for k in ("ppl", "base_ppl", "delta_ppl_pct", "kl", "top1", "cos_min",
                                         "determinism_delta")}
        corpora = {"evaluation": corpus_e.record(int(wins.size) if wins is not None else 0)}
        if corpus_c is not None:
            corpora["calibration"] = corpus_c.record(int(calib.size))
        n_quant = sum((q.shape[0] * q.shape[1] if hasattr(q, "shape") else q[0].size * 32 // q[3])
                      for q in res.quantized.values())
        ev = evidence.build(
            model={"id": info.id, "path": info.path, "hash": info.hash, "model_type": info.model_type,
                   "n_params": info.n_params},
            recipe=recipe.to_dict(), corpora=corpora, nbytes=nbytes, n_quant_params=n_quant, metrics=metrics,
            environment=hardware.device_info(),
            timings={"compress_s": compress_s, "e2e_tune_s": e2e_s, "eval_s": time.perf_counter() - t1,
                     "total_s": time.perf_counter() - t0},
            peak_memory_bytes=_peak_rss(), gates=gates or evidence.DEFAULT_GATES, layers=layers,
            output={"path": str(out)}, pipeline_peak_mlx_bytes=int(res.peak_memory_bytes),
            command=" ".join(sys.orig_argv), **extra)
        evidence.write(ev, tmp / "evidence.json")
    return ev


def build_parser() -> argparse.ArgumentParser:
    from .recipe import METHODS
    from .quant.rtn import FITS

    ap = argparse.ArgumentParser(prog="python -m mlx_holo.compress", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="local HF folder, hub id, .gguf file, or 'default' "
                    "(embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="output folder (mlx-lm layout + evidence.json)")
    ap.add_argument("--method", default="rtn", choices=METHODS)
    ap.add_argument("--bits", type=int, default=4, help="2,3,4,5,6,8 (0 = keep float, e.g. pruning only)")
    ap.add_argument("--group-size", type=int, default=64, help="32, 64, 128 or -1 (per-channel)")
    ap.add_argument("--mode", default="affine", choices=["affine", "mxfp4", "nvfp4", "mxfp8"])
    ap.add_argument("--fit", default="auto", choices=("auto",) + FITS,
                    help="group grid: least squares (lsq), least squares with 0 on the grid (zlsq), min/max, or "
                         "mx.quantize's rule; auto: zlsq for plain rounding at <= 3 bits, else lsq")
    ap.add_argument("--clip-search", action="store_true", help="MSE-optimal clipping per group (RTN/GPTQ)")
    ap.add_argument("--grid-offset", type=float, default=0.0, help="shift of the integer grid, in steps")
    ap.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--calib-corpus", default="c4", help="built-in corpus name or a text file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ without act-order")
    ap.add_argument("--true-sequential", action="store_true",
                    help="re-capture a block's inputs after each stage of its linears (q/k/v, o, gate/up, down)")
    ap.add_argument("--no-gptq-head", dest="gptq_head", action="store_false",
                    help="GPTQ/mixed/SparseGPT: round the output head (lm_head or tied embedding) instead of GPTQ")
    ap.add_argument("--head-damp", type=float, default=0.1, help="GPTQ damping of the output head")
    ap.add_argument("--embed-first", action="store_true",
                    help="gptq/mixed: quantize a tied embedding table first (on the float model's head inputs), so "
                         "the blocks calibrate on the quantized input embedding")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--awq-scales", action="store_true",
                    help="gptq/mixed: fold AWQ's per-channel scales into each block before GPTQ (AWQ+GPTQ)")
    ap.add_argument("--awq-objective", choices=("layer", "module"), default="layer",
                    help="awq (and --awq-scales): score alpha on each linear's output error, or on the output of the "
                         "attention / MLP that reads a norm (the AWQ reference code's loss)")
    ap.add_argument("--gptq-iters", type=int, default=1,
                    help="GPTQ passes alternated with the least-squares grid refit, kept while the layer error drops")
    ap.add_argument("--qep-alpha", type=float, default=0.5,
                    help="gptq/mixed: quantization error propagation, 0 (off) .. 1 (full correction toward the float "
                         "model's outputs)")
    ap.add_argument("--qep-damp", type=float, default=1.0,
                    help="damping of QEP's correction (fraction of mean diag H; it fits few calibration tokens)")
    ap.add_argument("--tune-steps", type=int, default=0,
                    help="block-wise Adam steps on each block's scales/biases, codes frozen (0 = off)")
    ap.add_argument("--tune-lr", type=float, default=1e-3, help="its learning rate, relative to each tensor's RMS")
    ap.add_argument("--e2e-steps", type=int, default=0,
                    help="after compression: Adam steps on the scales/biases of every quantized linear and "
                         "embedding table against the KL to the float model, codes frozen, one calibration window a "
                         "step, kept only if the held-out windows' KL falls (0 = off; holds the whole model, not one "
                         "block)")
    ap.add_argument("--e2e-lr", type=float, default=3e-5, help="its learning rate, relative to each tensor's RMS")
    ap.add_argument("--e2e-batch", type=int, default=1, help="its calibration windows per step")
    ap.add_argument("--bits-per-weight", type=float, default=None, help="mixed: average bits budget")
    ap.add_argument("--target-mb", type=float, default=None, help="mixed: model size budget in MB")
    ap.add_argument("--candidate-bits", default=(), type=_int_tuple,
                    help="mixed: the bit-widths a layer may get, comma-separated (default: every bit-width >= --bits)")
    ap.add_argument("--candidate-groups", default=(), type=_int_tuple,
                    help="mixed: also choose each layer's group size among these (e.g. 32,64,128); default: "
                         "--group-size only")
    ap.add_argument("--sensitivity", default="hessian", choices=["hessian", "fisher", "kl"],
                    help="mixed: per-layer output error (streamed) or diagonal Fisher of the LM loss (whole model, "
                         "embeddings included in the budget)")
    ap.add_argument("--fisher-windows", type=int, default=8, help="mixed, fisher: calibration windows differentiated")
    ap.add_argument("--kl-tokens", type=int, default=256, help="mixed, kl: calibration tokens each measurement scores")
    ap.add_argument("--allow-float", action="store_true",
                    help="mixed: a layer may also stay float16 (written as a False override mlx_lm.load reads)")
    ap.add_argument("--sparsity", type=float, default=0.0)
    ap.add_argument("--nm", default=None, help="N:M structured sparsity, e.g. 2:4")
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "owl", "zero-order"])
    ap.add_argument("--recover", default=None, choices=["admm"])
    ap.add_argument("--no-quantize-embeddings", dest="quantize_embeddings", action="store_false")
    ap.add_argument("--embed-bits", type=int, default=None, help="bits for embeddings/lm_head (default: --bits)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="0 skips evaluation (gates then fail)")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-corpus", default="wiki")
    ap.add_argument("--gate", action="append", default=None, help="e.g. --gate cos_min>=0.95 (repeatable)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return ap


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def recipe_from_args(args):
    from .recipe import Recipe

    return Recipe(method=args.method, bits=args.bits or None, group_size=args.group_size, mode=args.mode,
                  clip_search=args.clip_search, fit=args.fit, grid_offset=args.grid_offset, rounding=args.rounding,
                  calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len, seed=args.seed,
                  act_order=args.act_order, gptq_iters=args.gptq_iters, awq_scales=args.awq_scales,
                  awq_objective=args.awq_objective,
                  true_sequential=args.true_sequential,
                  gptq_head=args.gptq_head, embed_first=args.embed_first,
                  head_damp=args.head_damp, damp=args.damp, qep_alpha=args.qep_alpha, qep_damp=args.qep_damp,
                  tune_steps=args.tune_steps, tune_lr=args.tune_lr, e2e_steps=args.e2e_steps, e2e_lr=args.e2e_lr,
                  e2e_batch=args.e2e_batch,
                  bits_per_weight=args.bits_per_weight,
                  target_mb=args.target_mb,
                  candidate_bits=args.candidate_bits, candidate_groups=args.candidate_groups,
                  sensitivity=args.sensitivity, fisher_windows=args.fisher_windows, kl_tokens=args.kl_tokens,
                  allow_float=args.allow_float,
                  sparsity=args.sparsity, nm=args.nm, allocation=args.allocation,
                  recover=args.recover, quantize_embeddings=args.quantize_embeddings, embed_bits=args.embed_bits)


def progress_printer():
    """on_progress for the terminal: one updating line per stage on stderr."""
    last = {}

    def cb(stage, done, total):
        now = time.perf_counter()
        if done < total and now - last.get(stage, 0) < 0.5:
            return
        last[stage] = now
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{stage:>10} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return cb


def main(argv=None) -> int:
    ensure_fast_blas()
    args = build_parser().parse_args(argv)
    from . import evidence
    from .data import DataError
    from .models import ModelError
    from .quant.mixed import BudgetError
    from .recipe import RecipeError

    try:
        recipe = recipe_from_args(args).validate()
        for g in args.gate or []:
            evidence.parse_gate(g)
        ev = compress(args.model, recipe, args.out, eval_tokens=args.eval_tokens, eval_seq_len=args.eval_seq_len,
                      calib_corpus=args.calib_corpus, eval_corpus=args.eval_corpus, gates=args.gate,
                      overwrite=args.overwrite, on_progress=progress_printer())
    except (RecipeError, ModelError, DataError, evidence.EvidenceError, FileExistsError, BudgetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = ev["metrics"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    print(f"{ev['verdict']}  {args.out}  bits/weight {ev['bits_per_weight']:.3f}  ratio {ev['ratio']:.2f}x  "
          f"ppl {fmt(m.get('ppl'))} (base {fmt(m.get('base_ppl'))}, {fmt(m.get('delta_ppl_pct'))}%)  "
          f"kl {fmt(m.get('kl'))}  top1 {fmt(m.get('top1'))}  cos_min {fmt(m.get('cos_min'))}")
    for g in ev["gates"]:
        print(f"  {'pass' if g['passed'] else 'FAIL'}  {g['metric']} {g['op']} {g['threshold']:g}  "
              f"(value {fmt(g['value'])})")
    return 0 if ev["verdict"] == "GO" else 1


if __name__ == "__main__":
    sys.exit(main())
