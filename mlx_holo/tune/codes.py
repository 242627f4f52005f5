"""Code-frozen layers: a quantized layer whose integer codes are fixed and whose per-group scales and biases train.

``CodeLinear`` (a linear, W = scales * codes + biases per group), ``CodeEmbedding`` (an embedding table, which also
serves a tied head through ``as_linear``), ``CodeSwitchLinear`` (a MoE SwitchLinear's E experts).
``swap_code_linears`` puts them in place of a loaded quantized model's layers; ``to_float`` puts plain float layers
holding the (tuned) dequantized weights back and returns the tuned ``QuantizedWeight`` s.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..quant.formats import QuantizedWeight


class CodeLinear(nn.Module):
    """A linear whose weight is scales * codes + biases per group; only ``scales`` and ``biases`` train."""

    def __init__(self, qw: QuantizedWeight, bias: mx.array | None):
        super().__init__()
        out, n = qw.shape
        self._qw = qw
        self._codes = qw.unpacked().astype(mx.float32).reshape(out, n // qw.group_size, qw.group_size)
        self.scales = qw.scales.astype(mx.float32)   # [out, G]
        self.biases = qw.biases.astype(mx.float32)   # [out, G]
        self._bias = bias

    def tuned(self) -> QuantizedWeight:
        """The given QuantizedWeight (same codes) with the current scales/biases, in its own dtypes."""
        qw = self._qw
        return QuantizedWeight(qw.codes, self.scales.astype(qw.scales.dtype), self.biases.astype(qw.biases.dtype),
                               qw.bits, qw.group_size, qw.wq, experts=qw.experts)

    def weight(self) -> mx.array:
        out, G, g = self._codes.shape
        return (self._codes * self.scales[..., None] + self.biases[..., None]).reshape(out, G * g)

    def __call__(self, x):
        y = x @ self.weight().T
        return y if self._bias is None else y + self._bias


class CodeEmbedding(CodeLinear):
    """An embedding table (rows = tokens) held as frozen codes with trainable scales/biases; ``as_linear`` serves a
    tied output head from the same parameters."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__(qw, None)

    def __call__(self, ids):
        G, g = self._codes.shape[1:]
        rows = self._codes[ids] * self.scales[ids][..., None] + self.biases[ids][..., None]  # [..., G, g]
        return rows.reshape(*ids.shape, G * g)

    def as_linear(self, x):
        return x @ self.weight().T


class CodeSwitchLinear(CodeLinear):
    """A MoE ``QuantizedSwitchLinear`` (E experts) as frozen codes with trainable scales/biases, held as the stacked
    [E * out, in] rows of ``quant.formats.stack_experts``; called like mlx-lm's SwitchLinear."""

    def expert_weight(self) -> mx.array:
        w = self.weight()
        return w.reshape(self._qw.experts, -1, w.shape[1])  # [E, out, in]

    def __call__(self, x, indices, sorted_indices=False):
        y = mx.gather_mm(x, self.expert_weight().swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        return y if self._bias is None else y + mx.expand_dims(self._bias[indices], -2)


def swap_modules(root: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put each module of ``modules`` (path relative to root -> module) in place of the one at its path."""
    root.update_modules(tree_unflatten(list(modules.items())))


def swap_code_linears(model: nn.Module, *, embeddings: bool = True) -> dict[str, CodeLinear]:
    """Replace every affine ``nn.QuantizedLinear`` of model by a ``CodeLinear`` (codes frozen), every affine MoE
    ``QuantizedSwitchLinear`` by a ``CodeSwitchLinear``, and with ``embeddings`` every affine
    ``nn.QuantizedEmbedding`` (a tied table serves the head too) by a ``CodeEmbedding`` -> path -> module."""
    def qw(m):
        return QuantizedWeight(None, m.scales, m.biases, m.bits, m.group_size, wq=m.weight)

    out = {}
    for path, m in model.named_modules():
        if getattr(m, "mode", "affine") != "affine":
            continue
        if isinstance(m, nn.QuantizedLinear):
            out[path] = CodeLinear(qw(m), m.get("bias"))
        elif type(m).__name__ == "QuantizedSwitchLinear" and m.get("biases") is not None:
            e = m.weight.shape[0]
            rows = QuantizedWeight(None, m.scales.reshape(-1, m.scales.shape[-1]),
                                   m.biases.reshape(-1, m.biases.shape[-1]), m.bits, m.group_size,
                                   wq=m.weight.reshape(-1, m.weight.shape[-1]), experts=e)
            out[path] = CodeSwitchLinear(rows, m.get("bias"))
        elif embeddings and isinstance(m, nn.QuantizedEmbedding):
            out[path] = CodeEmbedding(qw(m))
    swap_modules(model, out)
    return out


def to_float(model: nn.Module, code_linears: dict[str, CodeLinear]) -> dict[str, QuantizedWeight]:
    """Put float layers (nn.Linear, nn.Embedding) holding the dequantized (tuned) weights back -> path -> tuned
    QuantizedWeight."""
    from mlx_lm.models.switch_layers import SwitchLinear

    layers = {}
    for path, cl in code_linears.items():
        w = cl.weight()
        if isinstance(cl, CodeSwitchLinear):
            w = cl.expert_weight()
            layer = layers[path] = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias=cl._bias is not None)
            if cl._bias is not None:
                layer.bias = cl._bias
        elif isinstance(cl, CodeEmbedding):
            layer = layers[path] = nn.Embedding(*w.shape)
        else:
            layer = layers[path] = nn.Linear(w.shape[1], w.shape[0], bias=cl._bias is not None)
            if cl._bias is not None:
                layer.bias = cl._bias
        layer.weight = w
    swap_modules(model, layers)
    return {path: cl.tuned() for path, cl in code_linears.items()}
