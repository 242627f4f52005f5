"""GGUF table: our calibrated codes written as GGUF against llama.cpp's own quantizer, every row scored by llama.cpp.

Run: python benchmarks/gguf_llamacpp.py --eval-tokens 8192 --calib-tokens 8192 --work runs/gguf --json evidence/gguf/gguf.json

Needs llama.cpp's Python bindings (``pip install llama-cpp-python``, built from its source distribution; a benchmark
tool, not a dependency of mlx-holo). On the embedded model:
- ``f16``: the float base exported by ``mlx-holo export`` as F16 (llama.cpp's quantizer starts from it);
- ``llama.cpp:Q4_1`` / ``llama.cpp:Q4_K_M``: ``llama_model_quantize`` of that F16 file (its own rounding, no
  importance matrix);
- ``ours:rtn-q4_1`` / ``ours:gptq-q4_1`` / ``ours:awq-q4_1``: ``compress --method rtn|gptq|awq --bits 4 --gguf
  --group-size 32`` then
  ``export --gguf`` (Q4_1 with our codes); ``ours:mixed``: mixed precision over 4/5/8 bits (Q4_1/Q5_1/Q8_0) at
  ``--mixed-bpw`` bits per weight; ``-emb8`` rows keep the tied embedding/head at 8 bits (Q8_0), as llama.cpp's
  quantizer keeps its token table above 4 bits.
Every row is scored by llama.cpp itself (``Llama.eval`` with all logits) on the same token windows (our tokenizer's
wiki windows, so every row sees the same tokens); our own evaluation of the same folder is printed beside it (the
round trip is exact, so the two should agree to float rounding). File bytes are the GGUF's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_holo.hardware import ensure_fast_blas  # noqa: E402

ensure_fast_blas()


def llama_ppl(path: Path, windows: np.ndarray, threads: int = 2) -> float:
    """PPL of a GGUF file over token windows [N, S] as llama.cpp computes the logits (each window from a fresh
    context; position j predicts token j + 1)."""
    from llama_cpp import Llama

    n, s = windows.shape
    llm = Llama(model_path=str(path), n_ctx=s, n_batch=s, logits_all=True, n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        logits = np.asarray(llm.scores[:s], np.float64)  # [S, V]
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        nll += float((lse[:-1] - logits[np.arange(s - 1), w[1:]]).sum())
        count += s - 1
    del llm
    return float(np.exp(nll / count))


def llama_quantize(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed ({rc})")


def main() -> int:
    from mlx_holo import data
    from mlx_holo.compression import compress
    from mlx_holo.model.gguf_export import export_gguf
    from mlx_holo.model.open import embedded_default_dir, open_model
    from mlx_holo.recipe import Recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="the float base (default: the embedded model); e.g. a "
                    "rotated copy (`compress --method none --bits 0 --rotate hadamard`), whose weights sit on no grid")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--mixed-bpw", type=float, default=5.0, help="bits per weight of the mixed row")
    ap.add_argument("--rows", default="f16,llama.cpp:Q4_1,llama.cpp:Q4_K_M,ours:gptq-q4_1,ours:mixed,ours:awq-q4_1")
    ap.add_argument("--work", default="runs/gguf")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = open_model(args.model, lazy=True)[1]
    wins = data.text_windows(tok, data.load_corpus("wiki"), args.eval_tokens, 512)
    windows = np.asarray(wins)
    rows = []
    f16 = work / "base-f16.gguf"
    if not f16.exists():
        export_gguf(embedded_default_dir() if args.model == "default" else Path(args.model), f16)
    recipes = {"ours:rtn-q4_1": Recipe(method="rtn", bits=4, group_size=32, gguf=True),
               "ours:rtn-q4_1-emb8": Recipe(method="rtn", bits=4, group_size=32, gguf=True, embed_bits=8),
               "ours:gptq-q4_1-emb8": Recipe(method="gptq", bits=4, group_size=32, gguf=True, embed_bits=8,
                                             calib_tokens=args.calib_tokens),
               "ours:gptq-q4_1": Recipe(method="gptq", bits=4, group_size=32, gguf=True, calib_tokens=args.calib_tokens),
               "ours:awq-q4_1": Recipe(method="awq", bits=4, group_size=32, gguf=True, calib_tokens=args.calib_tokens),
               "ours:mixed": Recipe(method="mixed", bits=4, group_size=32, gguf=True, candidate_bits=(4, 5, 8),
                                    bits_per_weight=args.mixed_bpw, calib_tokens=args.calib_tokens)}
    for name in args.rows.split(","):
        t0 = time.perf_counter()
        ours_ppl = None
        if name == "f16":
            path = f16
        elif name.startswith("llama.cpp:"):
            path = work / f"llama-{name.split(':')[1]}.gguf"
            llama_quantize(f16, path, name.split(":")[1])
        else:
            folder = work / name.split(":")[1]
            ev = compress(args.model, recipes[name], folder, eval_tokens=args.eval_tokens, overwrite=True, gates=[])
            ours_ppl = ev["metrics"]["ppl"]
            path = work / f"{folder.name}.gguf"
            export_gguf(folder, path)
        ppl = llama_ppl(path, windows)
        row = {"row": name, "bytes": path.stat().st_size, "llama_cpp_ppl": ppl, "our_ppl": ours_ppl,
               "seconds": round(time.perf_counter() - t0, 1), "file": str(path)}
        if ours_ppl:
            row["our_vs_llama_cpp_pct"] = 100 * (ours_ppl - ppl) / ppl
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row: a long run stopped early keeps what it measured
            out = {"command": " ".join(sys.orig_argv), "eval_tokens": int(windows.size), "rows": rows}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
