"""Text corpora for calibration and evaluation, tokenised into windows, each recorded with a content hash.

Built-in corpora come from the PyPI package ``exllamav2`` (``conversion/standard_cal_data``): ``wiki`` (Wikipedia,
used for evaluation, ``<doc>`` lines stripped) and ``c4`` (used for calibration); ``tiny``, ``code``, ``technical``
and ``multilingual`` are there too. Any local UTF-8 text file works the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .options import CORPORA as BUILTIN


class DataError(RuntimeError):
    """A corpus that cannot be found or is too short."""


@dataclass
class Corpus:
    name: str
    sha256: str    # of the text as used (after cleaning)
    text: str

    def record(self, tokens: int, bos: bool | None = None) -> dict:
        """What evidence records of the corpus: name, hash, tokens used and the window convention (``bos``:
        whether each window starts with the tokenizer's BOS token)."""
        out = {"name": self.name, "sha256": self.sha256, "tokens": int(tokens)}
        return out if bos is None else dict(out, bos=bool(bos))


def _standard_cal_data() -> Path:
    spec = importlib.util.find_spec("exllamav2")  # located, not imported (it needs torch)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("built-in corpora need the PyPI package exllamav2: pip install --no-deps exllamav2==0.3.2")
    return Path(list(spec.submodule_search_locations)[0]) / "conversion" / "standard_cal_data"


def load_corpus(name: str) -> Corpus:
    """'wiki' | 'c4' | ... | a path to a UTF-8 text file."""
    if name in BUILTIN:
        path = _standard_cal_data() / f"{name}.utf8"
    else:
        path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"corpus {name!r} not found at {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if name == "wiki":
        text = "\n".join(line for line in text.splitlines() if not line.startswith(("<doc", "</doc")))
    return Corpus(name, hashlib.sha256(text.encode("utf-8")).hexdigest(), text)


def tokenize(tokenizer, corpus: Corpus, max_tokens: int | None = None) -> mx.array:
    """-> token ids [T] (at most max_tokens). Tokenises in chunks so large texts stay fast."""
    try:  # long texts are tokenised on purpose; silence the "longer than model_max_length" warning
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    ids: list[int] = []
    text = corpus.text
    step = 200_000
    for i in range(0, len(text), step):
        ids.extend(tokenizer.encode(text[i:i + step], add_special_tokens=False))
        if max_tokens and len(ids) >= max_tokens:
            break
    return mx.array(ids[:max_tokens] if max_tokens else ids, dtype=mx.int32)


def bos_id(tokenizer) -> int | None:
    """The BOS token id when the tokenizer puts one in front of what it encodes (Llama-3, Gemma, ...), else None
    (GPT-2-style tokenizers such as SmolLM2's and Qwen2's)."""
    try:
        with_special = list(tokenizer.encode("a", add_special_tokens=True))
        plain = list(tokenizer.encode("a", add_special_tokens=False))
    except TypeError:  # a tokenizer without the argument adds nothing
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]:
        return int(bos)
    return None


def windows(tokens: mx.array, seq_len: int, n_tokens: int | None = None, bos: int | None = None) -> mx.array:
    """Non-overlapping windows (the GPTQ/SparseGPT perplexity convention): tokens [T] -> [N, seq_len].

    bos: given, every window is that token followed by seq_len - 1 consecutive text tokens, as a model that expects
    BOS sees text (llama.cpp's perplexity tool starts each chunk with BOS for such models)."""
    total = tokens.shape[0] if n_tokens is None else min(n_tokens, tokens.shape[0])
    step = seq_len - (bos is not None)
    n = total // step if n_tokens is None else min(total // step, n_tokens // seq_len)
    if n == 0:
        raise DataError(f"need at least {seq_len} tokens for one window, have {total}")
    body = tokens[: n * step].reshape(n, step)
    if bos is None:
        return body
    return mx.concatenate([mx.full((n, 1), bos, dtype=body.dtype), body], axis=1)


def text_windows(tokenizer, corpus: Corpus, n_tokens: int, seq_len: int) -> mx.array:
    """The first n_tokens // seq_len windows of a corpus, each starting with BOS when the tokenizer adds one
    (``bos_id``) -> [N, seq_len]."""
    return windows(tokenize(tokenizer, corpus, n_tokens), seq_len, n_tokens, bos_id(tokenizer))


def calibration_windows(tokenizer, corpus: Corpus, n_tokens: int, seq_len: int, seed: int = 0) -> mx.array:
    """Random (seeded) windows of seq_len tokens from the corpus -> [n_tokens // seq_len, seq_len]; each starts with
    BOS (then seq_len - 1 text tokens) when the tokenizer adds one (``bos_id``)."""
    import numpy as np

    toks = tokenize(tokenizer, corpus)
    n = max(1, n_tokens // seq_len)
    if toks.shape[0] < seq_len + 1:
        raise DataError(f"corpus {corpus.name} has only {toks.shape[0]} tokens, need > {seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, toks.shape[0] - seq_len, size=n)
    arr = np.array(toks)
    out = np.stack([arr[s:s + seq_len] for s in starts])
    bos = bos_id(tokenizer)
    if bos is not None:  # the window as the model reads text: BOS, then the text
        out = np.concatenate([np.full((n, 1), bos, out.dtype), out[:, :-1]], axis=1)
    return mx.array(out)
