"""Quantized mat-vec kernels: the pure-MLX references against an independent numpy unpacker, the replica group
decomposition against K naive products, dispatch on this (CPU) machine, and the GPU faces' logic on the CPU:
the CUDA twin compiled by nvcc (device code: no spills) and its per-lane code run on the host by an nvcc-built
harness; the Metal face's per-lane code run by a g++-built harness."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_holo import kernels as K
from mlx_holo.kernels import source
from mlx_holo.kernels.host_truth import np_matvec as host_np_matvec, np_unpack
from mlx_holo.quant.formats import pack

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


def np_matvec(x, packed, scales, biases, bits, group_size):
    """float64 y [K, M, out] with scales/biases [K, out, G] (MLX arrays of any float dtype)."""
    f32 = lambda a: np.asarray(a.astype(mx.float32))  # noqa: E731
    return host_np_matvec(f32(x), np.asarray(packed), f32(scales), f32(biases), bits, group_size)


def make_layer(n_out, n_in, bits, group_size, m, seed, dtype=mx.float32):
    mx.random.seed(seed)
    w = mx.random.normal((n_out, n_in)).astype(dtype)
    x = mx.random.normal((m, n_in)).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return x, wq, s, b


def replicas(s, b, k, seed):
    """k distinct (scale, bias) sets over the same codes."""
    rng = np.random.default_rng(seed)
    f = mx.array(rng.uniform(0.8, 1.2, (k, 1, 1)).astype(np.float32))
    d = mx.array(rng.normal(0, 0.05, (k,) + s.shape).astype(np.float32))
    return (s[None] * f).astype(s.dtype), (b[None] + d).astype(b.dtype)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("bits", BITS)
def test_np_unpack_recovers_known_codes(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(5, 96))
    got = np_unpack(np.asarray(pack(mx.array(codes.astype(np.uint8)), bits)), bits, 96)
    assert np.array_equal(got, codes)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_reference_matches_numpy_and_quantized_matmul(bits, group_size):
    x, wq, s, b = make_layer(24, 256, bits, group_size, 3, seed=bits * 1000 + group_size)
    y = K.quantized_matvec_reference(x, wq, s, b, bits, group_size)
    assert y.shape == (3, 24) and y.dtype == mx.float32
    assert rel_err(y, np_matvec(x, wq, s[None], b[None], bits, group_size)[0]) < 1e-5
    qm = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group_size, bits=bits)
    assert rel_err(y, qm) < 1e-5
    assert np.array_equal(np.asarray(K.unpack_codes(wq, bits, group_size)), np_unpack(np.asarray(wq), bits, 256))


@pytest.mark.parametrize("bits", BITS)
def test_replica_decomposition_equals_naive(bits):
    x, wq, s, b = make_layer(40, 384, bits, 64, 2, seed=7 + bits)
    S, B = replicas(s, b, 3, seed=bits)
    fast = K.replica_matvec_reference(x, wq, S, B, bits, 64)
    naive = K.replica_matvec_naive(x, wq, S, B, bits, 64)
    assert fast.shape == (3, 2, 40)
    assert rel_err(fast, naive) < 1e-5
    assert rel_err(fast, np_matvec(x, wq, S, B, bits, 64)) < 1e-5
    # the replicas really differ, and each equals a single-replica product with its own parameters
    assert rel_err(fast[0], fast[1]) > 1e-2
    assert rel_err(fast[2], K.quantized_matvec_reference(x, wq, S[2], B[2], bits, 64)) < 1e-5


def test_replica_reference_low_precision_params():
    x, wq, s, b = make_layer(16, 128, 4, 32, 1, seed=3, dtype=mx.bfloat16)
    S, B = replicas(s, b, 4, seed=3)
    y = K.replica_matvec_reference(x, wq, S, B, 4, 32)
    assert y.dtype == mx.bfloat16
    assert rel_err(y.astype(mx.float32), np_matvec(x, wq, S, B, 4, 32)) < 1e-2  # bf16 output rounding


@pytest.mark.skipif(K.active_backend() != "reference", reason="a GPU back-end is present")
def test_dispatch_on_cpu_picks_the_reference():
    x, wq, s, b = make_layer(8, 128, 3, 32, 2, seed=11)
    assert K.active_backend() == "reference"
    y = K.quantized_matvec(x, wq, s, b, 3, 32)
    assert np.array_equal(np.asarray(y), np.asarray(K.quantized_matvec_reference(x, wq, s, b, 3, 32)))
    S, B = replicas(s, b, 2, seed=1)
    yr = K.replica_matvec(x, wq, S, B, 3, 32)
    assert np.array_equal(np.asarray(yr), np.asarray(K.replica_matvec_reference(x, wq, S, B, 3, 32)))
    with pytest.raises(RuntimeError, match="not available"):
        K.quantized_matvec(x, wq, s, b, 3, 32, backend="cuda")
    with pytest.raises(ValueError):
        K.quantized_matvec(x, wq, s, b, 4, 32)  # wrong bit-width for these codes


def test_launch_config_properties():
    for bits in BITS:
        for n_in, n_out, m, k in ((4096, 14336, 1, 1), (14336, 4096, 1, 4), (576, 1536, 8, 3), (640, 100, 2, 2)):
            c = K.launch_config(bits, n_in, n_out, m, k)
            assert n_in % c.unit == 0 and c.unit % 32 == 0
            assert c.blocks(n_out) * c.warps_per_block * c.rows_per_warp >= n_out
            assert (c.blocks(n_out) - 1) * c.warps_per_block * c.rows_per_warp < n_out
            assert 1 <= c.rows_per_warp <= 4 and c.rows_per_warp * (c.unit * bits // 32) <= 32
            assert c.rows_per_warp == 1 or k * m * c.rows_per_warp <= 16
    assert K.launch_config(4, 4096, 14336).unit == 128  # 32 units: every lane busy, 16-byte loads
    assert K.launch_config(4, 576, 576).unit == 32      # 576 = 18 * 32


# ---------------------------------------------------------------- GPU faces checked on the CPU
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")

# (dtype, bits, group, in, out, m, k, rows_per_warp, warps, unit): straddling widths, partial last warp,
# in not a multiple of 128, groups larger than the unit, several rows/replicas/activations.
HOST_CASES = [
    (mx.float32, 3, 32, 256, 13, 2, 3, 4, 2, 128),
    (mx.float32, 5, 128, 640, 10, 1, 2, 3, 2, 32),
    (mx.float32, 6, 64, 192, 9, 3, 1, 2, 1, 64),
    (mx.float32, 2, 64, 576, 7, 1, 1, 4, 4, 32),
    (mx.float32, 8, 32, 256, 6, 2, 2, 1, 4, 128),
    (mx.float32, 4, 128, 512, 5, 1, 4, 2, 1, 64),
    (mx.float16, 5, 32, 320, 6, 2, 2, 2, 2, 32),
    (mx.bfloat16, 3, 64, 384, 6, 1, 2, 3, 1, 128),
]


def _case_data(case, seed):
    dtype, bits, gs, n_in, n_out, m, k = case[:7]
    x, wq, s, b = make_layer(n_out, n_in, bits, gs, m, seed, dtype)
    S, B = replicas(s, b, k, seed)
    return x, wq, S, B


def _raw(a: mx.array) -> bytes:
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(a)).tobytes()


def _run_harness(exe: Path, tmp: Path, cases, tol):
    for i, case in enumerate(cases):
        x, wq, S, B = _case_data(case, seed=100 + i)
        d = tmp / f"case{i}"
        d.mkdir()
        for name, arr in (("x", x), ("w", wq), ("scales", S), ("biases", B)):
            (d / f"{name}.bin").write_bytes(_raw(arr))
        subprocess.run([str(exe), str(i), str(d)], check=True, timeout=60)
        dtype, bits, gs, n_in, n_out, m, k = case[:7]
        y = np.fromfile(d / "y.bin", dtype=np.float32).reshape(k, m, n_out)
        ref = np_matvec(x, wq, S, B, bits, gs)
        assert rel_err(y, ref) < tol, (case, rel_err(y, ref))
        ref_mlx = K.replica_matvec_reference(x, wq, S, B, bits, gs).astype(mx.float32)  # rounded to x's dtype
        assert rel_err(y, ref_mlx) < (tol if dtype == mx.float32 else 1e-2)


def _template(case):
    dtype, bits, gs, n_in, n_out, m, k, r, warps, unit = case
    return source.template_args(dtype, dtype, bits, gs, n_in, n_out, m, k, r, warps, unit)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_twin_compiles_without_spills(tmp_path):
    inst = {}
    for bits in BITS:
        for m, k in ((1, 1), (1, 4), (8, 1)):
            c = K.launch_config(bits, 4096, 14336, m, k)
            inst[f"b{bits}_m{m}_k{k}"] = source.template_args(mx.bfloat16, mx.bfloat16, bits, 64, 4096, 14336, m, k,
                                                              c.rows_per_warp, c.warps_per_block, c.unit)
    inst["f16_576"] = _template((mx.float16, 3, 32, 576, 576, 2, 3, 2, 4, 32))
    inst["f32_odd"] = _template((mx.float32, 5, 128, 640, 100, 2, 3, 3, 2, 32))
    (tmp_path / "tu.cu").write_text(source.cuda_translation_unit(inst))
    stub = tmp_path / source.UTILS_STUB_PATH
    stub.parent.mkdir(parents=True)
    stub.write_text(source.UTILS_STUB)
    res = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", f"-I{tmp_path}",
                          str(tmp_path / "tu.cu"), "-o", str(tmp_path / "tu.cubin")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", res.stderr)]
    assert len(frames) == len(inst) and len(regs) == len(inst)
    assert all(f == ("0", "0", "0") for f in frames), frames  # register arrays stay in registers
    assert max(regs) <= 128, regs


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_twin_lane_logic_on_host(tmp_path):
    (tmp_path / "h.cu").write_text(source.cuda_host_harness([_template(c) for c in HOST_CASES]))
    res = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", str(tmp_path / "h.cu"), "-o", str(tmp_path / "h")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    _run_harness(tmp_path / "h", tmp_path, HOST_CASES, tol=1e-5)


@pytest.mark.skipif(GXX is None, reason="g++ not on PATH")
def test_metal_face_lane_logic_on_host(tmp_path):
    cases = [c for c in HOST_CASES if c[0] == mx.float32]
    (tmp_path / "h.cpp").write_text(source.metal_host_harness([_template(c) for c in cases]))
    res = subprocess.run([GXX, "-std=c++14", "-O1", "-Wall", "-Werror", str(tmp_path / "h.cpp"), "-o",
                          str(tmp_path / "h")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    _run_harness(tmp_path / "h", tmp_path, cases, tol=1e-5)
