"""Quality of a compressed model against its base: perplexity, KL, top-1 agreement, per-layer cosine, determinism.

Perplexity uses non-overlapping windows (the GPTQ/SparseGPT convention, Frantar et al. 2022, sec. 4): the text is
cut into ``seq_len`` windows, each scored independently, ``ppl = exp(mean NLL)`` over every predicted token.
KL is ``KL(p_base || p_model)`` per token, averaged; top-1 agreement is the fraction of positions where both
models' argmax agree. Per-layer cosine is the mean cosine similarity of each transformer block's output between
the two models on the same input; ``cos_min`` is its minimum over blocks. ``determinism_delta`` is the largest
absolute logit difference between two runs of the compressed model on the same window (0 when deterministic).

``stream_compare`` computes the same metrics without holding either model: both are opened lazily and walked block
by block -- the hidden states of every window carried for each model, each block loaded, applied (a few windows at
a time) and released -- then each model's own head is applied window by window (``pipeline.capture.run_head``).
Opened with ``stored_tables`` (as ``evaluate`` and ``compress`` do), each head stays in its stored dtype or codes and
is applied to up to ``HEAD_POSITIONS`` positions one slice of vocabulary rows at a time (``model.tables.head_rows``),
the metrics accumulated over the slices (``_OnlineHead``), so no position's logits are ever held whole. Peak memory
is about one block of each model, the two heads as stored and the windows' hidden states, whatever the depth.
``compare`` holds both models and caches the base's outputs, for benchmarks that score many variants against one
base object.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import data
from .distributed import World
from .model.files import ModelError
from .model.open import open_model
from .model.structure import blocks, drop_input_embedding, release_block
from .model import tables
from .model.tables import head_rows, keep_stored, n_rows, table_modules, table_width
from .pipeline.capture import block_inputs, capture_block_outputs, run_head
from .quant.rotate import config_rotation


LOGIT_ELEMENTS = 1 << 24  # stream_compare forms at most this many logits of a model at once (64 MB in float32)
HEAD_POSITIONS = 8192     # ... for at most this many positions, each slice of vocabulary rows read once for them


class _OnlineHead:
    """NLL, KL(base || model), top-1 agreement and the base's NLL of positions [B, S] from their logits given one
    slice of vocabulary rows at a time (``add``), with running maxima and rescaled sums (the online softmax of
    Milakov & Gimelshein 2018): per position, lse = m + log sum exp(l - m); sum_v p_b (l_b - l) accumulates as
    t = sum exp(l_b - m_b) (l_b - l), so KL = t / sum exp(l_b - m_b) - lse_b + lse. Position j predicts token j+1;
    the last position of each window predicts nothing."""

    def __init__(self, tokens: mx.array, with_base: bool):
        b, s = tokens.shape
        tokens = tokens.astype(mx.int32)
        ninf = mx.full((b, s), -mx.inf, mx.float32)
        zero = mx.zeros((b, s), mx.float32)
        self.tgt = mx.concatenate([tokens[:, 1:], mx.full((b, 1), -1, tokens.dtype)], axis=1)  # [B, S]
        self.m, self.se, self.t_m, self.arg = ninf, zero, zero, mx.zeros((b, s), mx.int32)
        self.with_base = with_base
        if with_base:
            self.mb, self.seb, self.t_b, self.kl_t, self.argb = ninf, zero, zero, zero, mx.zeros((b, s), mx.int32)
        self.delta = 0.0

    @staticmethod
    def _max_sum(m, se, arg, logits, r0):
        cm = logits.max(-1)
        new = mx.maximum(m, cm)
        se = se * mx.exp(m - new) + mx.exp(logits - new[..., None]).sum(-1)
        arg = mx.where(cm > m, mx.argmax(logits, -1).astype(mx.int32) + r0, arg)  # the first maximum, as argmax
        return new, se, arg

    def _target(self, logits, r0):
        idx = self.tgt - r0
        inside = (idx >= 0) & (idx < logits.shape[-1])
        got = mx.take_along_axis(logits, mx.where(inside, idx, 0)[..., None].astype(mx.int32), -1)[..., 0]
        return mx.where(inside, got, 0.0)

    def add(self, r0: int, logits: mx.array, blogits: mx.array | None, delta: mx.array | None) -> None:
        """logits/blogits: [B, S, Vc] of vocabulary rows r0:r0 + Vc; delta: determinism max |diff| or None."""
        self.t_m = self.t_m + self._target(logits, r0)
        self.m, self.se, self.arg = self._max_sum(self.m, self.se, self.arg, logits, r0)
        out = [self.t_m, self.m, self.se, self.arg]
        if blogits is not None:
            self.t_b = self.t_b + self._target(blogits, r0)
            new = mx.maximum(self.mb, blogits.max(-1))
            p = mx.exp(blogits - new[..., None])
            self.kl_t = self.kl_t * mx.exp(self.mb - new) + (p * (blogits - logits)).sum(-1)
            self.mb, self.seb, self.argb = self._max_sum(self.mb, self.seb, self.argb, blogits, r0)
            out += [self.t_b, self.kl_t, self.mb, self.seb, self.argb]
        if delta is not None:
            out.append(delta)
        mx.eval(*out)
        if delta is not None:
            self.delta = max(self.delta, delta.item())

    def totals(self) -> dict:
        """-> sums over the predicting positions: nll (and kl, top1, base_nll with a base), Python floats."""
        pred = self.tgt >= 0
        lse = self.m + mx.log(self.se)
        out = {"nll": mx.where(pred, lse - self.t_m, 0.0).sum()}
        if self.with_base:
            lse_b = self.mb + mx.log(self.seb)
            out["base_nll"] = mx.where(pred, lse_b - self.t_b, 0.0).sum()
            out["kl"] = mx.where(pred, self.kl_t / self.seb - lse_b + lse, 0.0).sum()
            out["top1"] = mx.where(pred, self.arg == self.argb, False).sum()
        mx.eval(*out.values())
        return {k: float(v.item()) for k, v in out.items()}


def head_sums(tokens: mx.array, logits: mx.array, base_logits: mx.array | None, cols: int = 4096) -> dict:
    """tokens [B, S], logits/base_logits [B, S, V] of whole windows -> the sums of ``_OnlineHead.totals``, taken
    ``cols`` vocabulary entries at a time (float32 sums over a whole large vocabulary lose about a percent of a small
    KL; the online sums keep it to float rounding)."""
    acc = _OnlineHead(tokens, base_logits is not None)
    for r0 in range(0, logits.shape[-1], cols):
        acc.add(r0, logits[..., r0:r0 + cols], None if base_logits is None else base_logits[..., r0:r0 + cols], None)
    return acc.totals()


def _cosines(a: list[mx.array], b: list[mx.array]) -> mx.array:
    """Per-block mean token cosine: lists of [1, S, D] -> [L]."""
    cs = []
    for x, y in zip(a, b):
        x, y = x.astype(mx.float32), y.astype(mx.float32)
        num = (x * y).sum(-1)
        den = mx.sqrt((x * x).sum(-1) * (y * y).sum(-1)) + 1e-12
        cs.append((num / den).mean())
    return mx.stack(cs)


@dataclass
class Metrics:
    ppl: float | None = None
    base_ppl: float | None = None
    delta_ppl_pct: float | None = None
    kl: float | None = None
    top1: float | None = None
    cos_min: float | None = None
    determinism_delta: float | None = None
    cos_per_layer: list = field(default_factory=list)
    tokens: int = 0
    windows: int = 0
    seq_len: int = 0
    eval_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _metrics(n: int, s: int, sums: dict, cos: list | None) -> Metrics:
    """``sums`` (nll, base_nll, kl, top1: ``_OnlineHead.totals`` added up) over the n * (s - 1) predictions of n
    windows of s tokens -> Metrics (base figures when cos is given)."""
    nll, base_nll, kl, top1 = (sums.get(k, 0.0) for k in ("nll", "base_nll", "kl", "top1"))
    count = n * (s - 1)
    m = Metrics(tokens=int(n * s), windows=int(n), seq_len=int(s))
    m.ppl = float(mx.exp(mx.array(nll / count)).item())
    if cos is not None:
        m.base_ppl = float(mx.exp(mx.array(base_nll / count)).item())
        m.delta_ppl_pct = 100.0 * (m.ppl - m.base_ppl) / m.base_ppl
        m.kl, m.top1 = kl / count, top1 / count
        m.cos_per_layer = cos
        m.cos_min = min(cos) if cos else None
    return m


_BASE_CACHE: dict = {}          # (id(base), windows digest) -> per-window (logits [S, V], block outputs)
BASE_CACHE_MAX_BYTES = 2 << 30  # keep one base reference in memory when it fits (benchmarks score many variants)


def _base_outputs(base: nn.Module, windows: mx.array, i: int):
    """Base logits [S, V] and block outputs for window i, reused across calls on the same base object."""
    import hashlib

    key = (id(base), hashlib.sha256(memoryview(mx.array(windows)).tobytes()).hexdigest())
    entry = _BASE_CACHE.get(key)
    if entry is None:
        _BASE_CACHE.clear()
        entry = _BASE_CACHE[key] = {"base": base, "outs": {}}
    if i in entry["outs"]:
        return entry["outs"][i]
    with capture_block_outputs(base) as hb:
        blogits = base(windows[i:i + 1])[0].astype(mx.float32)
    mx.eval(blogits, hb)
    n, s = windows.shape
    per_window = blogits.nbytes + sum(h.nbytes for h in hb)
    if per_window * n <= BASE_CACHE_MAX_BYTES:
        entry["outs"][i] = (blogits, list(hb))
    return blogits, list(hb)


def compare(model: nn.Module, base: nn.Module | None, windows: mx.array, *, det_windows: int = 1,
            rotation=None, on_progress=None) -> Metrics:
    """model/base: loaded float LMs; windows: [N, S] token ids -> Metrics. rotation: the ``quant.rotate.Rotation``
    model's weights were folded with (``config_rotation``): its hidden states are rotated back before the cosines.

    The base model's outputs are cached in memory for the next call with the same base object and windows (when
    they fit in BASE_CACHE_MAX_BYTES), so scoring many variants against one base costs one base pass."""
    t0 = time.perf_counter()
    n, s = windows.shape
    tot: Counter = Counter()  # the sums over every window
    cos_sum = None
    first_logits = []
    for i in range(n):
        x = windows[i:i + 1]
        with capture_block_outputs(model) as hc:
            logits = model(x)[0].astype(mx.float32)  # [S, V]
        blogits = None
        if base is not None:
            blogits, hb = _base_outputs(base, windows, i)
            same_vocab(logits.shape[-1], blogits.shape[-1])
            cos = _cosines(hc if rotation is None else [rotation.invert(h) for h in hc], hb)
            cos_sum = cos if cos_sum is None else cos_sum + cos
        sums = head_sums(x, logits[None], None if blogits is None else blogits[None])
        if cos_sum is not None:
            mx.eval(cos_sum)
        tot.update(sums)
        if i < det_windows:
            first_logits.append(logits)
        if on_progress:
            on_progress("evaluate", i + 1, n)
    m = _metrics(n, s, tot, [float(c) for c in (cos_sum / n).tolist()] if base is not None else None)
    if det_windows:
        delta = 0.0
        for i, ref in enumerate(first_logits):
            again = model(windows[i:i + 1])[0].astype(mx.float32)
            delta = max(delta, mx.abs(again - ref).max().item())
        m.determinism_delta = float(delta)
    m.eval_s = time.perf_counter() - t0
    return m


def head_shape(model: nn.Module) -> tuple[int, int]:
    """(vocabulary, width) of a model's output head: its largest table outside the blocks."""
    return max((n_rows(t), table_width(t)) for _, t in table_modules(model))


def same_vocab(n_model: int, n_base: int) -> None:
    """A base with another vocabulary cannot be compared token by token: a clear error, not a broadcast failure."""
    if n_model != n_base:
        raise ModelError(f"the model has {n_model} output tokens and the base {n_base}: "
                         "KL and top-1 need the same vocabulary (is --base the model it was compressed from?)")


def _block_cos(x: mx.array, y: mx.array) -> mx.array:
    """Mean token cosine of two [B, S, D] hidden states, per window -> [B]."""
    x, y = x.astype(mx.float32), y.astype(mx.float32)
    return ((x * y).sum(-1) / (mx.sqrt((x * x).sum(-1) * (y * y).sum(-1)) + 1e-12)).mean(axis=-1)


def _apply(block: nn.Module, x: mx.array, mask, chunk: int) -> mx.array:
    """block over x [N, S, D], ``chunk`` windows at a time (bounds the block's activations) -> [N, S, D]."""
    outs = []
    for j in range(0, x.shape[0], chunk):
        m = mask[j:j + chunk] if isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[0] == x.shape[0] \
            else mask
        outs.append(block(x[j:j + chunk], m))
        mx.eval(outs[-1])
    return mx.concatenate(outs) if len(outs) > 1 else outs[0]


def stream_compare(model: nn.Module, base: nn.Module | None, windows: mx.array, *, det_windows: int = 1,
                   chunk: int = 4, rotation=None, world: World | None = None, on_progress=None) -> Metrics:
    """``compare``'s metrics, block by block: model/base are lazily opened float LMs (``open_model(spec,
    lazy=True)``) that are consumed -- each block's weights are released once applied. windows: [N, S] token ids.
    rotation: as in ``compare``. world: the ranks of a distributed job (``distributed.World``): each scores its
    share of the windows and the sums are added."""
    t0 = time.perf_counter()
    n, s = windows.shape
    world = world or World()
    measure_det = det_windows > 0
    if world.distributed:
        a, b = world.share(n)
        windows = windows[a:b]
        det_windows = max(0, min(det_windows, b) - a)
    vocab, width = head_shape(model)
    if base is not None:
        same_vocab(vocab, head_shape(base)[0])
    xc, mask = block_inputs(model, windows)                     # [N, S, D] each model's own stream
    xb = block_inputs(base, windows)[0] if base is not None else None
    xd = xc[:det_windows]                                       # the determinism run: the same windows again
    mx.eval(xc, xd, *([] if xb is None else [xb]))
    for m in (model, base):  # an untied model's input table is read no more: free it before the blocks
        if m is not None:
            drop_input_embedding(m)
    cos = []
    bc_list = blocks(model)
    bb_list = blocks(base) if base is not None else [None] * len(bc_list)
    for i, (bc, bb) in enumerate(zip(bc_list, bb_list)):
        mx.eval(bc.parameters())
        xc = _apply(bc, xc, mask, chunk)
        if det_windows:
            xd = _apply(bc, xd, mask, chunk)
        release_block(bc)
        if bb is not None:
            mx.eval(bb.parameters())
            xb = _apply(bb, xb, mask, chunk)
            release_block(bb)
            c = _block_cos(xc if rotation is None else rotation.invert(xc), xb)
            c = c.mean() if not world.distributed else world.all_sum(c.sum()) / n
            mx.eval(c)
            cos.append(float(c.item()))
        if on_progress:
            on_progress("evaluate", i + 1, len(bc_list) + 1)
    mx.eval(model.parameters())  # what is left: embeddings, final norm, head -- loaded once for every window
    if base is not None:
        mx.eval(base.parameters())
    tot: Counter = Counter()  # the sums over every window
    delta = 0.0
    keep_stored(model)  # heads by slices of rows (a no-op for models opened with stored_tables)
    if base is not None:
        keep_stored(base)
    group = max(1, HEAD_POSITIONS // s)  # windows whose logits are formed together
    for g0 in range(0, windows.shape[0], group):
        g1 = min(windows.shape[0], g0 + group)
        tok = windows[g0:g1]
        k = max(0, min(det_windows, g1) - g0)  # determinism windows in this group
        acc = _OnlineHead(tok, base is not None)
        step = max(1, min(LOGIT_ELEMENTS // tok.size, tables.ROW_ELEMENTS // width))  # rows of a slice
        for r0 in range(0, vocab, step):
            r1 = min(vocab, r0 + step)
            with head_rows(model, r0, r1):
                logits = run_head(model, tok, xc[g0:g1]).astype(mx.float32)  # [B, S, r1 - r0]
                again = run_head(model, tok[:k], xd[g0:g0 + k]).astype(mx.float32) if k else None
            blogits = None
            if base is not None:
                with head_rows(base, r0, r1):
                    blogits = run_head(base, tok, xb[g0:g1]).astype(mx.float32)
            acc.add(r0, logits, blogits, None if again is None else mx.abs(again - logits[:k]).max())
        tot.update(acc.totals())
        delta = max(delta, acc.delta)
    if on_progress:
        on_progress("evaluate", len(bc_list) + 1, len(bc_list) + 1)
    if world.distributed:  # every rank's sums, in one fixed order of keys
        keys = ("nll", "base_nll", "kl", "top1")
        tot = Counter(dict(zip(keys, world.all_sum(mx.array([tot.get(k, 0.0) for k in keys],
                                                             dtype=mx.float32)).tolist())))
        delta = world.max(delta)
    m = _metrics(n, s, tot, cos if base is not None else None)
    if measure_det:
        m.determinism_delta = float(delta)
    m.eval_s = time.perf_counter() - t0
    return m


def evaluate(model: str, base: str | None = None, *, eval_tokens: int = 8192, seq_len: int = 512,
             corpus: str = "wiki", det_windows: int = 1, on_progress=None) -> dict:
    """Open ``model`` (and ``base``; model specs as in ``model.open``) and score it on ``eval_tokens`` tokens of
    ``corpus`` in ``seq_len`` windows -> metrics dict (``Metrics`` fields, the corpus record and the model's id,
    path and hash). Without ``base`` only PPL and determinism are measured. Streams both models
    (``stream_compare``)."""
    m, tok, config, info = open_model(model, lazy=True, stored_tables=True)
    b = open_model(base, lazy=True, stored_tables=True)[0] if base is not None else None
    text = data.load_corpus(corpus)
    wins = data.text_windows(tok, text, eval_tokens, seq_len)
    out = stream_compare(m, b, wins, det_windows=det_windows, rotation=config_rotation(config),
                         on_progress=on_progress).to_dict()
    out["corpus"] = text.record(int(wins.size), data.bos_id(tok) is not None)
    out["model"] = {"id": info.id, "path": info.path, "hash": info.hash}
    return out
