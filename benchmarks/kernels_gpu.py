"""Check and time the CUDA twin of the quantized mat-vec kernels on an NVIDIA GPU (run through kernels_gpu.sh).

1. correctness: CUDA twin vs the pure-MLX reference and vs mx.quantized_matmul (max relative error), for every
   bit-width and group size, several M, K, dtypes and an input width that is not a multiple of 128;
2. speed at M=1 on 16 layers of [out 14336, in 4096] (bf16 activations, bf16 scales/biases, group 64 unless
   --group): mx.quantized_matmul, our kernel (default tiling, and the best of a small tiling sweep), and
   replica_matvec for K = 2, 3, 4; GB/s = bytes of packed codes + scales + biases read / time, as % of the
   measured copy bandwidth (read + write of a 2 GiB buffer);
3. tables on stdout (diagnostics on stderr) and everything as JSON in --out/kernels_gpu.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
try:
    from mlx_holo import kernels as K
except ImportError:  # the project not pip-installed: map mlx_holo.kernels onto <repo>/kernels
    sys.path.insert(0, str(ROOT))
    import mlx_holo

    mlx_holo.__path__.append(str(ROOT))
    from mlx_holo import kernels as K

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 2e-2}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30))


def layer(n_out, n_in, bits, gs, dtype, seed):
    mx.random.seed(seed)
    w = mx.random.normal((n_out, n_in)).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    mx.eval(wq, s, b)
    return wq, s, b


def replica_params(s, b, k):
    f = mx.linspace(0.9, 1.1, k).reshape(k, 1, 1)
    S, B = (s[None] * f).astype(s.dtype), (b[None] + 0.01 * f).astype(b.dtype)
    mx.eval(S, B)
    return S, B


def correctness(quick: bool) -> list[dict]:
    cases = [(bits, gs, 1, 1, mx.bfloat16, 4096, 512) for bits in BITS for gs in GROUPS]
    cases += [(bits, 64, m, k, mx.bfloat16, 4096, 300) for bits in BITS for m, k in ((3, 1), (8, 1), (1, 3), (2, 4))]
    cases += [(bits, 64, 2, 2, dt, 1024, 257) for bits in BITS for dt in (mx.float16, mx.float32)]
    cases += [(bits, 32, 1, 2, mx.bfloat16, 576, 100) for bits in BITS]  # unit 32, partial last warp
    if quick:
        cases = cases[::3]
    rows = []
    for i, (bits, gs, m, k, dt, n_in, n_out) in enumerate(cases):
        wq, s, b = layer(n_out, n_in, bits, gs, dt, seed=i)
        x = mx.random.normal((m, n_in)).astype(dt)
        S, B = replica_params(s, b, k)
        y = K.replica_matvec(x, wq, S, B, bits, gs, backend="cuda")
        with mx.stream(mx.cpu):  # exact fp32 products (the GPU's fp32 matmul may use TF32: ~3e-4 off)
            ref = K.replica_matvec_reference(x, wq, S, B, bits, gs)
        row = dict(bits=bits, group=gs, m=m, k=k, dtype=str(dt).split(".")[-1], n_in=n_in, n_out=n_out,
                   rel_err_reference=rel(y, ref))
        if k == 1:  # the replica's own scales/biases (replica_params scales even a single replica)
            row["rel_err_quantized_matmul"] = rel(y[0], mx.quantized_matmul(x, wq, S[0], B[0], transpose=True,
                                                                          group_size=gs, bits=bits))
        row["ok"] = max(v for key, v in row.items() if key.startswith("rel_err")) < TOL[dt]
        rows.append(row)
        log(row)
    return rows


def np_truth(x, wq, s, b, bits: int, gs: int):
    """float64 y [M, out] from a host-side word/shift unpack of the LSB-first bitstream (no MLX in the loop)."""
    import numpy as np

    from mlx_holo.kernels.host_truth import np_matvec
    f32 = lambda a: np.asarray(a.astype(mx.float32))  # noqa: E731
    return np_matvec(f32(x), np.asarray(wq), f32(s)[None], f32(b)[None], bits, gs)[0]


def consistency() -> list[dict]:
    """Which of MLX's own ops agree with the host truth on this back-end: quantized_matmul, dequantize + matmul,
    the CUDA twin, and CPU-stream quantize/quantized_matmul (is the packing the same on both back-ends?)."""
    import numpy as np
    rows = []
    for dt in (mx.float32, mx.bfloat16):
        for bits in BITS:
            for m in (1, 8):
                mx.random.seed(bits * 10 + m)
                w = mx.random.normal((512, 4096)).astype(dt)
                x = mx.random.normal((m, 4096)).astype(dt)
                wq, s, b = mx.quantize(w, group_size=64, bits=bits)
                wq_c, s_c, b_c = mx.quantize(w, group_size=64, bits=bits, stream=mx.cpu)
                truth = np_truth(x, wq, s, b, bits, 64)
                err = lambda y: float(np.abs(np.asarray(y.astype(mx.float32), np.float64) - truth).max()  # noqa: E731
                                      / np.abs(truth).max())
                row = dict(bits=bits, group=64, m=m, dtype=str(dt).split(".")[-1],
                           same_packing_cpu_gpu=bool(mx.array_equal(wq, wq_c).item()),
                           same_scales_cpu_gpu=bool(mx.allclose(s.astype(mx.float32), s_c.astype(mx.float32)).item()),
                           qmm_gpu=err(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=bits)),
                           qmm_cpu=err(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=bits,
                                                           stream=mx.cpu)),
                           dequant_matmul_gpu=err(K.quantized_matvec_reference(x, wq, s, b, bits, 64)),
                           cuda_twin=err(K.quantized_matvec(x, wq, s, b, bits, 64, backend="cuda")))
                rows.append(row)
                log(row)
    return rows


def timeit(fn, iters: int) -> float:
    """Median seconds of one fn() evaluation (fn returns the arrays to evaluate)."""
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(iters: int) -> float:
    a = mx.random.uniform(shape=(2**30,)).astype(mx.bfloat16)  # 2 GiB
    mx.eval(a)
    t = timeit(lambda: [a + 1], iters)
    return 2 * a.nbytes / t / 1e9


def sweep_configs(bits: int, n_in: int, n_out: int) -> list[K.LaunchConfig]:
    units = [u for u in (128, 64, 32) if n_in % u == 0]
    out = [K.launch_config(bits, n_in, n_out)]
    for u in units:
        for r in (1, 2, 4):
            if r * u * bits // 32 > 48:
                continue
            for wpb in (2, 4, 8):
                c = K.LaunchConfig(r, wpb, u)
                if c not in out:
                    out.append(c)
    return out


def speed(args, copy_gbs: float) -> list[dict]:
    n_out, n_in, gs, n_layers = 14336, 4096, args.group, args.layers
    x = mx.random.normal((1, n_in)).astype(mx.bfloat16)
    rows = []
    for bits in args.bits:
        layers = [layer(n_out, n_in, bits, gs, mx.bfloat16, seed=100 + j) for j in range(n_layers)]
        reps = {k: [replica_params(s, b, k) for _, s, b in layers] for k in (2, 3, 4)}
        code_bytes = sum(wq.nbytes for wq, _, _ in layers)
        param_bytes = sum(s.nbytes + b.nbytes for _, s, b in layers)

        def record(name, k, t, cfg=None):
            nbytes = code_bytes + k * param_bytes
            row = dict(bits=bits, group=gs, kernel=name, k=k, layers=n_layers, seconds=t, us_per_layer=1e6 * t / n_layers,
                       bytes=nbytes, gbs=nbytes / t / 1e9, pct_copy=100 * nbytes / t / 1e9 / copy_gbs,
                       config=None if cfg is None else vars(cfg))
            rows.append(row)
            log(row)
            return row

        t = timeit(lambda: [mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)
                            for wq, s, b in layers], args.iters)
        record("mx.quantized_matmul", 1, t)
        default = K.launch_config(bits, n_in, n_out)
        best = None
        for cfg in (sweep_configs(bits, n_in, n_out) if args.sweep else [default]):
            t = timeit(lambda: [K.quantized_matvec(x, wq, s, b, bits, gs, backend="cuda", config=cfg)
                                for wq, s, b in layers], args.iters)
            log(f"sweep bits={bits} {vars(cfg)}: {1e6 * t / n_layers:.1f} us/layer")
            if cfg == default:
                record("quantized_matvec", 1, t, cfg)
            if best is None or t < best[0]:
                best = (t, cfg)
        record("quantized_matvec[best]", 1, best[0], best[1])
        for k in (2, 3, 4):
            t = timeit(lambda: [K.replica_matvec(x, wq, S, B, bits, gs, backend="cuda")
                                for (wq, _, _), (S, B) in zip(layers, reps[k])], args.iters)
            record("replica_matvec", k, t, K.launch_config(bits, n_in, n_out, 1, k))
        layers = reps = None  # release before the next bit-width
        mx.clear_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'bits':>4} {'kernel':<24} {'K':>2} {'us/layer':>9} {'GB/s':>8} {'%copy':>6}  config"
    lines = [head, "-" * len(head)]
    for r in rows:
        cfg = "" if r["config"] is None else "R={rows_per_warp} W={warps_per_block} U={unit}".format(**r["config"])
        lines.append(f"{r['bits']:>4} {r['kernel']:<24} {r['k']:>2} {r['us_per_layer']:>9.1f} {r['gbs']:>8.0f} "
                     f"{r['pct_copy']:>6.1f}  {cfg}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/kernels_gpu", help="folder for kernels_gpu.json")
    p.add_argument("--group", type=int, default=64, help="group size of the timed layers")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="time the default tiling only")
    p.add_argument("--quick", action="store_true", help="a third of the correctness cases, no sweep")
    p.add_argument("--parts", type=lambda v: v.split(","), default=["correctness", "speed"],
                   help="comma-separated, run in this order: consistency (MLX's own ops vs a host float64 truth, "
                        "CPU vs GPU packing; slow: every op JIT-compiles), correctness, speed")
    p.add_argument("--bits", type=lambda v: [int(b) for b in v.split(",")], default=list(BITS),
                   help="bit-widths to time, comma-separated")
    args = p.parse_args(argv)
    if args.quick:
        args.sweep = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(mlx=mx.__version__, device=str(mx.default_device()), backend=K.active_backend(),
                device_info={k: str(v) for k, v in mx.device_info().items()} if hasattr(mx, "device_info") else {})
    log(info)
    result = dict(info=info)
    if info["backend"] != "cuda":
        print(f"CUDA back-end not active (backend={info['backend']}); nothing to check", file=sys.stderr)
        (out / "kernels_gpu.json").write_text(json.dumps(result, indent=1))
        return 2
    bad = []
    for part in args.parts:  # the JSON is rewritten after each part: a run cut short keeps what it finished
        if part == "consistency":
            result["consistency"] = consistency()
        elif part == "correctness":
            result["correctness"] = correctness(args.quick)
            bad = [r for r in result["correctness"] if not r["ok"]]
            print(f"correctness: {len(result['correctness']) - len(bad)}/{len(result['correctness'])} cases "
                  "within tolerance")
            for r in bad:
                print("  FAILED", r)
        elif part == "speed":
            result["copy_gbs"] = copy_bandwidth(args.iters)
            print(f"copy bandwidth (read+write): {result['copy_gbs']:.0f} GB/s")
            result["speed"] = speed(args, result["copy_gbs"])
            print(table(result["speed"]))
        (out / "kernels_gpu.json").write_text(json.dumps(result, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
