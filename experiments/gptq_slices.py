"""Question: how much of GPTQ's time on a wide matrix went to work repeated per slice of rows -- H's O(in^3) inverse
factor, made again for every slice (an LM head is GPTQ'd in 4M-weight slices: ~94 of them for a 3B-shaped
128k-row head), and the refit's two extra [out, in] x H products per row chunk?

Answer (2-core x86, OpenBLAS; `python experiments/gptq_slices.py` alternately on the code before and after the
change, beside the test suite, so the seconds are noisy: evidence/experiments/gptq_slices.json): the same codes and
refit parameters to the last bit; a 5460 x 3072 matrix in 4 slices factorised H once instead of 4 times (32-62 s
before, 17-36 s after), a 256 x 8192 layer's refit took 24-25 s before and 9-18 s after. On a 2-block 3B-shaped
checkpoint GPTQ with 1024 tokens went from 780 s (beside other jobs) to 590 s with all 50 output tensors equal bit
for bit (evidence/distributed/llama3.2-3b-2blocks-gptq4.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-in", type=int, default=3072, help="input width of the sliced matrix (a 3B head's)")
    ap.add_argument("--rows", type=int, default=5460)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--refit-in", type=int, default=8192, help="input width of the refit layer (a 3B down_proj's)")
    ap.add_argument("--refit-rows", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from mlx_holo.hardware import ensure_fast_blas
    ensure_fast_blas()
    import mlx.core as mx
    import numpy as np

    from mlx_holo.quant import gptq

    rng = np.random.default_rng(0)

    def hessian(n):
        x = (rng.standard_normal((2048, n)) * np.exp(0.5 * rng.standard_normal((1, n)))).astype(np.float32)
        return x.T @ x / 2048

    H = hessian(args.n_in)
    w = mx.array((rng.standard_normal((args.rows, args.n_in)) * 0.02).astype(np.float32))
    calls = []
    real = gptq.inverse_cholesky
    gptq.inverse_cholesky = lambda *a, **k: calls.append(1) or real(*a, **k)
    gptq.CHUNK_ELEMENTS = -(-args.rows // args.slices) * args.n_in
    t0 = time.perf_counter()
    q = gptq.gptq_quantize(w, mx.array(H), 4, 64, damp=0.1)
    mx.eval(q.codes)
    sliced_s = time.perf_counter() - t0
    gptq.inverse_cholesky = real

    Hr = hessian(args.refit_in).astype(np.float64)
    wr = mx.array((rng.standard_normal((args.refit_rows, args.refit_in)) * 0.02).astype(np.float32))
    qr = gptq.gptq_quantize(wr, mx.array(Hr.astype(np.float32)), 4, 64, refit=False)
    t0 = time.perf_counter()
    s, b = gptq.refit_params(wr, Hr, qr.codes, qr.scales, qr.biases, 64)
    mx.eval(s, b)
    refit_s = time.perf_counter() - t0
    row = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=gptq.__file__.rsplit("/mlx_holo/", 1)[0]).stdout.strip(),
           "sliced_shape": [args.rows, args.n_in], "slices": args.slices, "factorisations": len(calls),
           "sliced_s": round(sliced_s, 2), "codes_sum": int(np.asarray(q.codes, np.int64).sum()),
           "refit_shape": [args.refit_rows, args.refit_in], "refit_s": round(refit_s, 2),
           "refit_scale_sum": float(np.asarray(s, np.float64).sum()), "command": " ".join(sys.argv)}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
