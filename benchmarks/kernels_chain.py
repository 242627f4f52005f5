"""Decode-shaped kernel benchmark: our quantized mat-vec beside mx.quantized_matmul, bandwidth-bound by construction.

Run: python benchmarks/kernels_chain.py --shape llama3-8b --layers 8 --bits 2,3,4,5,6,8 --k 1,2,3,4 --m 1,2,4,8
         --out evidence/bench/kernels_chain.json

One graph holds every linear of --layers blocks of a real model's shape (q, k, v, o, gate, up, down; their packed
codes, scales and biases are distinct arrays, so nothing is cached between them) applied to M input rows, evaluated
with a single ``mx.eval``: per-launch overhead is paid once per chain, and the time is that of reading the weights.
A second case times one large layer (the shape's [intermediate, hidden] up projection) alone. For every bits x M:
``mx.quantized_matmul`` and ``mlx_holo.kernels.quantized_matvec`` (the active face: Metal, CUDA, or the pure-MLX
reference), and for K > 1 ``replica_matvec`` (codes read once for K scale sets) against K separate
``mx.quantized_matmul`` calls. Reported: microseconds per chain (median of --iters), GB/s of weight bytes read,
% of the measured copy bandwidth, the ratios the targets name (K replicas over K = 1, M = 8 over M = 1), and each
face's max relative error against mx.quantized_matmul on the same inputs (correctness on every backend). On a CPU
the reference face dequantizes and multiplies: the timings there rank nothing, the errors still check the faces.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shapes(preset: str) -> list[tuple[str, int, int]]:
    """(name, out, in) of one block's linears of a synthetic preset's real shape."""
    from mlx_holo.model.synthetic import preset as get

    c = get(preset)
    hd = c.hidden_size // c.num_attention_heads
    q, kv, D, I = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.hidden_size, c.intermediate_size
    return [("q", q, D), ("k", kv, D), ("v", kv, D), ("o", D, q), ("gate", I, D), ("up", I, D), ("down", D, I)]


def make_layers(specs, layers: int, bits: int, group: int, k: int, dtype, seed: int = 0) -> list[dict]:
    out = []
    for i in range(layers):
        for j, (name, n_out, n_in) in enumerate(specs):
            mx.random.seed(seed + 100 * i + j)
            w = (0.02 * mx.random.normal((n_out, n_in))).astype(dtype)
            wq, s, b = mx.quantize(w, group_size=group, bits=bits)
            f = mx.linspace(0.95, 1.05, k).reshape(k, 1, 1)
            S, B = (s[None] * f).astype(s.dtype), (b[None] * f).astype(b.dtype)
            mx.eval(wq, s, b, S, B)
            out.append({"name": name, "in": n_in, "wq": wq, "s": s, "b": b, "S": S, "B": B})
    return out


def weight_bytes(ls: list[dict], k: int) -> int:
    return sum(d["wq"].nbytes + k * (d["s"].nbytes + d["b"].nbytes) for d in ls)


def timeit(fn, iters: int) -> float:
    mx.eval(fn())  # warm-up: compilation, allocation
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30))


def run_case(ls, xs, bits, group, k, iters, face) -> dict:
    from mlx_holo import kernels as K

    def qmm():
        return [mx.quantized_matmul(xs[d["in"]], d["wq"], d["S"][r], d["B"][r], transpose=True, group_size=group,
                                    bits=bits) for d in ls for r in range(k)]

    def ours():
        if k == 1:
            return [K.quantized_matvec(xs[d["in"]], d["wq"], d["S"][0], d["B"][0], bits, group, backend=face)
                    for d in ls]
        return [K.replica_matvec(xs[d["in"]], d["wq"], d["S"][:k], d["B"][:k], bits, group, backend=face)
                for d in ls]

    a, b = qmm(), ours()
    want = [mx.stack(a[i * k:(i + 1) * k]) for i in range(len(ls))] if k > 1 else a
    err = max(rel(y, w) for y, w in zip(b, want))
    t_q, t_o = timeit(qmm, iters), timeit(ours, iters)
    nbytes = weight_bytes(ls, k)
    return {"qmm_us": 1e6 * t_q, "ours_us": 1e6 * t_o, "bytes": nbytes, "qmm_gbps": nbytes / t_q / 1e9,
            "ours_gbps": nbytes / t_o / 1e9, "rel_err_vs_qmm": err}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", help="a synthetic preset's shape (mlx-holo synth --list)")
    ap.add_argument("--layers", type=int, default=8, help="blocks in the chain")
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--k", default="1,2,3,4", help="replica counts")
    ap.add_argument("--m", default="1,2,4,8", help="input rows (decode: 1; speculative decoding / small batches)")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (a quick run on a CPU)")
    ap.add_argument("--face", default=None, help="metal | cuda | reference (default: the active one)")
    ap.add_argument("--out", default="evidence/bench/kernels_chain.json")
    args = ap.parse_args(argv)
    from mlx_holo import hardware
    from mlx_holo import kernels as K

    face = args.face or K.active_backend()
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    specs = [(n, o // args.scale, i // args.scale) for n, o, i in shapes(args.shape)]
    copy = hardware.copy_bandwidth_gbps()
    bits_l, ks, ms = ([int(v) for v in s.split(",")] for s in (args.bits, args.k, args.m))
    rows = []
    for bits in bits_l:
        for case, layer_specs, n_layers in (("chain", specs, args.layers), ("large layer", specs[5:6], 1)):
            ls = make_layers(layer_specs, n_layers, bits, args.group, max(ks), dtype)
            for m in ms:
                mx.random.seed(m)
                xs = {w: mx.random.normal((m, w)).astype(dtype) for w in {d["in"] for d in ls}}
                mx.eval(*xs.values())
                for k in ks:
                    r = {"case": case, "bits": bits, "m": m, "k": k,
                         **run_case(ls, xs, bits, args.group, k, args.iters, face)}
                    r["ours_pct_copy"] = 100 * r["ours_gbps"] / copy
                    r["qmm_pct_copy"] = 100 * r["qmm_gbps"] / copy
                    rows.append(r)
                    print(f"{case:11s} bits {bits} m {m} k {k}: qmm {r['qmm_us']:9.1f} us ({r['qmm_pct_copy']:5.1f}%)"
                          f"  ours {r['ours_us']:9.1f} us ({r['ours_pct_copy']:5.1f}%)  err {r['rel_err_vs_qmm']:.1e}",
                          flush=True)
            del ls
    key = {(r["case"], r["bits"], r["m"], r["k"]): r for r in rows}
    for r in rows:  # the targets' ratios: K replicas over K = 1, M rows over M = 1 (same case and bits)
        one_k, one_m = key.get((r["case"], r["bits"], r["m"], 1)), key.get((r["case"], r["bits"], 1, r["k"]))
        r["ours_k_ratio"] = r["ours_us"] / one_k["ours_us"] if one_k else None
        r["ours_m_ratio"] = r["ours_us"] / one_m["ours_us"] if one_m else None
        r["qmm_m_ratio"] = r["qmm_us"] / one_m["qmm_us"] if one_m else None
    res = {"command": "python benchmarks/kernels_chain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": hardware.device_info(), "face": face, "copy_gbps": copy, "shape": args.shape,
           "layers": args.layers, "scale": args.scale, "group": args.group, "dtype": str(dtype).split(".")[-1],
           "rows": rows, "max_rel_err": max(r["rel_err_vs_qmm"] for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"copy probe {copy:.1f} GB/s, face {face}, max rel err vs mx.quantized_matmul {res['max_rel_err']:.1e}; "
          f"{args.out}")
    return 0 if res["max_rel_err"] < (1e-4 if dtype == mx.float32 else 2e-2) else 1


if __name__ == "__main__":
    raise SystemExit(main())
