"""mlx-holo bench (python -m mlx_holo.bench): speed, memory and bandwidth utilisation across bit-widths."""
from __future__ import annotations

import argparse
import json
import sys

from ..bench import chart, run_bench, table
from ..hardware import ensure_fast_blas
from .common import EXIT_BAD_INPUT, progress_printer, run_guarded


def main(argv=None) -> int:
    ensure_fast_blas()
    return run_guarded(lambda: _main(argv))


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="mlx-holo bench", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--bits", default="16,8,6,4,3,2", help="comma list; 16 = float16 weights")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--peak-gbps", type=float, default=None, help="override the peak bandwidth")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--no-chart", dest="chart", action="store_false")
    args = ap.parse_args(argv)
    from ..model.files import ModelError

    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        print(f"error: --bits must be a comma list of integers, got {args.bits!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.prompt_tokens < 1 or args.gen_tokens < 1:
        print("error: --prompt-tokens and --gen-tokens must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.group_size not in (32, 64, 128):
        print(f"error: --group-size must be 32, 64 or 128, got {args.group_size}", file=sys.stderr)
        return EXIT_BAD_INPUT
    bad = [b for b in bits if b not in (2, 3, 4, 5, 6, 8, 16)]
    if bad:
        print(f"error: unsupported bits {bad}; choose from 2,3,4,5,6,8,16", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        res = run_bench(args.model, bits, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                        group_size=args.group_size, peak_gbps=args.peak_gbps, on_progress=progress_printer())
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(table(res))
    if args.chart:
        print(chart(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
