"""Scale table: peak memory and time of compress + evaluate on synthetic checkpoints of real shapes, beside mlx-lm.

Run: python benchmarks/scale.py --presets qwen2.5-0.5b,llama3.2-3b,llama3-8b --methods rtn,gptq,mlx_lm:rtn
         --calib-tokens 1024 --eval-tokens 512 --cap-gb 22 --work runs/scale --out evidence/scale

Per preset a synthetic checkpoint (``mlx-holo synth``; bf16 shards, random weights with outlier channels) is written
into --work unless it is there, then every method runs as its own process under a memory watchdog: a process whose
resident memory passes --cap-gb is killed and its row says so (an out-of-memory ends the row, not the machine).
- ``rtn`` / ``gptq``: ``python -m mlx_holo.compress --method M --bits 4`` (gptq with --calib-tokens) and its
  evaluation on --eval-tokens wiki tokens against the checkpoint; the row takes peak RSS (the process's own
  ``ru_maxrss``), seconds per block (first, median, last), compress / evaluation / total seconds, output bytes and the
  pre-flight's estimate from its evidence file, copied to --out as ``<preset>-<method>.json``;
- ``mlx_lm:rtn``: ``mlx_lm convert -q --q-bits 4`` on the same checkpoint (no evaluation), wall time and peak RSS;
- ``mlx_lm:gptq``: mlx-lm's GPTQ with the same calibration tokens (c4 placed where it looks for its data).
The table is printed and written to --out/scale.json with every row's command. --delete removes each checkpoint
after its rows (disk); --drop-caches empties the OS page cache before each row, so that no row finds its checkpoint
in memory that an earlier one read, --warm-cache reads it into memory before each row instead (times depend on it:
on a slow disk, reading a checkpoint can take longer than converting it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_capped(cmd: list[str], cap_bytes: int, env: dict | None = None, log: Path | None = None) -> dict:
    """Run cmd; kill it when its resident memory passes cap_bytes -> {rc, seconds, peak_rss_bytes, killed}."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    killed = threading.Event()

    def watch():
        status = Path(f"/proc/{p.pid}/status")
        while p.poll() is None:
            try:
                rss = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                           if line.startswith("VmRSS:"))
            except (OSError, StopIteration, ValueError):
                rss = 0
            if rss > cap_bytes:
                killed.set()
                p.kill()
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    return {"rc": p.returncode, "seconds": time.perf_counter() - t0, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "killed_at_cap": killed.is_set()}


def drop_caches() -> bool:
    """Empty the OS page cache (Linux, as root) so that every row reads its checkpoint from disk -> whether done."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm_cache(folder: Path) -> int:
    """Read a checkpoint's files once (into the OS page cache), so that a row's time is its work, not the disk's
    -> bytes read. Only useful when the checkpoint fits in memory."""
    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(64 << 20):
                n += len(chunk)
    return n


def ours(preset_dir: Path, method: str, args, out_dir: Path, work: Path) -> dict:
    dest = work / f"{preset_dir.name}-{method}"
    cmd = [sys.executable, "-m", "mlx_holo.compress", "--model", str(preset_dir), "--method", method, "--bits", "4",
           "--eval-tokens", str(args.eval_tokens), "--out", str(dest), "--overwrite"]
    if method != "rtn":
        cmd += ["--calib-tokens", str(args.calib_tokens)]
    r = run_capped(cmd, int(args.cap_gb * 2**30), log=work / f"{dest.name}.log")
    row = {"preset": preset_dir.name, "method": method, "command": " ".join(cmd[1:]), **r}
    ev_path = dest / "evidence.json"
    if ev_path.exists():
        ev = json.loads(ev_path.read_text())
        bs = ev.get("block_seconds") or [0.0]
        row.update(verdict=ev["verdict"], output_bytes=ev["bytes"]["total"], compress_s=ev["timings"]["compress_s"],
                   eval_s=ev["timings"]["eval_s"], total_s=ev["timings"]["total_s"],
                   block_s_first=bs[0], block_s_median=statistics.median(bs), block_s_last=bs[-1],
                   estimate_bytes=ev.get("memory_estimate", {}).get("peak_bytes"),
                   estimate_phase=ev.get("memory_estimate", {}).get("peak_phase"),
                   ppl=ev["metrics"].get("ppl"), kl=ev["metrics"].get("kl"))
        shutil.copy2(ev_path, out_dir / f"{preset_dir.name}-{method}.json")
    if not args.keep:
        shutil.rmtree(dest, ignore_errors=True)
    return row


def mlx_lm_row(preset_dir: Path, tool: str, args, work: Path) -> dict:
    dest = work / f"{preset_dir.name}-mlx_lm-{tool}"
    shutil.rmtree(dest, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if tool == "rtn":
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(preset_dir), "--mlx-path", str(dest),
               "-q", "--q-bits", "4", "--q-group-size", "64"]
    else:
        from mlx_holo import data

        home = Path(tempfile.mkdtemp(prefix="mlxlm-home-"))
        (home / ".cache" / "mlx-lm").mkdir(parents=True)
        (home / ".cache" / "mlx-lm" / "calibration_v5.txt").write_text(data.load_corpus("c4").text)
        env["HOME"] = str(home)
        cmd = [sys.executable, "-c", "import sys; from mlx_lm.quant.gptq import main; sys.argv[0] = 'gptq'; main()",
               "--model", str(preset_dir), "--mlx-path", str(dest), "--bits", "4", "--group-size", "64",
               "--num-samples", str(max(1, args.calib_tokens // 512)), "--sequence-length", "512"]
    r = run_capped(cmd, int(args.cap_gb * 2**30), env=env, log=work / f"{dest.name}.log")
    row = {"preset": preset_dir.name, "method": f"mlx_lm:{tool}", "command": " ".join(cmd[1:]), **r,
           "total_s": r["seconds"]}
    if (dest / "config.json").exists():
        row["output_bytes"] = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    shutil.rmtree(dest, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'preset':14s} {'method':12s} {'peak GB':>8s} {'est GB':>7s} {'s/block first/med/last':>23s} "
            f"{'compress s':>10s} {'eval s':>7s} {'total s':>8s} {'out GB':>7s}  note")
    lines = [head]
    for r in rows:
        gb = lambda b: f"{b / 1e9:.2f}" if b else "-"  # noqa: E731
        blocks = (f"{r['block_s_first']:.1f}/{r['block_s_median']:.1f}/{r['block_s_last']:.1f}"
                  if "block_s_first" in r else "-")
        note = ("killed at the memory cap" if r.get("killed_at_cap") else r.get("verdict")
                or ("failed" if r["rc"] else ""))  # compress exits 1 on NO-GO: a random model misses the gates
        lines.append(f"{r['preset']:14s} {r['method']:12s} {gb(r['peak_rss_bytes']):>8s} "
                     f"{gb(r.get('estimate_bytes')):>7s} {blocks:>23s} {r.get('compress_s', 0):>10.0f} "
                     f"{r.get('eval_s', 0):>7.0f} {r.get('total_s', r['seconds']):>8.0f} "
                     f"{gb(r.get('output_bytes')):>7s}  {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="qwen2.5-0.5b,llama3.2-3b", help="comma list (mlx-holo synth --list)")
    ap.add_argument("--layers", type=int, default=None, help="shorten every preset to this many blocks")
    ap.add_argument("--methods", default="rtn,gptq,mlx_lm:rtn", help="rtn,gptq,mlx_lm:rtn,mlx_lm:gptq")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--cap-gb", type=float, default=22.0, help="memory cap per row (GiB of resident memory)")
    ap.add_argument("--work", default="runs/scale")
    ap.add_argument("--out", default="evidence/scale", help="folder for scale.json and each row's evidence")
    ap.add_argument("--keep", action="store_true", help="keep our output folders")
    ap.add_argument("--delete", action="store_true", help="delete each checkpoint after its rows")
    ap.add_argument("--warm-cache", action="store_true",
                    help="read the checkpoint once before each row: every row finds it in the page cache (when it "
                         "fits in memory), so a slow disk does not decide the times")
    ap.add_argument("--drop-caches", action="store_true",
                    help="empty the page cache before each row (Linux, root): every row reads from disk")
    args = ap.parse_args(argv)
    from mlx_holo.model.synthetic import preset, write_synthetic

    work, out_dir = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "scale.json"
    rows = json.loads(summary.read_text())["rows"] if summary.exists() else []
    for name in args.presets.split(","):
        d = work / (name + (f"-L{args.layers}" if args.layers else ""))
        if not (d / "config.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            t = time.perf_counter()
            write_synthetic(d, preset(name, args.layers))
            print(f"{d}: written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for method in args.methods.split(","):
            print(f"{d.name} {method} ...", file=sys.stderr, flush=True)
            cold = drop_caches() if args.drop_caches else False
            if args.warm_cache:
                warm_cache(d)
            row = (mlx_lm_row(d, method.split(":", 1)[1], args, work) if method.startswith("mlx_lm:")
                   else ours(d, method, args, out_dir, work))
            row["cold_cache"], row["warm_cache"] = cold, args.warm_cache
            rows = [r for r in rows if (r["preset"], r["method"]) != (row["preset"], row["method"])] + [row]
            summary.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
            print(table([row]).splitlines()[1], file=sys.stderr, flush=True)
        if args.delete:
            shutil.rmtree(d, ignore_errors=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
