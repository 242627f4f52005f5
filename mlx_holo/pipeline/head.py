"""The layers outside the blocks: embeddings and the output head.

The head's calibration inputs are the last block's outputs through the final norm (``head_inputs``); with them an
untied lm_head or a tied embedding table is GPTQ'd (``gptq_head``) -- optionally before the blocks, on the float
model's head inputs (``tied_table_first``), so that the blocks calibrate on the quantized input embedding. Other
tables are rounded (RTN) at the recipe's bits, as ``mlx_lm.convert`` does.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..distributed import World
from ..model.structure import (block_prefix, blocks, final_norm, get_module, head_module, outside_quantizable,
                               release_block)
from ..model.tables import n_rows, release_table, row_slices, table_rows, table_width
from ..quant.formats import QuantizedWeight, concat_rows, float_quantize
from ..quant.gptq import HessianFactor, gptq_quantize, hessian_factor
from ..quant.qep import qep_apply, qep_matrix
from ..quant.rtn import quantize_rtn
from ..recipe import Recipe
from .capture import block_inputs, error_terms, hessian, rel_error
from .layer import LayerRecord, grid_fit, layer_format


def head_inputs(model: nn.Module, x: mx.array) -> mx.array | None:
    """x [N, S, D] leaving the last (compressed) block -> the output head's input [N*S, D]: x through the final norm
    (``model.structure.final_norm``); None where there is no such norm."""
    norm = final_norm(model)
    if norm is None:
        return None
    h = norm(x).reshape(-1, x.shape[-1])
    mx.eval(h)
    return h


def forward_head_inputs(model: nn.Module, calib: mx.array, *, release: bool = True) -> mx.array | None:
    """calib [N, S] -> ``model``'s head inputs [N*S, D] (final norm outputs), run block by block. ``release``: free
    each block as it finishes (bounded memory; the model is then spent -- open a fresh lazy one to compress)."""
    x, mask = block_inputs(model, calib)
    for block in blocks(model):
        mx.eval(block.parameters())
        x = block(x, mask)
        mx.eval(x)
        if release:
            release_block(block)
    return head_inputs(model, x)


def gptq_head(w: mx.array, H: mx.array, bits: int, group_size: int, recipe: Recipe,
              factor: HessianFactor | None = None) -> QuantizedWeight:
    """The output head's GPTQ (an lm_head, or a tied table) on its inputs' H, with the head's damping (``factor``:
    ``head_factor(H, recipe)``, made once for all of a table's slices)."""
    return gptq_quantize(w, H, bits, group_size, act_order=recipe.act_order, damp=recipe.head_damp,
                         fit=grid_fit(recipe, bits, compensated=True), iters=recipe.gptq_iters, factor=factor)


def head_factor(H: mx.array, recipe: Recipe) -> HessianFactor:
    """H of the head's inputs -> GPTQ's factor of it at the head's damping."""
    return hessian_factor(H, recipe.head_damp, recipe.act_order)


HEAD_GPTQ_ELEMENTS = 1 << 22  # weights of a table GPTQ'd at once: its pass holds ~15 float32 copies of them


def quantize_table(table: nn.Module, bits: int, group_size: int, recipe: Recipe, H: mx.array | None = None,
                   qep: mx.array | None = None, world: World | None = None) -> tuple[QuantizedWeight, float | None]:
    """A table outside the blocks (embedding or lm_head module, float or stored as read: ``model.tables``) -> its
    QuantizedWeight (packed) and, given H [D, D], the H-weighted relative error of the result.

    The table is handled in slices of rows (``model.tables.row_slices``; ``HEAD_GPTQ_ELEMENTS`` weights for GPTQ),
    each cast to float32 only while it is worked on, so no float32 copy of a whole table is made; rows are
    independent for every quantizer here, so the result is that of one pass over the whole table. With H and
    ``recipe.gptq_head``, GPTQ on H (aiming at ``w + qep_alpha * w M`` when the QEP matrix M [D, D] is given);
    otherwise RTN; MLX's float modes by ``float_quantize``.
    world: the ranks of a distributed job split the slices (contiguous shares) and exchange the packed results, so
    each slice is worked on once and every rank ends with the whole table, the same as one process's."""
    world = world or World()
    width = table_width(table)
    gptq = recipe.mode == "affine" and H is not None and recipe.gptq_head
    slices = list(row_slices(n_rows(table), width, HEAD_GPTQ_ELEMENTS if gptq else None))
    owners = [k * world.size // len(slices) for k in range(len(slices))]
    factor = head_factor(H, recipe) if gptq and world.rank in owners else None  # one O(D^3) step for all slices
    done = {}  # slice -> (compact QuantizedWeight, its error terms or None)
    for k, (r0, r1) in enumerate(slices):
        if owners[k] != world.rank:
            continue
        w = table_rows(table, r0, r1)  # [rows, D] float32
        if recipe.mode != "affine":
            done[k] = (float_quantize(w, recipe.mode), None)
            continue
        if gptq:
            target = w if qep is None else qep_apply(w, qep, recipe.qep_alpha)
            qw = gptq_head(target, H, bits, group_size, recipe, factor)
        else:
            qw = quantize_rtn(w, bits, group_size, fit=grid_fit(recipe, bits, compensated=False), seed=k)
        done[k] = (qw.compact(), error_terms(w, qw.dequantize(), H) if H is not None else None)
    if world.distributed:
        done = {k: v for part in world.exchange_objects(done) for k, v in part.items()}
    err = None
    if H is not None and recipe.mode == "affine":
        num = den = 0.0
        for k in range(len(slices)):  # added in slice order: the same sums as one process's
            num, den = num + done[k][1][0], den + done[k][1][1]
        err = num / max(den, 1e-12)
    return concat_rows([done[k][0] for k in range(len(slices))]), err


def tied_table_first(model: nn.Module, recipe: Recipe, layer_bits: dict | None, head_x: mx.array,
                     fallback: dict) -> tuple[str, QuantizedWeight] | None:
    """GPTQ of a tied embedding table on the float model's head inputs -> (module path, compact weight), or None
    when the model has no quantized tied table (an untied lm_head is GPTQ'd after the blocks as usual)."""
    for k, v in outside_quantizable(model, recipe):
        mod = k.rsplit(".", 1)[0]
        if isinstance(get_module(model, mod), nn.Embedding) and head_module(model, mod):
            bits, g = layer_format(mod, v.shape[-1], layer_bits, recipe, fallback, recipe.embed_bits or recipe.bits)
            if bits is None:  # mixed precision keeps the table float
                return None
            return mod, quantize_table(get_module(model, mod), bits, g, recipe, hessian(head_x))[0]
    return None


def finish_outside_blocks(model: nn.Module, recipe: Recipe, res,
                           layer_bits: dict[str, int | None] | None = None, head_x: mx.array | None = None,
                           head_x_fp: mx.array | None = None, world: World | None = None) -> None:
    """Embeddings and lm_head: RTN at the recipe's bits (as mlx_lm.convert does) or at their entry in
    ``layer_bits`` (mixed precision); everything else kept float. The model is consumed: each table is released
    once quantized.

    head_x [n, D]: the head's calibration inputs (``head_inputs``). Given (and ``recipe.gptq_head``), the head's
    weight -- an untied lm_head or a tied embedding -- is quantized by GPTQ on H = head_x^T head_x / n, so its
    rounding is compensated where the logits see it; its record then carries that H-weighted error either way. A
    tied table is also read row by row as the input embedding, an error GPTQ's objective does not see;
    ``recipe.head_damp`` (a larger damping, i.e. a pull toward plain rounding) weighs that in.
    head_x_fp [n, D]: the same tokens' head inputs in the float model; given, an untied GPTQ head aims at QEP's
    corrected weight (a tied table is not corrected: the input embedding reads it too). world: the ranks of a
    distributed job share each table's slices (``quantize_table``)."""
    prefix = block_prefix(model)
    quantized = {k for k, _ in outside_quantizable(model, recipe)}
    params = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith(prefix + ".") and v.size}
    for k in list(params):
        v = params.pop(k)
        if k not in quantized:
            res.floats[k] = v
            continue
        mod = k.rsplit(".", 1)[0]
        table = get_module(model, mod)
        bits, g = layer_format(mod, v.shape[-1], layer_bits, recipe, res.fallback,
                               recipe.embed_bits or recipe.bits)
        if bits is None:  # mixed precision kept it float
            res.floats[k] = v
            res.layers.append(LayerRecord(mod, None, None, 0.0, None, 0.0))
            continue
        H = hessian(head_x) if head_x is not None and head_module(model, mod) else None
        if mod in res.quantized:  # a tied table quantized before the blocks (``head_x_first``)
            err = None
            if H is not None:
                w = v.astype(mx.float32)
                err = rel_error(w, res.quantized[mod].dequantize(), H)
            res.layers.append(LayerRecord(mod, bits, g, 0.0, err, 0.0))
            continue
        qep = None
        if (recipe.mode == "affine" and H is not None and recipe.gptq_head and head_x_fp is not None
                and recipe.qep_alpha > 0 and isinstance(table, nn.Linear)):
            qep = qep_matrix(head_x_fp, head_x, damp=recipe.qep_damp)
        res.quantized[mod], err = quantize_table(table, bits, g, recipe, H, qep, world)
        if recipe.mode != "affine":
            bits, g = recipe.bits, recipe.group_size
        del v
        release_table(table)
        res.layers.append(LayerRecord(mod, bits, g, 0.0, err, 0.0))
