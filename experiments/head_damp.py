"""Question: how much does the tied output table cost, and which GPTQ damping of the head is best?

Answer (SmolLM2-135M over GPTQ 3-bit linears): RTN 33.38, GPTQ with damping 0.1 25.78, the best of 0.01-1 (the
default ``--head-damp``); at 4 bits 80% of the table's KL cost is on the head side; GuidedQuant's output-weighted
Hessians lose (4 bits 18.24 vs 18.17, 3 bits 26.14 vs 25.78).
Evidence: docs/experiments.md, "the tied table" (2048 wiki tokens; the runs are printed, not stored).

Run: python experiments/head_damp.py --model runs/e-gptq3-qep05-d1 --bits 3 --damps 0.01,0.03,0.1,0.3,1

``--model``: a compressed folder whose embedding was kept in float (``--no-quantize-embeddings``), so the blocks are
already quantized. The head's calibration inputs are the final-norm outputs of that model on ``--calib-tokens`` c4
tokens (``head.forward_head_inputs``, as the pipeline sees them after its last block);
the tied table is then quantized at ``--bits`` by RTN (the default grid rule for plain rounding) and by the pipeline's
head GPTQ (``head.gptq_head``) on H = X^T X / n at each damping, and every variant is scored against the base model on ``--eval-tokens`` wiki tokens.
This is the measurement behind ``Recipe.head_damp``'s default.

``--guided kl|fisher`` adds one more variant: GPTQ on output-weighted Hessians (GuidedQuant, Kim et al. 2025,
"GuidedQuant: Large Language Model Quantization via Exploiting End Loss Guidance", arXiv:2505.07004). Row v of the
head (token v's logit) has its own loss Hessian sum_t w[t, v] x_t x_t^T, with w the per-logit weight of the loss's
quadratic form: the float head's probability p[t, v] (the diagonal of KL's Hessian) for ``kl``, the squared
gradient of the next-token loss (p[t, v] - [v = y_t])^2 for ``fisher`` (GuidedQuant's). As in GuidedQuant the rows
share a Hessian per group (``--guided-groups`` groups, here of rows sorted by their total weight), each normalised
by its trace and mixed with the plain H (``--guided-mix``, the plain share), at the default head damping.
``--split`` also scores each quantized table on the head side only (the lookups read the float table): how much of
the table's cost is the output head's (4 bits: 80% of its KL).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_holo.hardware import ensure_fast_blas  # noqa: E402

ensure_fast_blas()


def main(argv=None) -> int:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    from mlx_holo import data, model as models
    from mlx_holo.evaluation import compare
    from mlx_holo.pipeline import capture, head
    from mlx_holo.pipeline.layer import grid_fit
    from mlx_holo.quant.rtn import quantize_rtn
    from mlx_holo.recipe import Recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="compressed folder with a float (tied) embedding")
    ap.add_argument("--base", default="default")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damps", default="0.01,0.03,0.1,0.3,1")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--split", action="store_true", help="also score each table with float lookups (head side only)")
    ap.add_argument("--guided", choices=("none", "kl", "fisher"), default="none")
    ap.add_argument("--guided-groups", type=int, default=32)
    ap.add_argument("--guided-mix", type=float, default=0.5)
    args = ap.parse_args(argv)

    m, tok, _, _ = models.open_model(args.model)
    path, table = next(((p, mod) for p, mod in m.named_modules() if isinstance(mod, nn.Embedding)), (None, None))
    if table is None or hasattr(m, "lm_head"):
        raise SystemExit("needs a model whose output head is its (tied) embedding table")
    base = models.open_model(args.base)[0]
    calib = data.calibration_windows(tok, data.load_corpus("c4"), args.calib_tokens, args.seq_len, 0)
    X = head.forward_head_inputs(m, calib, release=False)  # [n, D]
    H = capture.hessian(X)  # [D, D]
    mx.eval(X, H)
    E = table.weight.astype(mx.float32)
    mx.eval(E)
    wins = data.text_windows(tok, data.load_corpus("wiki"), args.eval_tokens, args.seq_len)
    recipe = Recipe(bits=args.bits, group_size=args.group_size)
    rtn_fit = grid_fit(recipe, args.bits, compensated=False)
    variants = [("float", None), (f"rtn ({rtn_fit})", None)] + [(f"gptq damp {d:g}", d)
                                                                  for d in map(float, args.damps.split(","))]
    if args.guided != "none":
        variants.append((f"guided {args.guided}", "guided"))
    print(f"{args.model}: tied table {tuple(E.shape)} at {args.bits} bits, group {args.group_size}")
    for name, damp in variants:
        t = time.perf_counter()
        if name == "float":
            W = E
        elif damp == "guided":
            recipe.head_damp = Recipe().head_damp
            W = guided_head(E, X, H, calib, args.guided, args.guided_groups, args.guided_mix, args.bits,
                            args.group_size, recipe)
        elif damp is None:
            W = quantize_rtn(E, args.bits, args.group_size, fit=rtn_fit).dequantize()
        else:
            recipe.head_damp = damp
            W = head.gptq_head(E, H, args.bits, args.group_size, recipe).dequantize()
        table.weight = W
        mx.eval(table.weight)
        r = compare(m, base, wins, det_windows=0)
        print(f"{name:<16} ppl {r.ppl:8.3f}  kl {r.kl:.4f}  top1 {r.top1:.4f}  ({time.perf_counter() - t:.0f} s)",
              flush=True)
        if args.split and name != "float":
            m.update_modules(tree_unflatten([(path, head_only_table(E, W))]))
            r = compare(m, base, wins, det_windows=0)
            print(f"{'  head side only':<16} ppl {r.ppl:8.3f}  kl {r.kl:.4f}  top1 {r.top1:.4f}", flush=True)
            m.update_modules(tree_unflatten([(path, table)]))
    return 0


def head_only_table(lookup, head):
    """An embedding whose lookups read ``lookup`` [V, D] and whose tied head (``as_linear``) reads ``head``."""
    import mlx.nn as nn

    class HeadOnly(nn.Embedding):
        def __init__(self):
            super().__init__(*lookup.shape)
            self.weight, self.head = lookup, head

        def as_linear(self, x):
            return x @ self.head.T

    return HeadOnly()


def guided_head(E, X, H, calib, weight: str, groups: int, mix: float, bits: int, group_size: int, recipe):
    """E [V, D] tied table, X [n, D] head inputs of calib [N, S], H [D, D] their plain Hessian -> E's GPTQ on
    per-row-group guided Hessians, dequantized [V, D] (module docstring)."""
    import mlx.core as mx
    import numpy as np

    from mlx_holo.pipeline import head

    V = E.shape[0]
    y = mx.concatenate([calib[:, 1:], mx.full((calib.shape[0], 1), -1)], axis=1).reshape(-1)  # [n]; -1: none
    chunks, mass = [], mx.zeros((V,))
    for i in range(0, X.shape[0], 512):
        p = mx.softmax(X[i:i + 512] @ E.T, axis=-1)  # [c, V]
        w = p if weight == "kl" else (p - (mx.arange(V)[None] == y[i:i + 512, None])) ** 2
        mass = mass + w.sum(axis=0)
        mx.eval(w, mass)
        chunks.append(w)
    rank = np.empty(V, np.int64)
    rank[np.argsort(-np.array(mass))] = np.arange(V)
    grp = np.minimum(rank // (V // groups), groups - 1)  # [V] group of each row
    onehot = mx.array((grp[:, None] == np.arange(groups)[None]).astype(np.float32))  # [V, G]
    WG = mx.concatenate([w @ onehot for w in chunks], axis=0)  # [n, G] each position's weight per group
    del chunks
    H = H / mx.trace(H)
    out = mx.zeros_like(E)
    for k in range(groups):
        rows = mx.array(np.nonzero(grp == k)[0])
        Hk = (X * WG[:, k:k + 1]).T @ X  # [D, D]
        Hk = (1 - mix) * Hk / mx.trace(Hk) + mix * H
        out = out.at[rows].add(head.gptq_head(E[rows], Hk, bits, group_size, recipe).dequantize())
        mx.eval(out)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
