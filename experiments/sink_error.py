"""Question: where do the plain-rounding grids differ? Output error of each linear on the attention-sink token vs
the other tokens.

Answer (SmolLM2-135M, 3 bits): on the sink token's value projection -- its output error is 1.48x the mlx grid's with
the free lsq grid and 0.95x with zlsq (0 kept on the grid), which is why ``--fit auto`` takes zlsq for plain
rounding at <= 3 bits.
Evidence: docs/experiments.md, "grid fit" (printed by this script).

Run: python experiments/sink_error.py --bits 3 --calib-tokens 2048

For every linear of the float model (``pipeline_scan.scan``: unmodified inputs), RTN at ``--bits``/``--group-size`` with
each grid rule (``rtn.FITS``), and the mean squared output error ||(Q - W) x||^2 on the first token of each window
(the attention sink) and on all other tokens. Prints, per linear type, the error of each fit relative to the mlx
grid's, averaged over the blocks. This is the measurement behind ``layer.grid_fit``'s note on zlsq.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_holo.hardware import ensure_fast_blas  # noqa: E402

ensure_fast_blas()


def main(argv=None) -> int:
    import numpy as np

    from mlx_holo import data, model as models
    from mlx_holo.pipeline import scan as pipeline_scan
    from mlx_holo.quant.rtn import quantize_rtn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--fits", default="mlx,lsq,zlsq")
    args = ap.parse_args(argv)
    fits = args.fits.split(",")

    model, tok, _, _ = models.open_model(args.model, lazy=True)
    calib = data.calibration_windows(tok, data.load_corpus("c4"), args.calib_tokens, args.seq_len, 0)
    rows = []

    def fn(i, path, w, X):  # w [out, in], X [N*S, in]
        Xs = X.reshape(-1, args.seq_len, X.shape[-1])
        sink, rest = Xs[:, 0], Xs[:, 1:].reshape(-1, X.shape[-1])
        r = {}
        for f in fits:
            d = quantize_rtn(w, args.bits, args.group_size, fit=f).dequantize() - w
            r[f] = (float(((sink @ d.T) ** 2).sum(1).mean().item()), float(((rest @ d.T) ** 2).sum(1).mean().item()))
        rows.append((path.rsplit(".", 1)[-1], r))

    pipeline_scan.scan(model, calib, fn)
    agg = collections.defaultdict(list)
    for kind, r in rows:
        agg[kind].append([r[f][k] / r["mlx"][k] for k in (0, 1) for f in fits])
    print(f"{args.bits}-bit g{args.group_size}, {calib.size} c4 tokens; output error relative to the mlx grid, "
          "mean over blocks")
    print(f"{'linear':<10} " + " ".join(f"{'sink ' + f:>10}" for f in fits) + " " +
          " ".join(f"{'rest ' + f:>10}" for f in fits))
    for kind, v in agg.items():
        print(f"{kind:<10} " + " ".join(f"{x:>10.3f}" for x in np.mean(v, axis=0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
