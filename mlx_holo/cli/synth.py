"""mlx-holo synth: write a synthetic checkpoint of a real model's shape (random weights with outlier channels), for
trying the scale of a run before downloading anything.

Example: mlx-holo synth --preset llama3-8b --out runs/synth-8b   (about 16 GB of bf16; --layers 4 for a short one)
"""
from __future__ import annotations

import argparse
import json
import sys

from .common import progress_printer, run_guarded


def main(argv=None) -> int:
    from ..model.synthetic import PRESETS

    ap = argparse.ArgumentParser(prog="mlx-holo synth", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="the real shape to copy")
    ap.add_argument("--layers", type=int, default=None, help="number of blocks (default: the model's)")
    ap.add_argument("--out", help="new folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0, help="bf16 bytes per shard file")
    ap.add_argument("--tokenizer-from", default=None, help="folder to copy tokenizer files from (default: the "
                    "embedded model's)")
    ap.add_argument("--list", action="store_true", help="list the presets with their sizes and exit")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    return run_guarded(lambda: _main(args, ap), args.debug)


def _main(args, ap) -> int:
    from ..model.synthetic import PRESETS, describe, preset, write_synthetic

    if args.list:
        for name in sorted(PRESETS):
            d = describe(PRESETS[name])
            print(f"{name:14s} {d['model_type']:8s} {d['num_hidden_layers']:3d} blocks  {d['n_params'] / 1e9:6.2f} B "
                  f"params  {d['bf16_bytes'] / 1e9:6.1f} GB bf16")
        return 0
    if not args.preset or not args.out:
        ap.error("--preset and --out are required (or --list)")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be >= 1")
    cfg = preset(args.preset, args.layers)
    out = write_synthetic(args.out, cfg, seed=args.seed, tokenizer_from=args.tokenizer_from,
                          shard_bytes=int(args.shard_gb * 2**30), on_progress=progress_printer())
    print(json.dumps(dict(describe(cfg), out=str(out)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
