"""MLX quantized storage formats: affine (2-8 bit, group 32/64/128) and the float modes.

The affine layout is MLX's own (``mx.quantize``): per row, groups of ``group_size`` consecutive input
features share a scale and a bias, ``w ~= scale * q + bias`` with ``q`` in ``[0, 2**bits - 1]``; codes are a
contiguous least-significant-bit-first bitstream, read as little-endian uint32 words. ``pack`` is checked against
``mx.quantize`` in the tests, so anything we write loads in stock ``mlx_lm``.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..options import AFFINE_BITS, FLOAT_MODES, GROUP_SIZES  # noqa: F401 (re-exported: the quantizers' vocabulary)


class FormatError(ValueError):
    """A bit-width, group size or shape that the MLX formats cannot hold."""


def check_affine(bits: int, group_size: int, in_features: int | None = None) -> None:
    """Raise FormatError unless (bits, group_size) is a storable MLX affine format for this width."""
    if bits not in AFFINE_BITS:
        raise FormatError(f"bits={bits} is not supported; choose one of {AFFINE_BITS}")
    if group_size not in GROUP_SIZES:
        raise FormatError(f"group_size={group_size} is not supported; choose one of {GROUP_SIZES}")
    if in_features is not None and in_features % group_size:
        raise FormatError(f"input width {in_features} is not a multiple of group_size={group_size}")


def fit_group(width: int, group_size: int) -> int | None:
    """The group size a layer with ``width`` inputs gets when ``group_size`` is asked for: itself when it divides
    the width, else the largest smaller MLX group size that does (MLX stores a group size per layer, so e.g.
    SmolLM2's 576-wide layers take 64 when 128 is asked). Per-channel (-1) is stored as 128/64/32-wide groups and
    needs width % 32 == 0. None: no group fits (the layer stays float, as ``mlx_lm.convert`` leaves it)."""
    if group_size == -1:
        return -1 if width % 32 == 0 else None
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if g <= group_size and width % g == 0), None)


def pack(codes: mx.array | np.ndarray, bits: int) -> mx.array:
    """codes: [out, in] integers in [0, 2**bits) -> packed uint32 [out, in * bits // 32].

    Eight codes fill ``bits`` bytes of the little-endian bitstream, so they are packed as one uint64 each (code i
    at bit i * bits) whose low ``bits`` bytes are kept; whole-byte widths skip the uint64."""
    q = np.asarray(codes)
    assert q.ndim == 2 and (q.shape[1] * bits) % 32 == 0, (q.shape, bits)
    assert int(q.max(initial=0)) < 2**bits, "code out of range"
    q = q.astype(np.uint8, copy=False)
    rows = q.shape[0]
    if bits == 8:
        return mx.array(np.ascontiguousarray(q).view(np.uint32))
    if 8 % bits == 0:  # 2 or 4 codes per byte
        per = 8 // bits
        q = q.reshape(rows, -1, per)
        byte = q[..., 0].copy()
        for i in range(1, per):
            byte |= q[..., i] << np.uint8(i * bits)
        return mx.array(byte.view(np.uint32))
    q = q.reshape(rows, -1, 8).astype(np.uint64)  # [out, in / 8, 8]
    word = q[..., 0].copy()
    for i in range(1, 8):
        word |= q[..., i] << np.uint64(i * bits)
    packed = word[..., None].view(np.uint8)[..., :bits]  # [out, in / 8, bits] (little-endian)
    return mx.array(np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32))


def unpack(packed: mx.array | np.ndarray, bits: int, in_features: int) -> mx.array:
    """packed uint32 [out, in * bits // 32] -> codes uint8 [out, in] (``pack``'s inverse)."""
    p = np.ascontiguousarray(np.asarray(packed, dtype=np.uint32))
    rows, mask = p.shape[0], (1 << bits) - 1
    b = p.view(np.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        out = np.stack([(b >> np.uint8(i * bits)) & np.uint8(mask) for i in range(per)], axis=-1)
        return mx.array(out.reshape(rows, -1)[:, :in_features])
    b = b.reshape(rows, -1, bits)  # [out, in / 8, bits]
    word = np.zeros((rows, b.shape[1], 8), np.uint8)
    word[..., :bits] = b
    word = word.view(np.uint64)[..., 0]  # [out, in / 8]
    out = np.stack([(word >> np.uint64(i * bits)) & np.uint64(mask) for i in range(8)], axis=-1)
    return mx.array(out.astype(np.uint8).reshape(rows, -1)[:, :in_features])


def dequantize(codes: mx.array, scales: mx.array, biases: mx.array, group_size: int | None = None) -> mx.array:
    """codes [out, in], scales/biases [out, in // g] -> w_hat [out, in] (float32). g is read off the shapes."""
    out, n = codes.shape
    group_size = n // scales.shape[1]
    q = codes.astype(mx.float32).reshape(out, n // group_size, group_size)
    w = q * scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
    return w.reshape(out, n)


@dataclass
class QuantizedWeight:
    """One layer's quantization: codes [out, in] (unpacked), scales/biases [out, in // g] -- MLX's affine format,
    or (``mode``) one of MLX's float formats, held as ``mx.quantize``'s packed words and scales.

    ``compact()`` swaps the unpacked codes for the packed uint32 words (bits/8 bytes per weight), which is how
    the streaming pipeline holds finished layers until they are saved.
    """

    codes: mx.array | None
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int
    wq: mx.array | None = None  # packed codes once compacted
    experts: int = 0  # > 0: a MoE SwitchLinear's E experts stacked as [E * out, in] rows (``stack_experts``)
    mode: str = "affine"  # or one of FLOAT_MODES: then codes is None, wq holds mx.quantize's words, biases None

    @property
    def shape(self) -> tuple[int, int]:
        if self.codes is not None:
            return tuple(self.codes.shape)
        return (self.wq.shape[0], self.wq.shape[1] * 32 // self.bits)

    def compact(self) -> "QuantizedWeight":
        """Pack and *evaluate* the codes: a lazy ``wq`` would keep the unpacked codes alive through its graph."""
        if self.wq is None:
            self.wq = self.packed()
        mx.eval(self.wq, self.scales, *([] if self.biases is None else [self.biases]))
        self.codes = None
        return self

    def unpacked(self) -> mx.array:
        return self.codes if self.codes is not None else unpack(self.wq, self.bits, self.shape[1])

    def stored_shape(self, a: mx.array) -> mx.array:
        """A per-row tensor [rows, k] (codes, packed words, scales, biases, w_hat) in the layout it is stored in:
        as is, or [E, rows / E, k] for stacked MoE experts (mlx-lm's QuantizedSwitchLinear)."""
        return a.reshape(self.experts, -1, a.shape[-1]) if self.experts else a

    def dequantize(self) -> mx.array:
        """-> w_hat [out, in] float32 ([E, out / E, in] for stacked experts)."""
        if self.mode != "affine":
            return self.stored_shape(mx.dequantize(self.wq, self.scales, self.biases, group_size=self.group_size,
                                                   bits=self.bits, mode=self.mode).astype(mx.float32))
        return self.stored_shape(dequantize(self.unpacked(), self.scales, self.biases, self.group_size))

    def packed(self) -> mx.array:
        return self.wq if self.wq is not None else pack(self.codes, self.bits)

    def nbytes(self, scale_dtype=mx.float16) -> dict:
        """Stored bytes: packed codes and the scale/bias tensors in ``scale_dtype``."""
        codes = self.shape[0] * self.shape[1] * self.bits // 8
        params = 2 * self.scales.size * scale_dtype.size
        return {"codes": codes, "scales_biases": params}


def float_quantize(w: mx.array, mode: str) -> QuantizedWeight:
    """MLX's float modes (mxfp4/nvfp4/mxfp8, MLX computes the scales): w [out, in] -> QuantizedWeight (packed)."""
    bits, g = FLOAT_MODES[mode]
    out = mx.quantize(w, group_size=g, bits=bits, mode=mode)
    wq, sc, bi = out if len(out) == 3 else (*out, None)
    mx.eval(wq, sc, *([] if bi is None else [bi]))
    return QuantizedWeight(None, sc, bi, bits, g, wq=wq, mode=mode)


def stack_experts(qws: list[QuantizedWeight]) -> QuantizedWeight:
    """E experts' QuantizedWeight [out, in] -> one [E * out, in] with ``experts = E`` (packed codes); rows stack
    freely because groups run along ``in``."""
    q0 = qws[0]
    if any((q.bits, q.group_size, q.mode) != (q0.bits, q0.group_size, q0.mode) for q in qws):
        raise ValueError("experts of one SwitchLinear must share bits, group size and mode")
    biases = None if q0.biases is None else mx.concatenate([q.biases for q in qws])
    q = QuantizedWeight(None, mx.concatenate([q.scales for q in qws]), biases, q0.bits, q0.group_size,
                        wq=mx.concatenate([q.packed() for q in qws]), experts=len(qws), mode=q0.mode)
    return q.compact()


def dequantize_f32(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                   mode: str = "affine") -> mx.array:
    """MLX-quantized words -> float32 weights. Affine scales/biases are widened to float32 first, so each weight is
    scale * q + bias in float32 -- what MLX's quantized matmul computes (its accumulation is in float32) -- rather
    than that value rounded to the scales' fp16."""
    if mode == "affine":
        scales = scales.astype(mx.float32)
        biases = None if biases is None else biases.astype(mx.float32)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Slices of rows of one matrix, each a QuantizedWeight of the same format -> one [sum rows, in] (packed)."""
    q0 = parts[0]
    if len(parts) == 1:
        return q0.compact()
    if any((q.bits, q.group_size, q.mode) != (q0.bits, q0.group_size, q0.mode) for q in parts):
        raise ValueError("slices of one matrix must share bits, group size and mode")
    biases = None if q0.biases is None else mx.concatenate([q.biases for q in parts])
    return QuantizedWeight(None, mx.concatenate([q.scales for q in parts]), biases, q0.bits, q0.group_size,
                           wq=mx.concatenate([q.packed() for q in parts]), mode=q0.mode).compact()


def bits_group(choice, group_size: int) -> tuple[int | None, int]:
    """A layer's format choice -- bits, (bits, group size), or None (float) -- -> (bits or None, group size), the
    group size defaulting to ``group_size``."""
    return tuple(choice) if isinstance(choice, (tuple, list)) else (choice, group_size)
