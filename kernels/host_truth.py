"""Host-side float64 truth for the quantized mat-vec kernels: numpy only, no MLX op in the loop.

Shared by the tests (``tests/test_kernels.py``) and the GPU benchmark (``benchmarks/kernels_gpu.py``, which runs where
pytest may be missing). The unpacker works by word/shift arithmetic on the LSB-first bitstream of little-endian
uint32 words, independent of ``quant.formats.unpack`` (np.unpackbits) and of ``mx.dequantize``.
"""
from __future__ import annotations

import numpy as np


def np_unpack(packed: np.ndarray, bits: int, n_in: int) -> np.ndarray:
    """packed uint32 [out, n_in * bits // 32] -> codes uint64 [out, n_in]."""
    p = np.asarray(packed).astype(np.uint64)
    p = np.concatenate([p, np.zeros((p.shape[0], 1), np.uint64)], axis=1)  # room for the last straddle
    bit = np.arange(n_in) * bits
    lo, hi, s = p[:, bit // 32], p[:, bit // 32 + 1], (bit % 32).astype(np.uint64)
    return (((hi << np.uint64(32)) | lo) >> s) & np.uint64(2**bits - 1)


def np_matvec(x, packed, scales, biases, bits: int, group_size: int) -> np.ndarray:
    """x [M, in], packed codes, scales/biases [K, out, G] (any array type numpy reads as float) -> float64 y [K, M,
    out] = x @ (s * q + b)^T per replica."""
    x = np.asarray(x, np.float64)
    q = np_unpack(packed, bits, x.shape[1]).astype(np.float64)                      # q: [out, in]
    s = np.repeat(np.asarray(scales, np.float64), group_size, axis=2)                # s: [K, out, in]
    b = np.repeat(np.asarray(biases, np.float64), group_size, axis=2)
    return np.einsum("mi,koi->kmo", x, s * q[None] + b)
