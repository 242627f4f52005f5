"""Does end-to-end KL tuning of the scales/biases (codes frozen, quant/e2e_qp.py) help a compressed model?

Run: python benchmarks/e2e_tune.py --model runs/e-gptq3-qep05-d1 --steps 20 --lr 3e-5 --out runs/e-gptq3-e2e

``--model``: a compressed folder (any affine bits). Calibration: ``--calib-tokens`` c4 tokens in windows of
``--seq-len`` (a quarter held out to decide whether the tuning is kept); scoring: ``--eval-tokens`` wiki tokens
against the base model, before and after.
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

    from mlx_holo import data, evaluate, models
    from mlx_holo.compress import progress_printer
    from mlx_holo.quant.e2e_qp import swap_code_linears, to_float, tune_kl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="compressed folder (mlx-lm layout)")
    ap.add_argument("--base", default="default")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="save the tuned model here (when the tuning was kept); score it with "
                                               "python -m mlx_holo.eval --model OUT --base default")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    m, tok, _, _ = models.open_model(args.model, dequantize=False)
    code = swap_code_linears(m)
    models.dequantize_model(m)  # anything still quantized (a tied table): float, fixed
    models.cast_floats(m, mx.float32)
    base = models.open_model(args.base)[0]
    calib = data.calibration_windows(tok, data.load_corpus("c4"), args.calib_tokens, args.seq_len, args.seed)
    wins = data.windows(data.tokenize(tok, data.load_corpus("wiki"), args.eval_tokens), args.seq_len)
    print(f"{args.model}: {len(code)} quantized linears, {calib.shape[0]} calibration windows")
    t = time.perf_counter()
    res = tune_kl(m, base, code, calib, steps=args.steps, lr=args.lr, seed=args.seed, on_progress=progress_printer())
    tuned_s = time.perf_counter() - t
    k = max(1, len(res.losses) // 10)
    print(f"training KL, first/last {k} steps: {sum(res.losses[:k]) / k:.4f} -> {sum(res.losses[-k:]) / k:.4f}")
    print(f"held-out calibration KL {res.kl_before:.4f} -> {res.kl_after:.4f} (kept: {res.kept}), {tuned_s:.0f} s")
    tuned = to_float(m, code)
    if args.out and res.kept:
        models.save_replaced(args.model, args.out, {f"{p}.{k}": getattr(q, k) for p, q in tuned.items()
                                                    for k in ("scales", "biases")}, overwrite=args.overwrite)
        print(f"saved {args.out}")
    r = evaluate.compare(m, base, wins, det_windows=0)
    print(f"tuned   ppl {r.ppl:8.3f}  kl {r.kl:.4f}  top1 {r.top1:.4f}  (base {r.base_ppl:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
