"""The tables outside the blocks -- the input embedding, an untied lm_head, a tied table -- kept as stored.

A large vocabulary makes these the largest tensors of a model: a 128k x 4096 table is 2.1 GB in float32, 1.05 GB in
bf16 and about 0.3 GB at 4 bits. ``keep_stored`` leaves them in the dtype (or the quantized codes) they were read in
and makes their modules compute in float32 from slices of rows: an embedding lookup dequantizes/casts only the
rows it reads, a head (``lm_head`` or a tied table's ``as_linear``) is applied ``ROW_ELEMENTS`` weights at a time,
each slice's logits evaluated before the next, so no float32 copy of a whole table is ever made. The float32 results
are the same numbers as those of a float32 copy (bf16 -> float32 is exact; dequantization is per row).

``row_slices``/``table_rows`` give the same slices to the code that quantizes a table (``pipeline.head``).
"""
from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from ..quant.formats import dequantize_f32
from .structure import block_prefix

ROW_ELEMENTS = 1 << 24  # weights of a table handled at once (64 MB in float32): the same slices as the quantizers'
TABLE_TYPES = (nn.Embedding, nn.QuantizedEmbedding, nn.Linear, nn.QuantizedLinear)


def row_slices(n_rows: int, width: int, elements: int | None = None) -> list[tuple[int, int]]:
    """[(r0, r1), ...] covering n_rows rows of ``width`` weights, at most ``elements`` (default ``ROW_ELEMENTS``)
    weights (and >= 1 row) each."""
    rows = max(1, (elements or ROW_ELEMENTS) // max(width, 1))
    return [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]


def table_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the embedding and linear layers outside the transformer blocks."""
    prefix = block_prefix(model) + "."
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, TABLE_TYPES) and not (p + ".").startswith(prefix)]


def table_rows(m: nn.Module, r0: int, r1: int, dtype=mx.float32) -> mx.array:
    """Rows r0:r1 of a table module's weight (float of any dtype, or MLX-quantized) -> [r1 - r0, D] in dtype."""
    if isinstance(m, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        return _dequantize(m, m.weight[r0:r1], m["scales"][r0:r1], _biases(m, slice(r0, r1)), dtype)
    return m.weight[r0:r1].astype(dtype)


def _biases(m: nn.Module, idx):
    return m["biases"][idx] if "biases" in m else None


def _dequantize(m, w, scales, biases, dtype):
    return dequantize_f32(w, scales, biases, m.group_size, m.bits, getattr(m, "mode", "affine")).astype(dtype)


def n_rows(m: nn.Module) -> int:
    """The table's number of rows (its vocabulary)."""
    return int(m.weight.shape[0])


def table_width(m: nn.Module) -> int:
    """The table's row width (its embedding dimension)."""
    if isinstance(m, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        return int(m.weight.shape[1]) * 32 // m.bits
    return int(m.weight.shape[1])


def sliced_matmul(m: nn.Module, x: mx.array, dtype=mx.float32) -> mx.array:
    """x [..., D] @ table^T -> [..., V] in dtype, one slice of rows at a time (each evaluated before the next)."""
    x = x.astype(dtype)
    outs = []
    for r0, r1 in row_slices(n_rows(m), table_width(m)):
        y = x @ table_rows(m, r0, r1, dtype).T
        mx.eval(y)
        outs.append(y)
    return mx.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]


def _lookup(self, x):
    if isinstance(self, nn.QuantizedEmbedding):
        return _dequantize(self, self.weight[x], self["scales"][x], _biases(self, x), self._compute_dtype)
    return self.weight[x].astype(self._compute_dtype)


def _as_linear(self, x):
    if self._vocab is not None:  # ``head_rows``: only these rows' logits
        return x.astype(self._compute_dtype) @ table_rows(self, *self._vocab, self._compute_dtype).T
    return sliced_matmul(self, x, self._compute_dtype)


def _linear(self, x):
    y = _as_linear(self, x)
    if "bias" not in self:
        return y
    b = self.bias if self._vocab is None else self.bias[self._vocab[0]:self._vocab[1]]
    return y + b.astype(self._compute_dtype)


@contextmanager
def head_rows(model: nn.Module, r0: int, r1: int):
    """Within the block, the model's head (a kept-as-stored ``lm_head`` or tied table's ``as_linear``) computes
    only the logits of vocabulary rows r0:r1 -- whatever the model does to its logits after (scaling,
    soft-capping) is element-wise, so a forward gives those rows' final logits."""
    classes = [type(m) for _, m in table_modules(model) if is_stored(m)]
    for c in classes:
        c._vocab = (r0, r1)
    try:
        yield
    finally:
        for c in classes:
            c._vocab = None


def keep_stored(model: nn.Module, dtype=mx.float32) -> list[str]:
    """Make the model's tables outside the blocks compute in ``dtype`` from their stored weights (module docstring)
    instead of holding a ``dtype`` copy: each module's class is swapped for a subclass (paths, parameters and
    isinstance unchanged). Call before any cast or dequantization of the model. -> the paths swapped."""
    done = []
    for path, m in table_modules(model):
        cls = type(m)
        if getattr(cls, "_stored_table", False):
            continue
        attrs = {"_stored_table": True, "_compute_dtype": dtype, "_vocab": None}
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            attrs.update(__call__=_lookup, as_linear=_as_linear)
        else:
            attrs["__call__"] = _linear
        m.__class__ = type("Stored" + cls.__name__, (cls,), attrs)
        done.append(path)
    return done


def release_table(m: nn.Module) -> None:
    """Drop a table's tensors once nothing reads it any more (each replaced by an empty array)."""
    m.update({k: mx.zeros((0,), v.dtype) for k, v in m.items() if isinstance(v, mx.array)})


def reread_tables(model: nn.Module, reload) -> int:
    """Swap the tables' tensors outside the blocks for fresh lazy reads of the same tensors (``reload(name)``,
    ``model.files.reloader``), so that a table that was read (e.g. for the calibration inputs) does not stay in
    memory until it is needed again. Only tensors that the file holds with the same shape and dtype are swapped
    (a table that was changed in memory, cast or renamed stays). -> bytes released."""
    freed = 0
    for path, m in table_modules(model):
        fresh = {}
        for k, v in m.items():
            if isinstance(v, mx.array):
                f = reload(f"{path}.{k}")
                if f is not None and f.shape == v.shape and f.dtype == v.dtype:
                    fresh[k] = f
                    freed += v.nbytes
        m.update(fresh)
    return freed


def is_stored(m: nn.Module) -> bool:
    """Was ``m`` swapped by ``keep_stored``?"""
    return bool(getattr(type(m), "_stored_table", False))
