"""Question: how much memory do the [in, in] steps of a wide linear take -- QEP's correction matrix M = D (H +
damp I)^-1 and GPTQ's Hessian factor -- before and after they were made in place and by blocks of rows
(``quant.qep.qep_matrix``, ``quant.gptq.hessian_factor``)?

Answer (n = 8192, 1024 tokens; each way in its own process, peak resident memory above the inputs, in float64
copies of [in, in]):
- QEP (``evidence/experiments/qep_memory-8192.json``, ``--what qep``): the earlier way (H and D in float32 in MLX
  and float64 in NumPy, the damping's identity matrix, a general solve's copies of both) 5.95 copies (3.2 GB); H
  factorised in place and M solved 1024 rows of D at a time into a float32 result, 1.91 (1.02 GB); M equal in all
  but 4 of 67M entries, those within 4e-9 of M's largest. For Llama-3-8B's 14336-wide down_proj about 9.8 -> 3.1 GB.
- GPTQ's factor (``evidence/experiments/factor_memory-8192.json``, ``--what factor``): the earlier way (a float64
  copy of H, then its permuted copy made while it was held, then the float32 cast of the factor) 1.88 copies; the
  float64 copy made already permuted a block of rows at a time, 1.53 (the float64 factor and its float32 cast); the
  factor equal to the bit. For the 14336-wide down_proj about 3.1 -> 2.5 GB.
Seconds are not compared: the runs were beside other jobs.

Run: python experiments/wide_memory.py --what qep|factor --n 8192 --json FILE
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def earlier_factor(H, damp: float):
    """The previous quant.gptq.hessian_factor's steps, kept here for the comparison -> U float32."""
    from mlx_holo.quant.gptq import inverse_cholesky

    Hn = np.array(H, dtype=np.float64)
    diag = np.diag(Hn).copy()
    dead = diag == 0
    Hn[dead, dead] = 1.0
    diag[dead] = 1.0
    perm = np.argsort(-diag, kind="stable")
    Hn = Hn[np.ix_(perm, perm)]
    return inverse_cholesky(Hn, damp, overwrite=True).astype(np.float32)


def earlier(x_float, x_quant, damp: float):
    """The previous quant.qep.propagation_stats + qep_matrix, kept here for the comparison."""
    import mlx.core as mx

    xq = x_quant.astype(mx.float32)
    n = xq.shape[0]
    H = (xq.T @ xq) / n
    D = ((x_float.astype(mx.float32) - xq).T @ xq) / n
    Hn = np.array(H, dtype=np.float64)
    Dn = np.array(D, dtype=np.float64)
    diag = np.diag(Hn).copy()
    dead = diag == 0
    Hn[dead, dead] = 1.0
    Hn += damp * float(np.mean(diag)) * np.eye(Hn.shape[0])
    M = np.linalg.solve(Hn, Dn.T).T
    M[:, dead] = 0.0
    return mx.array(M.astype(np.float32))


def child(what: str, variant: str, n: int, tokens: int, out: str) -> None:
    import mlx.core as mx

    from mlx_holo.hardware import peak_rss
    from mlx_holo.quant.gptq import hessian_factor
    from mlx_holo.quant.qep import qep_matrix

    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, n)).astype(np.float32)
    x[:, : n // 100] *= 30.0  # a few outlier channels
    xq = x + 0.05 * rng.standard_normal((tokens, n)).astype(np.float32)
    X, Xq = mx.array(x), mx.array(xq)
    mx.eval(X, Xq)
    del x, xq
    if what == "factor":  # GPTQ's input: H of the compressed stream, as the pipeline hands it (MLX float32)
        H = (Xq.T @ Xq) / tokens
        mx.eval(H)
        del X, Xq
    base = peak_rss()
    t0 = time.perf_counter()
    if what == "factor":
        M = earlier_factor(H, 0.01) if variant == "earlier" else hessian_factor(H, 0.01, True).U
    else:
        M = earlier(X, Xq, 1.0) if variant == "earlier" else qep_matrix(X, Xq, 1.0)
        mx.eval(M)
    s = time.perf_counter() - t0
    np.save(out, np.array(M))
    print(json.dumps({"variant": variant, "peak_above_inputs_mb": (peak_rss() - base) / 1e6, "seconds": s}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=("qep", "factor"), default="qep")
    ap.add_argument("--n", type=int, default=8192, help="input width (14336: Llama-3-8B's down_proj)")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.what, args.child, args.n, args.tokens, args.out)
    rows, Ms = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in ("earlier", "in-place"):
            out = str(Path(tmp) / f"{v}.npy")
            r = subprocess.run([sys.executable, __file__, "--what", args.what, "--child", v, "--n", str(args.n),
                                "--tokens", str(args.tokens), "--out", out], capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            Ms[v] = np.load(out)
    matrix_mb = args.n * args.n * 8 / 1e6
    res = {"what": args.what, "n": args.n, "tokens": args.tokens, "float64_matrix_mb": matrix_mb,
           "rows": [dict(r, float64_copies=r["peak_above_inputs_mb"] / matrix_mb) for r in rows],
           "max_abs_diff": float(np.abs(Ms["earlier"] - Ms["in-place"]).max()),
           "max_abs_M": float(np.abs(Ms["earlier"]).max()),
           "equal_entries": float(np.mean(Ms["earlier"] == Ms["in-place"])),
           "command": " ".join(sys.orig_argv)}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
