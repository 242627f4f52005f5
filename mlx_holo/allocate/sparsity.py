"""Per-block sparsity allocation for the pruners: OWL ratios and a zero-order search on top of them.

OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity", arXiv:2310.05175, Section 3 and the authors' code):
each transformer block's outlier ratio D_l is the fraction of the Wanda scores |W_ij| * ||X_j||_2 of *all* its
linears (one pool per block) above M times the pool's mean score, measured on the dense model; blocks with more
outliers are pruned less (``allocate.owl.owl_allocation``: spread 2 * lambda around the target, mean kept).

Zero-order (``allocate.zero_order``, MeZO-style SPSA, Malladi et al. 2023): starts from the OWL allocation and moves
the per-block sparsities along projected random directions, scoring each candidate by the mean next-token NLL of the
model pruned with Wanda at those sparsities on a small fixed subset of the calibration windows. The budget is the
parameter-weighted mean sparsity, so the total number of pruned weights stays fixed. The Wanda input norms come
from the dense model (one scan), and each block's per-row Wanda ranks are computed once, so a candidate costs one
compare per weight plus one forward pass. This is the expensive path: the whole dense model stays in memory and the
search costs 2 * steps + 3 forward passes (about 2-4 minutes on 2 CPU cores for the embedded 135M model with the
defaults below); OWL alone costs one streaming pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model.open import open_model
from ..model.structure import block_prefix, blocks, linear_modules
from ..pipeline.scan import scan
from ..prune.masks import n_pruned
from ..prune.wanda import wanda_score
from ..recipe import RecipeError
from .owl import owl_allocation
from .zero_order import weighted_mean, zero_order_allocation

OWL_LAMBDA = 0.08        # OWL's lambda: sparsities span [target - lam, target + lam] (the paper's default)
OWL_M = 5.0              # OWL's M: a score is an outlier when above M x the block's mean score
ZO_STEPS = 8             # SPSA steps (2 forwards each)
ZO_WINDOWS = 2           # calibration windows scored per candidate ...
ZO_SEQ_LEN = 256         # ... each cut to this many tokens
ZO_EPS = 0.02            # perturbation size (in sparsity units)
ZO_LR = 0.05             # step size
ZO_BOUNDS = (0.0, 0.95)  # per-block sparsity box


@dataclass
class BlockStats:
    """What one scan of the dense model gives the allocators."""

    ratios: list[float]                                   # [L] OWL outlier ratio per block
    n_params: list[int]                                   # [L] linear weights per block
    x_norms: dict[str, mx.array] = field(default_factory=dict)  # linear path -> ||X_j||_2 over calibration [in]


def block_outlier_ratio(scores: list[mx.array], M: float = OWL_M) -> float:
    """scores: Wanda score arrays of one block's linears (any shapes) -> fraction above M x their pooled mean."""
    s = mx.concatenate([a.reshape(-1) for a in scores])  # [sum of sizes]
    return float(mx.mean((s > M * mx.mean(s)).astype(mx.float32)).item())


def scan_blocks(model: nn.Module, calib: mx.array, M: float = OWL_M, *, release: bool = True,
                on_progress=None) -> BlockStats:
    """One pass of the unmodified model over calib [N, S] -> OWL ratio, size and input norms per block."""
    stats = BlockStats([], [])
    pending: list[mx.array] = []
    current = [0]

    def close_block():
        if pending:
            stats.ratios.append(block_outlier_ratio(pending, M))
            stats.n_params.append(int(sum(a.size for a in pending)))
            pending.clear()

    def fn(i, path, w, X):  # w: [out, in], X: [n, in]
        if i != current[0]:
            close_block()
            current[0] = i
        x_norm = mx.sqrt((X.astype(mx.float32) ** 2).sum(axis=0))  # [in], as pipeline.prune_weight computes it
        score = wanda_score(w, x_norm)  # [out, in]
        mx.eval(x_norm, score)
        pending.append(score)
        stats.x_norms[path] = x_norm
        return path

    scan(model, calib, fn, release=release, on_progress=on_progress)
    close_block()
    return stats


def wanda_ranks(w: mx.array, x_norm: mx.array) -> mx.array:
    """w: [out, in], x_norm: [in] -> rank of each weight's Wanda score within its row [out, in] (0 = smallest).

    ``rank >= round(s * in)`` is exactly the keep-mask of ``wanda_prune(w, x_norm, s)`` (same argsort, same ties).
    """
    out, n = w.shape
    dt = mx.uint16 if n <= 1 << 16 else mx.uint32
    order = mx.argsort(wanda_score(w, x_norm), axis=1)  # [out, in]
    pos = mx.broadcast_to(mx.arange(n, dtype=dt)[None, :], (out, n))
    return mx.put_along_axis(mx.zeros((out, n), dtype=dt), order, pos, axis=1)


class WandaBlockPruner:
    """Applies per-block Wanda sparsities to a dense model in place; ``restore`` puts the dense weights back.

    Holds references to the dense weights (no copy) and one rank array per linear ([out, in] uint16).
    """

    def __init__(self, model: nn.Module, x_norms: dict[str, mx.array]):
        prefix = block_prefix(model)
        self.blocks: list[list[tuple[nn.Linear, mx.array, mx.array]]] = []
        for i, block in enumerate(blocks(model)):
            entries = []
            for path, lin in linear_modules(block):
                w = lin.weight
                r = wanda_ranks(w.astype(mx.float32), x_norms[f"{prefix}.{i}.{path}"])
                mx.eval(r)
                entries.append((lin, w, r))
            self.blocks.append(entries)

    def apply(self, sparsities: list[float]) -> None:
        assert len(sparsities) == len(self.blocks), (len(sparsities), len(self.blocks))
        for s, entries in zip(sparsities, self.blocks):
            for lin, w, r in entries:
                k = n_pruned(w.shape[1], float(s))
                lin.weight = mx.where(r >= k, w, mx.zeros((), w.dtype))  # [out, in]

    def restore(self) -> None:
        for entries in self.blocks:
            for lin, w, _ in entries:
                lin.weight = w


def mean_nll(model: nn.Module, tokens: mx.array) -> float:
    """tokens [N, S] -> mean next-token negative log-likelihood over the N * (S - 1) predictions."""
    logits = model(tokens)[:, :-1].astype(mx.float32)  # [N, S-1, V]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1)  # [N, S-1, 1]
    return float(nll.mean().item())


def allocate_sparsity(model_spec, calib: mx.array, recipe, *, on_progress=None, lam: float = OWL_LAMBDA,
                      M: float = OWL_M, steps: int = ZO_STEPS, windows: int = ZO_WINDOWS,
                      seq_len: int = ZO_SEQ_LEN, eps: float = ZO_EPS, lr: float = ZO_LR,
                      bounds: tuple[float, float] = ZO_BOUNDS) -> tuple[list[float], dict]:
    """recipe.allocation 'owl' | 'zero-order' -> (per-block sparsities [L], details).

    calib: [N, S] calibration windows. Details: method, lam, M, ratios, n_params, sparsities, mean/weighted-mean
    sparsity, seconds; for zero-order also the OWL start, losses (per-step history), loss_uniform / loss_owl /
    loss_best (mean NLL on the search windows), evaluations and the search windows' shape.
    """
    if recipe.allocation not in ("owl", "zero-order"):
        raise RecipeError(f"allocate_sparsity handles owl and zero-order, not {recipe.allocation!r}")
    if recipe.nm:
        raise RecipeError(f"allocation {recipe.allocation} needs unstructured sparsity (N:M fixes it per group)")
    if not 0.0 < recipe.sparsity < 1.0:
        raise RecipeError(f"allocation {recipe.allocation} needs --sparsity in (0, 1)")
    t0 = time.perf_counter()
    zo = recipe.allocation == "zero-order"
    model = open_model(model_spec, lazy=True, dequantize=True)[0]
    stats = scan_blocks(model, calib, M, release=not zo, on_progress=on_progress)
    owl = owl_allocation(stats.ratios, recipe.sparsity, lam)
    details: dict = {"method": recipe.allocation, "lam": lam, "M": M, "ratios": stats.ratios,
                     "n_params": stats.n_params}
    sparsities = owl
    if zo:
        toks = calib[:windows, :seq_len]  # [W, S'] fixed subset of the calibration windows
        pruner = WandaBlockPruner(model, stats.x_norms)
        calls: list[float] = []

        def loss_fn(s: list[float]) -> float:
            pruner.apply(s)
            calls.append(mean_nll(model, toks))
            return calls[-1]

        try:
            loss_uniform = loss_fn([recipe.sparsity] * len(owl))
            res = zero_order_allocation(loss_fn, owl, recipe.sparsity, steps=steps, eps=eps, lr=lr,
                                        seed=recipe.seed, bounds=bounds, weights=stats.n_params,
                                        on_progress=on_progress)
        finally:
            pruner.restore()
        sparsities = res.sparsities
        details.update({"owl": owl, "losses": res.history, "loss_uniform": loss_uniform, "loss_owl": calls[1],
                        "loss_best": res.best_loss, "evaluations": len(calls), "search_tokens": list(toks.shape),
                        "steps": steps, "eps": eps, "lr": lr})
    details.update({"sparsities": [float(s) for s in sparsities], "mean_sparsity": float(np.mean(sparsities)),
                    "weighted_mean_sparsity": weighted_mean(sparsities, stats.n_params),
                    "seconds": time.perf_counter() - t0})
    model = None  # the dense model is spent: drop it before the pipeline opens its own
    mx.clear_cache()
    return [float(s) for s in sparsities], details
