"""mlx-holo tune: end-to-end KL tuning of a compressed folder's scales/biases (codes frozen), saved as a new folder.

Example: mlx-holo tune --model runs/gptq3 --steps 20 --batch 4 --lr 1e-4 --out runs/gptq3-e2e20
The same stage as ``compress ... --e2e-steps``, on an existing folder: ``--calib-tokens`` calibration tokens in
windows of ``--seq-len`` (a quarter held out decides whether the tuning is kept), then the tuned model is scored on
``--eval-tokens`` tokens against the base. Without --out nothing is written.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..hardware import ensure_fast_blas
from .common import progress_printer, run_guarded


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlx-holo tune", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="compressed folder (mlx-lm layout, affine quantized layers)")
    ap.add_argument("--base", default="default", help="the float model it was compressed from")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-5, help="learning rate, relative to each tensor's RMS")
    ap.add_argument("--batch", type=int, default=1, help="calibration windows per step")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--calib-corpus", default="c4")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="0 skips scoring")
    ap.add_argument("--eval-corpus", default="wiki")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="save the tuned model here (when the tuning was kept)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    return ap


def main(argv=None) -> int:
    ensure_fast_blas()
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _main(args), args.debug)


def _main(args) -> int:
    from .. import data
    from ..evaluation import compare
    from ..model.open import open_model
    from ..model.save import save_replaced
    from ..recipe import RecipeError
    from ..tune.e2e import tune_folder

    if args.steps < 1 or args.lr <= 0 or args.batch < 1:
        raise RecipeError(f"--steps and --batch must be >= 1 and --lr > 0, got {args.steps}, {args.batch}, {args.lr}")
    tok = open_model(args.model, lazy=True)[1]
    base = open_model(args.base)[0]
    calib = data.calibration_windows(tok, data.load_corpus(args.calib_corpus), args.calib_tokens, args.seq_len,
                                     args.seed)
    rep, tensors, m = tune_folder(args.model, base, calib, steps=args.steps, lr=args.lr, batch=args.batch,
                                  seed=args.seed, on_progress=progress_printer())
    print(f"{args.model}: {rep['linears']} quantized linears, {rep['embeddings']} quantized tables, "
          f"{rep['windows']} calibration windows", file=sys.stderr)
    print(f"held-out calibration KL {rep['heldout_kl_before']:.4f} -> {rep['heldout_kl_after']:.4f} "
          f"(kept: {rep['kept']}), {rep['seconds']:.0f} s", file=sys.stderr)
    if args.out and tensors:
        save_replaced(args.model, args.out, tensors, overwrite=args.overwrite)
        rep["saved"] = args.out
    if args.eval_tokens > 0:
        wins = data.text_windows(tok, data.load_corpus(args.eval_corpus), args.eval_tokens, args.seq_len)
        rep["metrics"] = compare(m, base, wins, det_windows=0).to_dict()
    print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
