"""Pure-MLX references of the quantized mat-vec kernels (the face that runs everywhere).

``quantized_matvec_reference`` is literally dequantize-then-matmul, so it agrees with
``mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size, bits)`` up to float rounding.

``replica_matvec_reference`` serves K replicas that share one set of packed codes but each have their own
scales/biases (the replicated ensembles of ``mlx_holo.replicate``). It uses the group decomposition
    y_k[m, o] = sum_g s_k[o, g] * (q[o, g, :] . x[m, g, :]) + b_k[o, g] * sum(x[m, g, :]),
which is how MLX's own ``qdot`` (Metal ``qmv``) folds the affine parameters, and what makes K replicas cheap in
the GPU faces: per group only the integer dot product and the activation sum are needed, then K (scale, bias)
pairs. ``replica_matvec_naive`` (K separate dequantize-matmuls) is kept for the tests.
"""
from __future__ import annotations

import mlx.core as mx


def unpack_codes(w_packed: mx.array, bits: int, group_size: int) -> mx.array:
    """w_packed uint32 [out, in * bits // 32] -> codes as exact float32 [out, in] (dequantize with s=1, b=0)."""
    out, words = w_packed.shape
    n_groups = words * 32 // bits // group_size
    one = mx.ones((out, n_groups), dtype=mx.float32)
    return mx.dequantize(w_packed, one, mx.zeros_like(one), group_size=group_size, bits=bits)


def quantized_matvec_reference(x: mx.array, w_packed: mx.array, scales: mx.array, biases: mx.array,
                               bits: int, group_size: int) -> mx.array:
    """x [M, in], w_packed [out, in*bits/32], scales/biases [out, in/g] -> y [M, out] in x's dtype."""
    w = mx.dequantize(w_packed, scales.astype(mx.float32), biases.astype(mx.float32),
                      group_size=group_size, bits=bits)  # w: [out, in]
    return (x.astype(mx.float32) @ w.T).astype(x.dtype)


def replica_matvec_reference(x: mx.array, w_packed: mx.array, scales: mx.array, biases: mx.array,
                             bits: int, group_size: int) -> mx.array:
    """x [M, in], codes shared, scales/biases [K, out, in/g] -> y [K, M, out] via the group decomposition."""
    n_rep, out, n_groups = scales.shape
    m, n = x.shape
    q = unpack_codes(w_packed, bits, group_size).reshape(out, n_groups, group_size)  # q: [out, G, g]
    xg = x.astype(mx.float32).reshape(m, n_groups, group_size)                      # xg: [M, G, g]
    qx = q.transpose(1, 0, 2) @ xg.transpose(1, 2, 0)                               # qx: [G, out, M]
    sx = xg.sum(axis=2)                                                              # sx: [M, G]
    s = scales.astype(mx.float32)                                                    # s: [K, out, G]
    b = biases.astype(mx.float32)
    y = (s[..., None] * qx.transpose(1, 0, 2)[None]).sum(axis=2)                     # y: [K, out, M]
    y = y + b @ sx.T                                                                 # [K, out, G] @ [G, M]
    return y.transpose(0, 2, 1).astype(x.dtype)                                      # [K, M, out]


def replica_matvec_naive(x: mx.array, w_packed: mx.array, scales: mx.array, biases: mx.array,
                         bits: int, group_size: int) -> mx.array:
    """K independent dequantize-then-matmul products -> y [K, M, out]."""
    return mx.stack([quantized_matvec_reference(x, w_packed, scales[k], biases[k], bits, group_size)
                     for k in range(scales.shape[0])])
