"""mlx-holo export: write a compressed (or float) mlx-lm folder as a GGUF file for llama.cpp, Ollama and LM Studio.

Example: mlx-holo compress --method gptq --bits 4 --group-size 32 --out runs/q4g32
         mlx-holo export --gguf runs/q4g32.gguf runs/q4g32
4- and 5-bit layers at group size 32 become Q4_1 / Q5_1 and 8-bit symmetric ones Q8_0 with their codes, scales and
biases unchanged (no second rounding); float tensors F16/F32. Other layers are refused (named) unless --requantize.
llama and qwen2 architectures. Prints a JSON report (types, requantized layers' extra error, bytes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import progress_printer, run_guarded


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlx-holo export", description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="mlx-lm model folder (e.g. a compress --out)")
    ap.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    ap.add_argument("--requantize", action="store_true",
                    help="round layers that do not map exactly again (Q4_1/Q5_1/Q8_0), their extra error reported")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _main(args), args.debug)


def _main(args) -> int:
    from ..model.gguf_export import GGUFExportError, export_gguf

    out = Path(args.gguf)
    if out.exists() and not args.overwrite:
        raise GGUFExportError(f"{out} exists: pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise GGUFExportError(f"the folder of {out} does not exist")
    if not Path(args.folder).is_dir():
        raise GGUFExportError(f"model folder {args.folder} does not exist")
    rep = export_gguf(args.folder, out, requantize=args.requantize, on_progress=progress_printer())
    types: dict = {}
    for t in rep.tensors.values():
        types[t] = types.get(t, 0) + 1
    print(json.dumps({"path": rep.path, "bytes": rep.bytes, "tensor_types": types,
                      "requantized": rep.requantized}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
