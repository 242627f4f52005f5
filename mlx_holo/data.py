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

    def record(self, tokens: int) -> dict:
        return {"name": self.name, "sha256": self.sha256, "tokens": int(tokens)}


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


def windows(tokens: mx.array, seq_len: int, n_tokens: int | None = None) -> mx.array:
    """Non-overlapping windows (the GPTQ/SparseGPT perplexity convention): tokens [T] -> [N, seq_len]."""
    total = tokens.shape[0] if n_tokens is None else min(n_tokens, tokens.shape[0])
    n = total // seq_len
    if n == 0:
        raise DataError(f"need at least {seq_len} tokens for one window, have {total}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def calibration_windows(tokenizer, corpus: Corpus, n_tokens: int, seq_len: int, seed: int = 0) -> mx.array:
    """Random (seeded) windows of seq_len tokens from the corpus -> [n_tokens // seq_len, seq_len]."""
    import numpy as np

    toks = tokenize(tokenizer, corpus)
    n = max(1, n_tokens // seq_len)
    if toks.shape[0] < seq_len + 1:
        raise DataError(f"corpus {corpus.name} has only {toks.shape[0]} tokens, need > {seq_len}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, toks.shape[0] - seq_len, size=n)
    arr = np.array(toks)
    return mx.array(np.stack([arr[s:s + seq_len] for s in starts]))
