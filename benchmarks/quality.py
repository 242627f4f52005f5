"""Quality table: method x bits -> PPL, KL, bits per weight, seconds, peak memory, ours beside mlx-lm's own tools.

Run: python benchmarks/quality.py --bits 2,3,4 --eval-tokens 4096 --calib-tokens 2048 --json runs/quality.json

``--work DIR --reuse`` keeps every variant's folder under DIR and, on a later run, scores an existing folder instead of
compressing again (its compression seconds are read back from DIR/<variant>/quality_seconds.txt): a long tool run
(mlx-lm's AWQ takes ~16 CPU-minutes for this 135M model) can be done once, or by ``--methods mlx_lm:awq`` alone.

Ours: rtn, gptq, gptq+e2e (GPTQ, then ``--e2e-steps 20 --e2e-lr 3e-5``), awq, mixed / mixed-fisher / mixed-kl
(Hessian, Fisher or measured-KL sensitivity, at the same average bits as uniform ``b`` + its group overhead,
bit-widths from ``b`` up, group sizes 32/64/128), via
``mlx_holo.compression.compress`` in-process. mlx-lm: ``mlx_lm.convert -q`` (RTN), ``mlx_lm.quant.gptq`` and
``mlx_lm.quant.awq`` as subprocesses, offline: the same calibration text (c4) is placed where mlx-lm looks for its
calibration file, under a temporary HOME. mlx-lm's GPTQ supports only 2/4/8 bits and quantizes the embedding at its
fallback width (6 bits), its AWQ at 4 bits/group 32: the table prints everyone's real bits per weight, and ours are
run with the same embedding width as the mlx-lm tool they are compared with (column ``emb``). Every variant is
scored with the same evaluator, windows and base model (``mlx_holo.compare``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_holo.hardware import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

MIXED = {"mixed": "hessian", "mixed-fisher": "fisher", "mixed-kl": "kl"}  # method -> --sensitivity


def _bpw(folder: Path) -> float:
    """Bits per weight of a saved folder: (packed codes + scales + biases) / quantized weights."""
    import mlx.core as mx

    w = mx.load(str(folder / "model.safetensors")) if (folder / "model.safetensors").exists() else {}
    if not w:
        for f in folder.glob("model*.safetensors"):
            w.update(mx.load(str(f)))
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.get("quantization", {})
    bits = n = 0
    for k, v in w.items():
        if k.endswith(".scales"):
            mod = k[: -len(".scales")]
            b = (q.get(mod) or q)["bits"] if isinstance(q.get(mod), dict) else q["bits"]
            codes = w[f"{mod}.weight"]
            n_w = codes.size * 32 // b
            bits += codes.nbytes * 8 + v.nbytes * 8 + (w[f"{mod}.biases"].nbytes * 8 if f"{mod}.biases" in w else 0)
            n += n_w
    return bits / n if n else 16.0


def run_mlx_lm(tool: str, src: Path, out: Path, bits: int, group: int, calib_text: str, calib_tokens: int,
               seq_len: int) -> float:
    if out.exists():  # mlx-lm refuses an existing output folder
        shutil.rmtree(out)
    home = Path(tempfile.mkdtemp(prefix="mlxlm-home-"))
    (home / ".cache" / "mlx-lm").mkdir(parents=True)
    (home / ".cache" / "mlx-lm" / "calibration_v5.txt").write_text(calib_text)
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1")
    n = max(1, calib_tokens // seq_len)
    if tool == "rtn":
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
               "--q-bits", str(bits), "--q-group-size", str(group)]
    elif tool == "gptq":  # mlx_lm.quant.awq has no __main__ guard: call both tools' main() explicitly
        cmd = [sys.executable, "-c", "import sys; from mlx_lm.quant.gptq import main; sys.argv[0] = 'gptq'; main()",
               "--model", str(src), "--mlx-path", str(out), "--bits",
               str(bits), "--group-size", str(group), "--num-samples", str(n), "--sequence-length", str(seq_len)]
    else:
        cmd = [sys.executable, "-c", "import sys; from mlx_lm.quant.awq import main; sys.argv[0] = 'awq'; main()",
               "--model", str(src), "--mlx-path", str(out), "--bits",
               str(bits), "--group-size", str(group), "--num-samples", str(n), "--sequence-length", str(seq_len)]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not (out / "config.json").exists():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    import mlx.core as mx

    from mlx_holo import data, model as models
    from mlx_holo.evaluation import compare
    from mlx_holo.compression import compress
    from mlx_holo.recipe import Recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="rtn,gptq,awq,mixed,mixed-fisher,mlx_lm:rtn,mlx_lm:gptq,mlx_lm:awq")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default=None, help="keep the variant folders here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="score existing variant folders under --work")
    args = ap.parse_args(argv)

    mid, src = models.resolve(args.model)
    base, tok, _, info = models.open_model(args.model)
    wins = data.text_windows(tok, data.load_corpus("wiki"), args.eval_tokens, args.seq_len)
    calib_text = data.load_corpus("c4").text
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base_ppl = None
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            out = work / f"{method.replace(':', '_')}-{bits}"
            emb = {"mlx_lm:gptq": 6, "gptq": 6, "gptq+e2e": 6, "mlx_lm:awq": 4, "awq": 4}.get(method, bits)
            row = {"method": method, "bits": bits, "emb": emb}
            t0 = time.perf_counter()
            try:
                if args.reuse and (out / "config.json").exists() and (out / "quality_seconds.txt").exists():
                    row["seconds"] = float((out / "quality_seconds.txt").read_text())
                    row["reused"] = True
                elif method.startswith("mlx_lm:"):
                    tool = method.split(":")[1]
                    if tool == "gptq" and bits not in (2, 4, 8):
                        row["error"] = "mlx-lm GPTQ supports 2/4/8 bits only"
                        rows.append(row)
                        print(row, flush=True)
                        continue
                    row["seconds"] = run_mlx_lm(tool, src, out, bits, args.group_size, calib_text,
                                                args.calib_tokens, args.seq_len)
                else:
                    kw = {}
                    if method in MIXED:
                        kw = dict(method="mixed", bits=bits, bits_per_weight=bits + 32 / args.group_size,
                                  candidate_groups=(32, 64, 128),  # room to move: --bits is mixed's floor
                                  sensitivity=MIXED[method])
                    elif method == "gptq+e2e":  # GPTQ, then 20 steps of end-to-end KL tuning (--e2e-steps 20)
                        kw = dict(method="gptq", bits=bits, e2e_steps=20, e2e_lr=3e-5)
                    else:
                        kw = dict(method=method, bits=bits)
                    r = Recipe(group_size=args.group_size, calib_tokens=args.calib_tokens,
                               calib_seq_len=args.seq_len, embed_bits=emb if emb != bits else None, **kw)
                    ev = compress(args.model, r, str(out), eval_tokens=0, overwrite=True, base_model=base)
                    row["seconds"] = ev["timings"]["compress_s"] + ev["timings"]["e2e_tune_s"]
                    row["peak_rss_mb"] = ev["peak_memory_bytes"] / 1e6
                if not row.get("reused"):
                    (out / "quality_seconds.txt").write_text(f"{row['seconds']:.1f}")
                cm = models.open_model(str(out))[0]
                m = compare(cm, base, wins, det_windows=0)
                base_ppl = m.base_ppl
                row.update(ppl=m.ppl, kl=m.kl, top1=m.top1, cos_min=m.cos_min, bpw=_bpw(out))
                del cm
                mx.clear_cache()
            except Exception as e:  # noqa: BLE001 - one failed variant must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nbase PPL {base_ppl:.3f} on {wins.size} wiki tokens ({wins.shape[0]} x {args.seq_len}); "
          f"calibration c4 {args.calib_tokens} tokens; group {args.group_size}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB (this process)")
    print(f"{'method':<12} {'bits':>4} {'emb':>3} {'bpw':>6} {'PPL':>9} {'KL':>7} {'top1':>6} {'cos_min':>7} "
          f"{'sec':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<12} {r['bits']:>4} {r['emb']:>3}  -- {r['error'][:80]}")
            continue
        print(f"{r['method']:<12} {r['bits']:>4} {r['emb']:>3} {r['bpw']:>6.3f} {r['ppl']:>9.3f} {r['kl']:>7.4f} "
              f"{r['top1']:>6.3f} {r['cos_min']:>7.4f} {r['seconds']:>7.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"base_ppl": base_ppl, "rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
