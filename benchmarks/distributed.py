"""Distributed calibration benchmark: seconds per block, bytes each rank sends per block and peak memory, at 1..N
ranks of one job on this machine (MLX's ring backend on 127.0.0.1), on a synthetic checkpoint of a real shape.

    python benchmarks/distributed.py --preset llama3.2-3b --layers 4 --ranks 1,2 --json evidence/distributed/d.json
    python benchmarks/distributed.py --model default --eval-tokens 1024 --json evidence/distributed/smollm2.json

Each row is one `python -m mlx_holo.compress` job (launched with `mlx.launch -n R --backend ring` for R > 1) with
--eval-tokens 0; the figures come from the job's evidence (``distributed.ranks``). From the bytes per block and a
link's speed, the time a block's exchange takes on N Macs follows (docs/results.md). On one machine the ranks share
its cores, so a speed-up here says little about several Macs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def job(model: str, ranks: int, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "mlx_holo.compress", "--model", model, "--method", args.method, "--bits",
           str(args.bits), "--calib-tokens", str(args.calib_tokens), "--eval-tokens", str(args.eval_tokens), "--out", str(out)]
    if ranks > 1:
        launcher = shutil.which("mlx.launch")
        if launcher is None:
            raise SystemExit("error: mlx.launch is not on PATH (it comes with the mlx package)")
        cmd = [launcher, "-n", str(ranks), "--backend", "ring", *cmd]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ev_path = out / "evidence.json"
    if not ev_path.exists():
        return {"ranks": ranks, "error": r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"],
                "wall_s": wall}
    ev = json.loads(ev_path.read_text())
    per_rank = ev.get("distributed", {}).get("ranks") or [
        {"rank": 0, "block_seconds": ev["block_seconds"], "sent_bytes_per_block": [0] * len(ev["block_seconds"]),
         "collective_wait_s": 0.0, "peak_rss_bytes": ev["peak_memory_bytes"]}]
    bs = per_rank[0]["block_seconds"]
    return {"ranks": ranks, "wall_s": round(wall, 1), "compress_s": round(ev["timings"]["compress_s"], 1),
            "s_per_block": {"first": bs[0], "median": statistics.median(bs), "last": bs[-1]},
            "sent_mb_per_block": [round(statistics.median(p["sent_bytes_per_block"]) / 1e6, 2) for p in per_rank],
            "wait_s": [p["collective_wait_s"] for p in per_rank],
            "peak_rss_gb": [round(p["peak_rss_bytes"] / 1e9, 2) for p in per_rank],
            "threads": [p.get("threads", 0) for p in per_rank],
            "output_bytes": ev["bytes"]["total"], "command": " ".join(cmd)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="an existing model spec instead of a synthetic checkpoint "
                    "(e.g. default: the embedded model)")
    ap.add_argument("--preset", default="llama3.2-3b", help="synthetic shape (mlx-holo synth --list)")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the synthetic checkpoint")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=0, help="also evaluate, split across the ranks")
    ap.add_argument("--work", default=None, help="folder for the checkpoint and outputs (default: a temp folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="mlx-holo-dist-"))
    model = args.model or str(work / f"{args.preset}-{args.layers}")
    if not args.model and not Path(model).exists():
        subprocess.run([sys.executable, "-m", "mlx_holo.cli.main", "synth", "--preset", args.preset, "--layers",
                        str(args.layers), "--out", model], check=True)
    rows = []
    for r in (int(x) for x in args.ranks.split(",")):
        out = work / f"out-{r}"
        shutil.rmtree(out, ignore_errors=True)
        rows.append(job(str(model), r, out, args))
        if args.eval_tokens and "error" not in rows[-1]:
            ev = json.loads((out / "evidence.json").read_text())
            rows[-1]["metrics"] = {k: ev["metrics"][k] for k in ("ppl", "kl", "top1")}
            rows[-1]["eval_s"] = round(ev["timings"]["eval_s"], 1)
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
