"""mlx-holo compress (python -m mlx_holo.compress): compress a model, save MLX weights + evidence.json.

Example: mlx-holo compress --method gptq --bits 4 --group-size 64 --out runs/smollm2-gptq4
Several processes or Macs share the calibration when launched by MLX's launcher, e.g.
``mlx.launch -n 2 --backend ring python -m mlx_holo.compress --method gptq --out DIR`` (``mlx_holo.distributed``).
The recipe's flags are generated from ``mlx_holo.recipe.Recipe``; ``--recipe FILE`` (TOML, or an evidence JSON whose
recipe is repeated) sets their defaults and flags given beside it win. Exit 0 GO, 1 NO-GO, 2 bad input, 3 internal.
"""
from __future__ import annotations

import argparse
import sys

from .common import EXIT_GO, EXIT_NOGO, add_recipe_arguments, progress_printer, recipe_from_args, run_guarded


def build_parser(defaults=None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlx-holo compress", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="local HF folder, hub id, .gguf file, or 'default' "
                    "(embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="output folder (mlx-lm layout + evidence.json)")
    ap.add_argument("--recipe", default=None, help="recipe file: TOML of field = value, or an evidence .json "
                    "(repeats its recipe); flags given beside it win")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="0 skips evaluation (gates then fail)")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-corpus", default="wiki", help="built-in corpus name or a text file")
    ap.add_argument("--gate", action="append", default=None, help="e.g. --gate cos_min>=0.95 (repeatable)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ap.add_argument("--max-memory-gb", type=float, default=None,
                    help="memory the run may use (default: what is available); the pre-flight refuses a run whose "
                         "estimated peak is larger, before any work")
    ap.add_argument("--format", choices=("mlx", "gguf"), default="mlx",
                    help="gguf: also write OUT/model.gguf for llama.cpp (with --gguf grids; see mlx-holo export)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    add_recipe_arguments(ap, defaults)
    return ap


def parse(argv=None) -> argparse.Namespace:
    """Two passes: the first reads --recipe (its values become the defaults), the second everything."""
    from ..recipe import Recipe

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = Recipe.load(known.recipe) if known.recipe else None
    return build_parser(defaults).parse_args(argv)


def main(argv=None) -> int:
    from ..hardware import ensure_fast_blas

    ensure_fast_blas()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: _main(argv), debug)


def _main(argv) -> int:
    from .. import evidence

    args = parse(argv)
    recipe = recipe_from_args(args).validate()
    for g in args.gate or []:
        evidence.parse_gate(g)
    from ..compression import compress

    ev = compress(args.model, recipe, args.out, eval_tokens=args.eval_tokens, eval_seq_len=args.eval_seq_len,
                  eval_corpus=args.eval_corpus, gates=args.gate, overwrite=args.overwrite,
                  max_memory_gb=args.max_memory_gb, gguf_file=args.format == "gguf", on_progress=progress_printer())
    if not ev:  # a rank > 0 of a distributed job: rank 0 reports and writes
        return EXIT_GO
    m = ev["metrics"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    print(f"{ev['verdict']}  {args.out}  bits/weight {ev['bits_per_weight']:.3f}  ratio {ev['ratio']:.2f}x  "
          f"ppl {fmt(m.get('ppl'))} (base {fmt(m.get('base_ppl'))}, {fmt(m.get('delta_ppl_pct'))}%)  "
          f"kl {fmt(m.get('kl'))}  top1 {fmt(m.get('top1'))}  cos_min {fmt(m.get('cos_min'))}")
    for g in ev["gates"]:
        print(f"  {'pass' if g['passed'] else 'FAIL'}  {g['metric']} {g['op']} {g['threshold']:g}  "
              f"(value {fmt(g['value'])})")
    return EXIT_GO if ev["verdict"] == "GO" else EXIT_NOGO


if __name__ == "__main__":
    sys.exit(main())
