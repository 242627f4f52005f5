"""Question: how does a layer's quantization error move with AWQ's alpha, under AWQ's min/max proxy and under the
quantizer really used?

Answer (SmolLM2-135M, blocks 2 and 5, 4 bits): in opposite directions -- the proxy's error falls up to 46% as alpha
goes 0 -> 0.5, the clipped least-squares grid's rises 5-63% at every alpha > 0; ``awq_fold.score`` follows the latter
within a few percent, so AWQ now chooses alpha on it.
Evidence: ``evidence/benchmarks/awq_alpha-4bit.txt`` (docs/experiments.md, "AWQ's alpha").

Run: python experiments/awq_alpha.py --bits 4 --blocks 2,5 --calib-tokens 2048

For every AWQ group (``awq_fold.groups``: the linears that read one norm's or one linear's output) of the chosen
blocks of the float model, and alpha in ``--alphas``: s = mean|x|^alpha (normalised as AWQ does), the output error
sum_i ||x (Q(w_i s) / s - w_i)^T||^2 of three roundings Q, each relative to its own alpha = 0:
- ``proxy``: min/max RTN, what the AWQ reference code (and ``awq_search`` without ``final``) searches on;
- ``final``: ``awq_clip`` with the least-squares grid, the quantizer ``--method awq`` then applies;
- ``score``: the input-energy-weighted least-squares grid without the clip search (``awq_fold.score``), what the
  alpha is now chosen on.
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

    from mlx_holo import data, model as models
    from mlx_holo.pipeline import capture
    from mlx_holo.model.structure import find_module
    from mlx_holo.quant import awq_fold
    from mlx_holo.quant.awq import output_error, alpha_scales, awq_clip
    from mlx_holo.quant.rtn import quantize_rtn
    from mlx_holo.recipe import Recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--blocks", default="2,5")
    ap.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    wanted = {int(b) for b in args.blocks.split(",")}
    bits, g = args.bits, args.group_size

    model, tok = models.open_model(args.model, dequantize=True)[:2]
    calib = data.calibration_windows(tok, data.load_corpus("c4"), args.calib_tokens, args.seq_len, 0)
    x, mask = capture.block_inputs(model, calib)
    rounders = {
        "proxy": lambda w, xi: quantize_rtn(w, bits, g, fit="minmax").dequantize(),
        "final": lambda w, xi: awq_clip(w, xi, bits, g, fit="lsq").dequantize(),
        "score": awq_fold.score(Recipe(method="awq", bits=bits, group_size=g), g),
    }
    print(f"{bits}-bit g{g}, {calib.size} c4 tokens; output error relative to alpha = 0, alphas {alphas}")
    for i, block in enumerate(models.blocks(model)):
        if i > max(wanted):
            break
        y, X = capture.capture_linear_inputs(block, x, mask)
        if i in wanted:
            for _, _, paths in awq_fold.groups(block):
                ws = [find_module(block, p).weight.astype(mx.float32) for p in paths]
                xi = X[paths[0]].astype(mx.float32)
                gram, x_mean = xi.T @ xi, mx.abs(xi).mean(axis=0)
                for name, q in rounders.items():
                    t, errs = time.perf_counter(), []
                    for a in alphas:
                        s = alpha_scales(x_mean, a)
                        errs.append(sum(float(output_error(q(w * s, xi / s) / s - w, xi, gram).item()) for w in ws))
                    print(f"block {i:>2} {'+'.join(p.rsplit('.', 1)[-1] for p in paths):<24} {name:<6} "
                          + " ".join(f"{e / errs[0]:6.3f}" for e in errs) + f"  {time.perf_counter() - t:5.1f} s")
        x = y
    return 0


if __name__ == "__main__":
    sys.exit(main())
