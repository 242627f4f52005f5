"""Incoherence rotation folded into the weights (QuaRot, Ashkboos et al. 2024; SpinQuant's R1/R2, Liu et al. 2024).

A pre-norm transformer's residual stream can be rotated by any orthogonal Q [D, D] without changing the model's
function: an RMSNorm without its weight is rotation-invariant (||x Q|| = ||x||), so with each norm's weight folded
into the linears that read it, every reader W [O, D] becomes W diag(g) Q, every writer to the stream (attention's
output, the MLP's down projection) Q^T W (its bias b Q), the embedding rows E Q and the head W_head diag(g_final) Q
(R1). Between V and O, each head's value space is rotated by R [hd, hd]: V's rows of head h become R^T V_h, O's
columns of head h O_h R (R2). After the rotation the weights' outliers are spread over all coordinates, which makes
them easier to round; the folded model is an ordinary model (norm weights all one), so stock ``mlx_lm.load`` opens
it. Only R1 and R2 fold into the weights; QuaRot's online rotations (before down_proj, of the KV cache) would need a
changed forward and are not done.

Q = diag(s) (H_{2^k} / sqrt(2^k) (x) O_m) for D = 2^k m: random signs s, a Walsh-Hadamard matrix where the width is a
power of two (applied by ``mx.hadamard_transform``), a seeded random orthogonal O_m (QR of a Gaussian) for the odd
factor. A tied table is untied (the head needs the final norm's weight folded in, the input embedding must not have
it). Every block's fold is checked on a probe (block(x Q) == block(x) Q); a block it does not hold for (post-norms,
LayerNorm's mean) is refused with ``RotationError``.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model.experts import is_switch
from ..model.structure import final_norm, find_module
from ..model.tables import is_stored, keep_stored, n_rows, row_slices, table_rows, table_width
from .awq_fold import groups

WRITERS = ("o_proj", "down_proj", "dense", "out_proj", "c_proj", "fc2", "w2", "wo")  # write to the residual stream
PROBE_TOKENS = 16
TOLERANCE = 1e-3  # relative error of a rotated block on the probe (float32 arithmetic gives ~1e-6)


class RotationError(ValueError):
    """The model's structure does not allow the rotation to be folded into its weights."""


@dataclass
class Rotation:
    """Q = diag(signs) (H_{2^k} / sqrt(2^k) (x) orth) of width 2^k * m (module docstring)."""
    signs: mx.array        # [D] +-1
    orth: mx.array | None  # [m, m] orthogonal; None when m == 1
    k: int

    @property
    def dim(self) -> int:
        return int(self.signs.shape[0])

    def apply(self, x: mx.array) -> mx.array:
        """x [..., D] -> x @ Q in float32."""
        x = x.astype(mx.float32) * self.signs
        m = 1 if self.orth is None else int(self.orth.shape[0])
        y = x.reshape(*x.shape[:-1], 2 ** self.k, m)
        if self.k > 0:
            y = mx.swapaxes(mx.hadamard_transform(mx.swapaxes(y, -1, -2)), -1, -2)
        if self.orth is not None:
            y = y @ self.orth
        return y.reshape(x.shape)

    def invert(self, x: mx.array) -> mx.array:
        """x [..., D] -> x @ Q^T in float32 (back to the unrotated basis)."""
        m = 1 if self.orth is None else int(self.orth.shape[0])
        y = x.astype(mx.float32).reshape(*x.shape[:-1], 2 ** self.k, m)
        if self.orth is not None:
            y = y @ self.orth.T
        if self.k > 0:
            y = mx.swapaxes(mx.hadamard_transform(mx.swapaxes(y, -1, -2)), -1, -2)
        return y.reshape(x.shape) * self.signs

    def matrix(self) -> mx.array:
        """Q [D, D]."""
        return self.apply(mx.eye(self.dim))


def make_rotation(dim: int, seed: int = 0) -> Rotation:
    """A seeded random orthogonal Rotation of width ``dim`` (randomized Hadamard on the power-of-two factor)."""
    rng = np.random.default_rng(seed)
    k = (dim & -dim).bit_length() - 1  # the largest power of two dividing dim
    m = dim >> k
    orth = None
    if m > 1:
        q, r = np.linalg.qr(rng.standard_normal((m, m)))
        orth = mx.array((q * np.sign(np.diag(r))).astype(np.float32))  # Haar-distributed
    signs = mx.array(rng.choice(np.array([-1.0, 1.0], np.float32), dim))
    return Rotation(signs, orth, k)


CONFIG_KEY = "mlx_holo_rotation"  # config.json entry of a rotated folder: {"kind", "seed", "dim"} (mlx-lm ignores it)


def config_rotation(config: dict) -> Rotation | None:
    """The rotation a saved folder's weights were folded with (its config.json's ``CONFIG_KEY``), or None: what
    evaluation needs to compare the folder's hidden states with its unrotated base's."""
    r = config.get(CONFIG_KEY)
    return make_rotation(int(r["dim"]), int(r["seed"])) if r else None


def rotate_rows(w: mx.array, rot: Rotation) -> mx.array:
    """A reader of the rotated stream: w [..., O, D] -> w Q (each row rotated)."""
    return rot.apply(w)


def rotate_cols(w: mx.array, rot: Rotation) -> mx.array:
    """A writer to the rotated stream: w [..., D, I] -> Q^T w."""
    return mx.swapaxes(rot.apply(mx.swapaxes(w, -1, -2)), -1, -2)


def norm_weight(norm: nn.Module, probe: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
    """A weighted RMSNorm -> (its effective gain g [D] in float32, the parameters that make its gain 1): gamma ->
    (gamma, ones), Gemma's 1 + w -> (1 + w, zeros). Which rule holds is checked on probe [n, D]; RotationError for a
    norm with a bias (LayerNorm) or neither rule."""
    params = {k: v for k, v in norm.parameters().items() if isinstance(v, mx.array)}
    if set(params) != {"weight"}:
        raise RotationError(f"{type(norm).__name__} has parameters {sorted(params)}: the rotation folds only an "
                            "RMSNorm's weight (use --rotate none for this model)")
    w = params["weight"]
    want = norm(probe).astype(mx.float32)
    for gain, unit in ((w.astype(mx.float32), mx.ones_like(w)), (1.0 + w.astype(mx.float32), mx.zeros_like(w))):
        norm.update({"weight": unit})
        got = norm(probe).astype(mx.float32) * gain
        norm.update({"weight": w})
        if _rel(got, want) < TOLERANCE:
            return gain, {"weight": unit}
    raise RotationError(f"cannot fold the weight of {type(norm).__name__} (neither gamma nor 1 + w)")


def _rel(a: mx.array, b: mx.array) -> float:
    return float((mx.linalg.norm((a - b).reshape(-1)) / mx.maximum(mx.linalg.norm(b.reshape(-1)), 1e-30)).item())


def _set(m: nn.Module, name: str, value: mx.array) -> None:
    m.update({name: value})
    mx.eval(m[name])


def head_rotation(block: nn.Module, seed: int) -> tuple[Rotation, int] | None:
    """(R2, number of value heads) for the block's attention, or None when its V/O layout is not per-head plain
    linears (then no R2)."""
    attn = find_module(block, "self_attn")
    v, o = find_module(attn, "v_proj") if attn else None, find_module(attn, "o_proj") if attn else None
    n_heads = getattr(attn, "n_heads", None) or getattr(attn, "num_heads", None)
    if not (isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and n_heads):
        return None
    hd = o.weight.shape[1] // n_heads
    if hd * n_heads != o.weight.shape[1] or v.weight.shape[0] % hd:
        return None
    return make_rotation(hd, seed), v.weight.shape[0] // hd


def rotate_block(block: nn.Module, rot: Rotation, *, mask="causal", seed: int = 0, heads: bool = True) -> dict:
    """Fold R1 (``rot``) and, with ``heads``, R2 into ``block`` in place (module docstring) -> counts of what was
    rotated. The block's function is checked on a seeded probe: block'(x Q) must equal block(x) Q (``TOLERANCE``);
    RotationError otherwise (e.g. a post-norm on a branch output, a LayerNorm). Rotated weights are float32."""
    D = rot.dim
    probe = mx.random.normal((1, PROBE_TOKENS, D), key=mx.random.key(seed))
    y0 = block(probe, mask).astype(mx.float32)
    mx.eval(y0)
    readers: set[str] = set()
    norms = 0
    for prev, kind, paths in groups(block):
        if kind != "norm":
            continue
        gain, unit = norm_weight(prev, probe.reshape(-1, D))
        for p in paths:
            m = find_module(block, p)
            _set(m, "weight", rotate_rows(m.weight.astype(mx.float32) * gain, rot))
            readers.add(p)
        prev.update(unit)
        norms += 1
    if norms == 0:
        raise RotationError(f"{type(block).__name__}: no norm -> linears group found to fold the rotation into")
    writers = 0
    for p, m in block.named_modules():
        if p in readers or not (isinstance(m, nn.Linear) or is_switch(m)) or p.rsplit(".", 1)[-1] not in WRITERS:
            continue
        if m.weight.shape[-2] != D:
            continue
        _set(m, "weight", rotate_cols(m.weight.astype(mx.float32), rot))
        if "bias" in m:
            _set(m, "bias", rot.apply(m.bias))
        writers += 1
    r2 = head_rotation(block, seed + 1) if heads else None
    if r2 is not None:
        r, n_kv = r2
        attn = find_module(block, "self_attn")
        v, o = attn.v_proj, attn.o_proj
        hd = r.dim
        wv = v.weight.astype(mx.float32).reshape(n_kv, hd, -1)             # [kv, hd, D]: rows R^T V_h
        _set(v, "weight", rotate_cols(wv, r).reshape(n_kv * hd, -1))
        if "bias" in v:
            _set(v, "bias", r.apply(v.bias.reshape(n_kv, hd)).reshape(-1))
        wo = o.weight.astype(mx.float32)
        _set(o, "weight", r.apply(wo.reshape(wo.shape[0], -1, hd)).reshape(wo.shape))  # columns O_h R
    y1 = block(rot.apply(probe), mask).astype(mx.float32)
    err = _rel(y1, rot.apply(y0))
    if not err < TOLERANCE:
        raise RotationError(f"{type(block).__name__}: the rotated block differs from the original by {err:.2e} "
                            "(relative) -- its structure (a norm on a branch output, a LayerNorm, ...) does not let "
                            "the rotation fold into the weights; use --rotate none for this model")
    return {"norms": norms, "readers": len(readers), "writers": writers, "heads": r2 is not None}


def rotate_table(m: nn.Module, rot: Rotation, gain: mx.array | None = None, dtype=None) -> mx.array:
    """A table outside the blocks (embedding or head, float or stored as read: ``model.tables``) -> its rows
    (times ``gain`` [D]) rotated, [V, D] in ``dtype`` (default: the stored float dtype; float32 for quantized
    codes), computed one slice of rows at a time."""
    if dtype is None:
        dtype = m.weight.dtype if mx.issubdtype(m.weight.dtype, mx.floating) else mx.float32
    parts = []
    for r0, r1 in row_slices(n_rows(m), table_width(m)):
        w = table_rows(m, r0, r1)
        if gain is not None:
            w = w * gain
        part = rot.apply(w).astype(dtype)
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def rotate_outside(model: nn.Module, rot: Rotation) -> dict:
    """Rotate the embedding table (E Q) and fold the final norm into the head (W_head diag(g) Q), untying a tied
    table (``untie``). In place; the new tables keep the stored float dtype (and ``model.tables``'s slice-wise
    compute when the old ones had it). -> what was done."""
    inner = getattr(model, "model", model)
    emb = getattr(inner, "embed_tokens", None)
    norm = final_norm(model)
    if emb is None or norm is None:
        raise RotationError(f"{type(model).__name__}: no embed_tokens / final norm beside the blocks to rotate")
    probe = mx.random.normal((PROBE_TOKENS, rot.dim), key=mx.random.key(1))
    gain, unit = norm_weight(norm, probe)
    tied = not hasattr(model, "lm_head")
    if tied:
        untie(model)
    old_head = emb if tied else model.lm_head
    head_bias = old_head.get("bias") if not tied else None
    new_head = nn.Linear(rot.dim, n_rows(old_head), bias=head_bias is not None)
    new_head.weight = rotate_table(old_head, rot, gain)
    if head_bias is not None:
        new_head.bias = head_bias
    new_emb = nn.Embedding(n_rows(emb), rot.dim)
    new_emb.weight = rotate_table(emb, rot)
    stored = is_stored(emb)
    dtype = type(emb)._compute_dtype if stored else None
    inner.embed_tokens, model.lm_head = new_emb, new_head
    if stored:
        keep_stored(model, dtype)
    norm.update(unit)
    return {"untied": tied}


def untie(model: nn.Module) -> None:
    """Make a tied mlx-lm model read its head from ``model.lm_head`` (``args.tie_word_embeddings = False``; the
    caller sets ``lm_head``). RotationError for a model whose head is always the embedding (e.g. mlx-lm's gemma)."""
    args = getattr(model, "args", None)
    if args is None or not hasattr(args, "tie_word_embeddings"):
        raise RotationError(f"{type(model).__name__} always reads its head from the embedding table; the rotation "
                            "needs a separate head (use --rotate none for this model)")
    args.tie_word_embeddings = False
