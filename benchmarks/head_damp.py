"""How much does the tied output table cost, and which GPTQ damping of the head is best? A sweep over one model.

Run: python benchmarks/head_damp.py --model runs/e-gptq3-qep05-d1 --bits 3 --damps 0.01,0.03,0.1,0.3,1

``--model``: a compressed folder whose embedding was kept in float (``--no-quantize-embeddings``), so the blocks are
already quantized. The head's calibration inputs are the final-norm outputs of that model on ``--calib-tokens`` c4
tokens (``pipeline.forward_head_inputs``, as the pipeline sees them after its last block);
the tied table is then quantized at ``--bits`` by RTN (the default grid rule for plain rounding) and by the pipeline's
head GPTQ (``pipeline.gptq_head``) on H = X^T X / n at each damping, and every variant is scored against the base model on ``--eval-tokens`` wiki tokens.
This is the measurement behind ``Recipe.head_damp``'s default.
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

    from mlx_holo import data, evaluate, models, pipeline
    from mlx_holo.pipeline import grid_fit
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
    args = ap.parse_args(argv)

    m, tok, _, _ = models.open_model(args.model)
    table = next((mod for _, mod in m.named_modules() if isinstance(mod, nn.Embedding)), None)
    if table is None or hasattr(m, "lm_head"):
        raise SystemExit("needs a model whose output head is its (tied) embedding table")
    base = models.open_model(args.base)[0]
    calib = data.calibration_windows(tok, data.load_corpus("c4"), args.calib_tokens, args.seq_len, 0)
    H = pipeline.hessian(pipeline.forward_head_inputs(m, calib, release=False))  # [D, D]
    mx.eval(H)
    E = table.weight.astype(mx.float32)
    mx.eval(E)
    wins = data.windows(data.tokenize(tok, data.load_corpus("wiki"), args.eval_tokens), args.seq_len)
    recipe = Recipe(bits=args.bits, group_size=args.group_size)
    rtn_fit = grid_fit(recipe, args.bits, compensated=False)
    variants = [("float", None), (f"rtn ({rtn_fit})", None)] + [(f"gptq damp {d:g}", d)
                                                                  for d in map(float, args.damps.split(","))]
    print(f"{args.model}: tied table {tuple(E.shape)} at {args.bits} bits, group {args.group_size}")
    for name, damp in variants:
        t = time.perf_counter()
        if name == "float":
            W = E
        elif damp is None:
            W = quantize_rtn(E, args.bits, args.group_size, fit=rtn_fit).dequantize()
        else:
            recipe.head_damp = damp
            W = pipeline.gptq_head(E, H, args.bits, args.group_size, recipe).dequantize()
        table.weight = W
        mx.eval(table.weight)
        r = evaluate.compare(m, base, wins, det_windows=0)
        print(f"{name:<16} ppl {r.ppl:8.3f}  kl {r.kl:.4f}  top1 {r.top1:.4f}  ({time.perf_counter() - t:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
