"""Quantized matrix-vector products on MLX's affine format, with K replicas over one set of codes.

Small-batch decoding (M = 1..8 rows of activations) is memory bound: the time is the bytes of packed codes,
scales and biases read. Each kernel has three faces sharing one logic (see ``quant_matvec.cu``):
a Metal body for ``mx.fast.metal_kernel``, a CUDA twin for ``mx.fast.cuda_kernel`` and the pure-MLX reference
in ``reference.py``; ``active_backend()`` picks one (Metal, else CUDA, else the reference).

Group-wise affine quantization as in GPTQ (Frantar et al. 2022) / AWQ (Lin et al. 2023), stored in MLX's layout;
the per-group fold ``s * (q.x) + b * sum(x)`` is the one MLX's ``qmv`` uses, and it lets K replicas (shared
codes, own scales/biases) read the codes once.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

from mlx_holo.quant.formats import FormatError, check_affine

from . import source
from .reference import quantized_matvec_reference, replica_matvec_reference

BACKENDS = ("metal", "cuda", "reference")
X_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def active_backend() -> str:
    """'metal' when Metal is available, else 'cuda' when MLX's CUDA back-end has a device, else 'reference'."""
    from mlx_holo.hardware import backend

    b = backend()
    return "reference" if b == "cpu" else b


@dataclass(frozen=True)
class LaunchConfig:
    """How the GPU faces tile the work: a warp (simdgroup) owns ``rows_per_warp`` output rows, a block holds
    ``warps_per_block`` warps, and each lane consumes ``unit`` codes per step (``unit * bits / 32`` words)."""

    rows_per_warp: int
    warps_per_block: int
    unit: int

    def blocks(self, n_out: int) -> int:
        return -(-n_out // (self.rows_per_warp * self.warps_per_block))

    def grid(self, n_out: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(grid in threads, threadgroup) as both mx.fast kernel calls take them."""
        threads = 32 * self.warps_per_block
        return (self.blocks(n_out) * threads, 1, 1), (threads, 1, 1)


def launch_config(bits: int, n_in: int, n_out: int, m: int = 1, k: int = 1, *, rows_per_warp: int | None = None,
                  warps_per_block: int | None = None, unit: int | None = None) -> LaunchConfig:
    """Default tiling. unit: the one of 128/64/32 dividing n_in that keeps the 32 lanes busiest, ties to the
    larger (16-byte loads when unit*bits % 128 == 0). rows_per_warp: about 32 packed words in flight per lane,
    at most 4 rows, and at most 16 accumulators (k * rows * m) per lane."""
    if unit is None:
        def score(u: int) -> tuple[float, int]:
            units = n_in // u
            return units / (32 * -(-units // 32)), u
        unit = max((u for u in (128, 64, 32) if n_in % u == 0), key=score)
    if unit % 32 or n_in % unit:
        raise FormatError(f"unit={unit} must be a multiple of 32 dividing the input width {n_in}")
    if rows_per_warp is None:
        rows_per_warp = max(1, min(4, 32 // (unit * bits // 32)))
        while rows_per_warp > 1 and k * rows_per_warp * m > 16:
            rows_per_warp -= 1
    return LaunchConfig(rows_per_warp, warps_per_block or 4, unit)


@lru_cache(maxsize=None)
def _kernel(face: str):
    if face == "metal":
        return mx.fast.metal_kernel(name=source.kernel_name("metal"), input_names=list(source.INPUT_NAMES),
                                    output_names=list(source.OUTPUT_NAMES), source=source.METAL_BODY,
                                    header=source.METAL_HEADER)
    return mx.fast.cuda_kernel(name=source.kernel_name("cuda"), input_names=list(source.INPUT_NAMES),
                               output_names=list(source.OUTPUT_NAMES), source=source.CUDA_BODY,
                               header=source.CUDA_HEADER)


def _check(x: mx.array, w_packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int):
    """x [M, in], w_packed uint32 [out, in*bits/32], scales/biases [K, out, in/g]."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, in], got shape {x.shape}")
    m, n = x.shape
    check_affine(bits, group_size, n)
    n_rep, n_out, n_groups = scales.shape
    if w_packed.dtype != mx.uint32 or w_packed.shape != (n_out, n * bits // 32):
        raise ValueError(f"w_packed must be uint32 [{n_out}, {n * bits // 32}], got {w_packed.dtype} {w_packed.shape}")
    if n_groups != n // group_size or biases.shape != scales.shape:
        raise ValueError(f"scales/biases must be [K, {n_out}, {n // group_size}], got {scales.shape}/{biases.shape}")


def _gpu(face: str, x, w_packed, scales, biases, bits, group_size, config: LaunchConfig | None) -> mx.array:
    """Run one GPU face: x [M, in], scales/biases [K, out, G] -> y [K, M, out]."""
    m, n = x.shape
    n_rep, n_out, _ = scales.shape
    if x.dtype not in X_DTYPES or scales.dtype not in X_DTYPES or biases.dtype != scales.dtype:
        raise ValueError(f"unsupported dtypes x={x.dtype} scales={scales.dtype} biases={biases.dtype}")
    cfg = config or launch_config(bits, n, n_out, m, n_rep)
    grid, group = cfg.grid(n_out)
    template = source.template_args(x.dtype, scales.dtype, bits, group_size, n, n_out, m, n_rep,
                                    cfg.rows_per_warp, cfg.warps_per_block, cfg.unit)
    return _kernel(face)(inputs=[x, w_packed, scales, biases], template=template, grid=grid, threadgroup=group,
                         output_shapes=[(n_rep, m, n_out)], output_dtypes=[x.dtype], stream=mx.gpu)[0]


def replica_matvec(x: mx.array, w_packed: mx.array, scales: mx.array, biases: mx.array, bits: int,
                   group_size: int, *, backend: str | None = None, config: LaunchConfig | None = None) -> mx.array:
    """x [M, in], shared codes w_packed [out, in*bits/32], scales/biases [K, out, in/g] -> y [K, M, out].

    The codes are read once for all K replicas. backend: 'metal' | 'cuda' | 'reference' (default: active_backend()).
    GPU faces assume 16-byte aligned, row-contiguous buffers (whole arrays or row slices)."""
    _check(x, w_packed, scales, biases, bits, group_size)
    face = backend or active_backend()
    if face not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {face!r}")
    if face == "reference":
        return replica_matvec_reference(x, w_packed, scales, biases, bits, group_size)
    if face != active_backend():
        raise RuntimeError(f"backend {face!r} is not available here (active: {active_backend()!r})")
    return _gpu(face, x, w_packed, scales, biases, bits, group_size, config)


def quantized_matvec(x: mx.array, w_packed: mx.array, scales: mx.array, biases: mx.array, bits: int,
                     group_size: int, *, backend: str | None = None, config: LaunchConfig | None = None) -> mx.array:
    """x [M, in], w_packed [out, in*bits/32], scales/biases [out, in/g] -> y [M, out]; equals
    mx.quantized_matmul(x, w_packed, scales, biases, transpose=True, group_size=group_size, bits=bits)."""
    if scales.ndim != 2:
        raise ValueError(f"scales must be [out, in/g], got shape {scales.shape}")
    face = backend or active_backend()
    if face == "reference":
        _check(x, w_packed, scales[None], biases[None], bits, group_size)
        return quantized_matvec_reference(x, w_packed, scales, biases, bits, group_size)
    return replica_matvec(x, w_packed, scales[None], biases[None], bits, group_size, backend=face, config=config)[0]
