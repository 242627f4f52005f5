"""mlx-holo eval (python -m mlx_holo.eval) --model DIR [--base M]: perplexity, KL, top-1 agreement, cos_min, determinism.

Without --base, the base recorded in DIR/evidence.json is used when present (else only PPL and determinism).
Prints a JSON object to stdout (and to --out); `mlx-holo validate` checks evidence files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..hardware import ensure_fast_blas
from .common import progress_printer, run_guarded


def main(argv=None) -> int:
    ensure_fast_blas()
    ap = argparse.ArgumentParser(prog="mlx-holo eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="compressed model folder (or any model spec)")
    ap.add_argument("--base", default=None, help="base model spec for KL/top-1/cos ('default' = embedded model)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--corpus", default="wiki", help="built-in corpus name or a text file")
    ap.add_argument("--det-windows", type=int, default=1, help="windows run twice for determinism_delta")
    ap.add_argument("--out", default=None, help="also write the metrics JSON here")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    args = ap.parse_args(argv)
    return run_guarded(lambda: _main(args), args.debug)


def recorded_base(ev: dict, ev_path: Path) -> str | None:
    """The base model an evidence file names, checked against its recorded hash (a different model at that path
    would be scored silently otherwise); a relative path (older evidence) is tried from the working folder."""
    from ..model.files import ModelError, model_hash

    rec = ev.get("model") if isinstance(ev.get("model"), dict) else {}
    path, want = rec.get("path"), rec.get("hash")
    if not isinstance(path, str) or not path:
        return None
    if not Path(path).is_dir():
        raise ModelError(f"the base recorded in {ev_path} ({path}) is not a folder here; pass --base")
    if want and model_hash(Path(path)) != want:
        raise ModelError(f"the base recorded in {ev_path} ({path}) is not the model it was compressed from (its "
                         "hash differs); pass --base to score against another model")
    return path


def _main(args) -> int:
    from .. import evidence
    from ..evaluation import evaluate

    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise FileExistsError(f"cannot write {args.out}: its folder {Path(args.out).resolve().parent} does not exist")
    base = args.base
    ev_path = Path(args.model) / "evidence.json"
    if base is None and ev_path.exists():
        base = recorded_base(evidence.load(ev_path), ev_path)
    res = evaluate(args.model, base, eval_tokens=args.eval_tokens, seq_len=args.seq_len, corpus=args.corpus,
                   det_windows=args.det_windows, on_progress=progress_printer())
    res["base"] = base
    res["command"] = " ".join(sys.orig_argv)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
