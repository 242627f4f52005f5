"""Does end-to-end KL tuning of the scales/biases (codes frozen, quant/e2e_qp.py) help a compressed model?

Run: python benchmarks/e2e_tune.py --model runs/e-gptq3-qep05-d1 --steps 20 --lr 3e-5 --out runs/e-gptq3-e2e
(the same step as ``python -m mlx_holo.compress ... --e2e-steps 20 --e2e-lr 3e-5``, on an existing folder)

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
    from mlx_holo import data, evaluate, models
    from mlx_holo.compress import e2e_tune, progress_printer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="compressed folder (mlx-lm layout)")
    ap.add_argument("--base", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--batch", type=int, default=1, help="calibration windows per step")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="save the tuned model here (when the tuning was kept); score it with "
                                               "python -m mlx_holo.eval --model OUT --base default")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    tok = models.open_model(args.model, lazy=True)[1]
    base = models.open_model(args.base)[0]
    calib = data.calibration_windows(tok, data.load_corpus("c4"), args.calib_tokens, args.seq_len, args.seed)
    wins = data.windows(data.tokenize(tok, data.load_corpus("wiki"), args.eval_tokens), args.seq_len)
    rep, tensors, m = e2e_tune(args.model, base, calib, steps=args.steps, lr=args.lr, batch=args.batch,
                               seed=args.seed, on_progress=progress_printer())
    print(f"{args.model}: {rep['linears']} quantized linears, {rep['embeddings']} quantized tables, {rep['windows']} "
          "calibration windows")
    print(f"training KL, first/last tenth of the steps: {rep['train_kl_first']:.4f} -> {rep['train_kl_last']:.4f}")
    print(f"held-out calibration KL {rep['heldout_kl_before']:.4f} -> {rep['heldout_kl_after']:.4f} "
          f"(kept: {rep['kept']}), {rep['seconds']:.0f} s")
    if args.out and tensors:
        models.save_replaced(args.model, args.out, tensors, overwrite=args.overwrite)
        print(f"saved {args.out}")
    r = evaluate.compare(m, base, wins, det_windows=0)
    print(f"tuned   ppl {r.ppl:8.3f}  kl {r.kl:.4f}  top1 {r.top1:.4f}  (base {r.base_ppl:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
