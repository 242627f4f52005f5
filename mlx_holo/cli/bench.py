"""mlx-holo bench (python -m mlx_holo.bench): speed, memory and bandwidth utilisation of saved folders and of a
bit-width sweep."""
from __future__ import annotations

import argparse
import json
import sys

from ..bench import DEFAULT_SWEEP, chart, run_bench, save_png, table
from ..hardware import ensure_fast_blas
from .common import EXIT_BAD_INPUT, progress_printer, run_guarded


def main(argv=None) -> int:
    ensure_fast_blas()
    return run_guarded(lambda: _main(argv))


def _bits(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of integers, got {text!r}") from None


def _main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="mlx-holo bench", description=__doc__.splitlines()[0],
        epilog="With neither folders nor --sweep: the sweep 16,8,6,4,3,2 of --model. 16 = float weights (float32 on "
               "a CPU).")
    ap.add_argument("folders", nargs="*", metavar="DIR", help="model folders (compress / mlx_lm.convert output)")
    ap.add_argument("--sweep", "--bits", dest="sweep", type=_bits, default=None,
                    help="comma list of bit-widths to quantize --model to in memory (MLX's quantizer), e.g. 16,8,4")
    ap.add_argument("--model", default="default", help="the model of the sweep (default: the embedded model)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64, help="the sweep's group size")
    ap.add_argument("--peak-gbps", type=float, default=None, help="override the peak bandwidth")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--png", default=None, help="write the chart here (needs matplotlib: mlx-holo[plot])")
    ap.add_argument("--no-chart", dest="chart", action="store_false", help="no terminal chart")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_BAD_INPUT if e.code else 0
    from ..model.files import ModelError

    sweep = args.sweep if args.sweep is not None else ([] if args.folders else list(DEFAULT_SWEEP))
    if args.prompt_tokens < 1 or args.gen_tokens < 1:
        print("error: --prompt-tokens and --gen-tokens must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.group_size not in (32, 64, 128):
        print(f"error: --group-size must be 32, 64 or 128, got {args.group_size}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.peak_gbps is not None and not args.peak_gbps > 0:
        print(f"error: --peak-gbps must be > 0, got {args.peak_gbps}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.png:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of timing, not after)
        except ImportError:
            print("error: --png needs matplotlib: pip install 'mlx-holo[plot]'", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        res = run_bench(args.model, sweep, folders=args.folders, prompt_tokens=args.prompt_tokens,
                        gen_tokens=args.gen_tokens, group_size=args.group_size, peak_gbps=args.peak_gbps,
                        on_progress=progress_printer())
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(table(res))
    if args.chart:
        print(chart(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.png:
        print(f"chart: {save_png(res, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
