"""mlx-holo plan (python -m mlx_holo.plan): memory need (weights + KV cache) and a recipe for a target memory."""
from __future__ import annotations

import argparse
import json
import sys

from ..plan import DEFAULT_USABLE_FRACTION, PlanError, format_plan, load_config, plan
from ..preflight import compress_memory
from .common import EXIT_BAD_INPUT, run_guarded


def main(argv: list[str] | None = None) -> int:
    return run_guarded(lambda: _main(argv))


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="mlx-holo plan", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="config.json, a model folder, or 'default'")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--target-gb", type=float, default=None, help="unified memory of the target Mac (GiB)")
    ap.add_argument("--kv-bits", type=int, default=16, choices=(16, 8, 4))
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--usable-fraction", type=float, default=DEFAULT_USABLE_FRACTION,
                    help="share of unified memory the GPU may wire (macOS default ~0.75; 0.67 on small Macs)")
    ap.add_argument("--min-uniform-bits", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print the PlanResult as JSON")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.model)
        res = plan(config, context=args.context, batch=args.batch, target_gb=args.target_gb,
                   kv_bits=args.kv_bits, group_size=args.group_size, usable_fraction=args.usable_fraction,
                   min_uniform_bits=args.min_uniform_bits, model=args.model)
        memory = compress_memory(config)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(dict(res.to_dict(), compress_memory=memory), indent=2))
    else:
        print(format_plan(res))
        for name, est in memory.items():
            print(f"compressing with {name} needs about {est['peak_bytes'] / 1e9:.1f} GB at its peak "
                  f"({est['peak_phase']}; the pre-flight's estimate, `compress --max-memory-gb` sets the limit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
