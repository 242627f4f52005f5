"""mlx-holo: one command with subcommands, each the same as its ``python -m mlx_holo.X`` entry point.

mlx-holo compress | eval | bench | validate | plan | tune | export | synth | tui  [ARGS...]
(mlx-holo SUBCOMMAND --help for each)
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # subcommand -> (module under mlx_holo, what it does)
    "compress": ("cli.compress", "compress a model, save MLX weights + evidence.json"),
    "eval": ("cli.eval", "PPL, KL, top-1, per-block cosine and determinism against the base"),
    "bench": ("cli.bench", "speed, memory and bandwidth utilisation across bit-widths"),
    "validate": ("cli.validate", "check evidence files: schema and gates"),
    "plan": ("cli.plan", "memory need and a recipe for a target memory"),
    "tune": ("cli.tune", "end-to-end KL tuning of a compressed folder's scales/biases"),
    "export": ("cli.export", "write a folder as a GGUF file for llama.cpp (Q4_1/Q5_1/Q8_0 from our codes)"),
    "synth": ("cli.synth", "write a synthetic checkpoint of a real model's shape (scale trials)"),
    "tui": ("tui.__main__", "the Textual workbench"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: mlx-holo COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mlx_holo.{COMMANDS[name][0]}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
