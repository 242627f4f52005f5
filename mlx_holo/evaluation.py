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
Peak memory is about one block of each model, the two heads and the windows' hidden states, whatever the depth.
``compare`` holds both models and caches the base's outputs, for benchmarks that score many variants against one
base object.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import data
from .model.files import ModelError
from .model.open import open_model
from .model.structure import blocks, drop_input_embedding, release_block
from .pipeline.capture import block_inputs, capture_block_outputs, run_head


def _nll_kl_top1(logits: mx.array, targets: mx.array, base_logits: mx.array | None):
    """logits/base_logits: [S, V], targets: [S] -> (nll_sum, kl_sum, top1_count) as mx scalars."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, targets[:, None], axis=-1).sum()
    if base_logits is None:
        return nll, None, None
    logq = base_logits - mx.logsumexp(base_logits, axis=-1, keepdims=True)
    kl = (mx.exp(logq) * (logq - logp)).sum()
    top1 = (mx.argmax(logits, axis=-1) == mx.argmax(base_logits, axis=-1)).sum()
    return nll, kl, top1


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


def _metrics(n: int, s: int, nll: float, base_nll: float, kl: float, top1: float, cos: list | None) -> Metrics:
    """Sums over the n * (s - 1) predictions of n windows of s tokens -> Metrics (base figures when cos is given)."""
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
            on_progress=None) -> Metrics:
    """model/base: loaded float LMs; windows: [N, S] token ids -> Metrics.

    The base model's outputs are cached in memory for the next call with the same base object and windows (when
    they fit in BASE_CACHE_MAX_BYTES), so scoring many variants against one base costs one base pass."""
    t0 = time.perf_counter()
    n, s = windows.shape
    nll_t = kl_t = top1_t = 0.0
    base_nll_t = 0.0
    cos_sum = None
    first_logits = []
    for i in range(n):
        x = windows[i:i + 1]
        with capture_block_outputs(model) as hc:
            logits = model(x)[0].astype(mx.float32)  # [S, V]
        blogits = None
        if base is not None:
            blogits, hb = _base_outputs(base, windows, i)
            same_vocab(logits, blogits)
            cos = _cosines(hc, hb)
            cos_sum = cos if cos_sum is None else cos_sum + cos
        nll, kl, top1 = _nll_kl_top1(logits[:-1], x[0, 1:], None if blogits is None else blogits[:-1])
        if blogits is not None:
            bnll, _, _ = _nll_kl_top1(blogits[:-1], x[0, 1:], None)
            mx.eval(nll, kl, top1, bnll, cos_sum)
            kl_t += kl.item()
            top1_t += top1.item()
            base_nll_t += bnll.item()
        else:
            mx.eval(nll)
        nll_t += nll.item()
        if i < det_windows:
            first_logits.append(logits)
        if on_progress:
            on_progress("evaluate", i + 1, n)
    m = _metrics(n, s, nll_t, base_nll_t, kl_t, top1_t,
                 [float(c) for c in (cos_sum / n).tolist()] if base is not None else None)
    if det_windows:
        delta = 0.0
        for i, ref in enumerate(first_logits):
            again = model(windows[i:i + 1])[0].astype(mx.float32)
            delta = max(delta, mx.abs(again - ref).max().item())
        m.determinism_delta = float(delta)
    m.eval_s = time.perf_counter() - t0
    return m


def same_vocab(logits: mx.array, base_logits: mx.array) -> None:
    """A base with another vocabulary cannot be compared token by token: a clear error, not a broadcast failure."""
    if logits.shape[-1] != base_logits.shape[-1]:
        raise ModelError(f"the model has {logits.shape[-1]} output tokens and the base {base_logits.shape[-1]}: "
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
                   chunk: int = 4, on_progress=None) -> Metrics:
    """``compare``'s metrics, block by block: model/base are lazily opened float LMs (``open_model(spec,
    lazy=True)``) that are consumed -- each block's weights are released once applied. windows: [N, S] token ids."""
    t0 = time.perf_counter()
    n, s = windows.shape
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
            c = _block_cos(xc, xb).mean()
            mx.eval(c)
            cos.append(float(c.item()))
        if on_progress:
            on_progress("evaluate", i + 1, len(bc_list) + 1)
    mx.eval(model.parameters())  # what is left: embeddings, final norm, head -- loaded once for every window
    if base is not None:
        mx.eval(base.parameters())
    nll_t = kl_t = top1_t = base_nll_t = 0.0
    delta = 0.0
    for j in range(n):
        tok = windows[j:j + 1]
        logits = run_head(model, tok, xc[j:j + 1])[0].astype(mx.float32)  # [S, V]
        blogits = run_head(base, tok, xb[j:j + 1])[0].astype(mx.float32) if base is not None else None
        if blogits is not None:
            same_vocab(logits, blogits)
        nll, kl, top1 = _nll_kl_top1(logits[:-1], tok[0, 1:], None if blogits is None else blogits[:-1])
        parts = [nll]
        if blogits is not None:
            bnll = _nll_kl_top1(blogits[:-1], tok[0, 1:], None)[0]
            parts += [kl, top1, bnll]
        if j < det_windows:
            again = run_head(model, tok, xd[j:j + 1])[0].astype(mx.float32)
            parts.append(mx.abs(again - logits).max())
        mx.eval(*parts)
        nll_t += nll.item()
        if blogits is not None:
            kl_t += kl.item()
            top1_t += top1.item()
            base_nll_t += bnll.item()
        if j < det_windows:
            delta = max(delta, parts[-1].item())
    if on_progress:
        on_progress("evaluate", len(bc_list) + 1, len(bc_list) + 1)
    m = _metrics(n, s, nll_t, base_nll_t, kl_t, top1_t, cos if base is not None else None)
    if det_windows:
        m.determinism_delta = float(delta)
    m.eval_s = time.perf_counter() - t0
    return m


def evaluate(model: str, base: str | None = None, *, eval_tokens: int = 8192, seq_len: int = 512,
             corpus: str = "wiki", det_windows: int = 1, on_progress=None) -> dict:
    """Open ``model`` (and ``base``; model specs as in ``model.open``) and score it on ``eval_tokens`` tokens of
    ``corpus`` in ``seq_len`` windows -> metrics dict (``Metrics`` fields, the corpus record and the model's id,
    path and hash). Without ``base`` only PPL and determinism are measured. Streams both models
    (``stream_compare``)."""
    m, tok, _, info = open_model(model, lazy=True)
    b = open_model(base, lazy=True)[0] if base is not None else None
    text = data.load_corpus(corpus)
    wins = data.text_windows(tok, text, eval_tokens, seq_len)
    out = stream_compare(m, b, wins, det_windows=det_windows, on_progress=on_progress).to_dict()
    out["corpus"] = text.record(int(wins.size), data.bos_id(tok) is not None)
    out["model"] = {"id": info.id, "path": info.path, "hash": info.hash}
    return out
