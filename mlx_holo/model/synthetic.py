"""Synthetic checkpoints of real shapes, for scale work: an HF-format llama / qwen2 / mixtral-style folder of any
config, written shard by shard in bounded memory as bf16 safetensors (mlx-lm's shard names and index), with a
tokenizer copied from a given folder (by default the embedded model's).

The weights are random but not white noise, so that calibrated quantizers have something to do: every linear is
W = N(0, 1) / sqrt(in) * r_out * c_in with per-row scales r ~ LogNormal(0, ``row_spread``) (rows of real layers
differ in norm) and per-column scales c = 1 except a few outlier input channels (``outlier_frac``) scaled by
``outlier_scale``; every norm's weight is 1 except the same outlier channels at ``outlier_scale``, so the
activations entering the linears carry the few large channels that AWQ and GPTQ's act-order are built for
(Dettmers et al. 2022, "LLM.int8()"; Lin et al. 2023, AWQ). The HF tensor names are the ones the real families
use (mixtral's experts ``block_sparse_moe.experts.E.w1/w2/w3``), so mlx-lm's own sanitize runs on them.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .files import TOKENIZER_FILES, ModelError
from .save import rename_shards, write_shard

SHARD_BYTES = 2 << 30  # bf16 bytes per shard file


@dataclass
class SyntheticConfig:
    model_type: str = "llama"            # llama | qwen2 | mixtral
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 49152
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    num_local_experts: int = 0           # mixtral: experts per block (0 = dense MLP)
    num_experts_per_tok: int = 2
    extra: dict = field(default_factory=dict)  # more config.json keys

    def hf_config(self) -> dict:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
        cfg = {"architectures": [arch[self.model_type]], "model_type": self.model_type,
               "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
               "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
               "num_key_value_heads": self.num_key_value_heads, "vocab_size": self.vocab_size,
               "tie_word_embeddings": self.tie_word_embeddings, "rope_theta": self.rope_theta,
               "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": 1e-5,
               "hidden_act": "silu", "torch_dtype": "bfloat16", "head_dim": self.hidden_size // self.num_attention_heads}
        if self.model_type == "mixtral":
            cfg.update(num_local_experts=self.num_local_experts, num_experts_per_tok=self.num_experts_per_tok)
        return dict(cfg, **self.extra, mlx_holo_synthetic=True)


# Real shapes (config.json of the released models; weights random). ``--layers`` shortens any of them.
PRESETS = {
    "qwen2.5-0.5b": SyntheticConfig("qwen2", 896, 4864, 24, 14, 2, 151936, True, 1e6),
    "llama3.2-1b": SyntheticConfig("llama", 2048, 8192, 16, 32, 8, 128256, True, 5e5),
    "llama3.2-3b": SyntheticConfig("llama", 3072, 8192, 28, 24, 8, 128256, True, 5e5),
    "llama3-8b": SyntheticConfig("llama", 4096, 14336, 32, 32, 8, 128256, False, 5e5),
    "qwen2.5-14b": SyntheticConfig("qwen2", 5120, 13824, 48, 40, 8, 152064, False, 1e6),
    "mixtral-8x7b": SyntheticConfig("mixtral", 4096, 14336, 32, 32, 8, 32000, False, 1e6, 32768, 8, 2),
    "moe-2b": SyntheticConfig("mixtral", 1024, 2816, 16, 16, 4, 32000, False, 1e6, 32768, 8, 2),
}


def tensor_specs(cfg: SyntheticConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) of every tensor, in file order; kind: embedding | linear | reader (a linear reading a
    norm's output) | bias | norm."""
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    specs = [("model.embed_tokens.weight", (cfg.vocab_size, D), "embedding")]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        specs.append((f"{p}.input_layernorm.weight", (D,), "norm"))
        for name, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            specs.append((f"{p}.self_attn.{name}.weight", (out, D), "reader"))
            if cfg.model_type == "qwen2":
                specs.append((f"{p}.self_attn.{name}.bias", (out,), "bias"))
        specs.append((f"{p}.self_attn.o_proj.weight", (D, q), "linear"))
        specs.append((f"{p}.post_attention_layernorm.weight", (D,), "norm"))
        if cfg.model_type == "mixtral" and cfg.num_local_experts:
            m = f"{p}.block_sparse_moe"
            specs.append((f"{m}.gate.weight", (cfg.num_local_experts, D), "reader"))
            for e in range(cfg.num_local_experts):
                specs += [(f"{m}.experts.{e}.w1.weight", (I, D), "reader"),
                          (f"{m}.experts.{e}.w2.weight", (D, I), "linear"),
                          (f"{m}.experts.{e}.w3.weight", (I, D), "reader")]
        else:
            specs += [(f"{p}.mlp.gate_proj.weight", (I, D), "reader"), (f"{p}.mlp.up_proj.weight", (I, D), "reader"),
                      (f"{p}.mlp.down_proj.weight", (D, I), "linear")]
    specs.append(("model.norm.weight", (D,), "norm"))
    if not cfg.tie_word_embeddings:
        specs.append(("lm_head.weight", (cfg.vocab_size, D), "reader"))
    return specs


def n_params(cfg: SyntheticConfig) -> int:
    return sum(math.prod(s) for _, s, _ in tensor_specs(cfg))


def _outliers(width: int, frac: float, rng: np.random.Generator) -> np.ndarray:
    k = max(1, round(frac * width)) if frac > 0 else 0
    return np.sort(rng.choice(width, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)


def _tensor(shape, kind: str, rng: np.random.Generator, outliers: np.ndarray, row_spread: float,
            outlier_scale: float, chunk_rows: int = 8192) -> mx.array:
    """One bf16 tensor, generated in row chunks (an embedding of 128k x 4096 never exists in float32 at once)."""
    if kind == "norm":
        w = np.ones(shape, np.float32)
        w[outliers] = outlier_scale
        return mx.array(w).astype(mx.bfloat16)
    if kind == "bias":
        return mx.array(0.1 * rng.standard_normal(shape, np.float32)).astype(mx.bfloat16)
    rows, cols = shape
    std = 0.02 if kind == "embedding" else 1.0 / math.sqrt(cols)  # 0.02: HF's initializer_range (a tied head reads it)
    col = np.ones(cols, np.float32)
    if kind == "reader":  # the channels the norm amplifies feed it: smaller weights there keep its output scale
        col[outliers] = 1.0 / outlier_scale ** 0.5
    parts = []
    for r0 in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - r0)
        w = rng.standard_normal((n, cols), np.float32) * std
        w *= rng.lognormal(0.0, row_spread, (n, 1)).astype(np.float32)
        w *= col
        parts.append(mx.array(w).astype(mx.bfloat16))
        mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def write_synthetic(out: str | Path, cfg: SyntheticConfig, *, seed: int = 0, tokenizer_from: str | Path | None = None,
                    shard_bytes: int = SHARD_BYTES, row_spread: float = 0.3, outlier_frac: float = 0.005,
                    outlier_scale: float = 20.0, on_progress=None) -> Path:
    """Write the checkpoint of ``cfg`` into the new folder ``out`` -> out. At most one shard (``shard_bytes`` of
    bf16) plus one tensor is held at a time. tokenizer_from: a folder whose tokenizer files are copied (default: the
    embedded model's)."""
    from .open import embedded_default_dir

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} already exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    outliers = _outliers(cfg.hidden_size, outlier_frac, rng)
    specs = tensor_specs(cfg)
    shards, pending, size = [], {}, 0
    for k, (name, shape, kind) in enumerate(specs):
        t = _tensor(shape, kind, rng, outliers, row_spread, outlier_scale)
        if size and size + t.nbytes > shard_bytes:
            shards.append(write_shard(out, len(shards), pending, fmt="pt"))
            pending, size = {}, 0
        pending[name] = t
        size += t.nbytes
        if on_progress:
            on_progress("synthesize", k + 1, len(specs))
    shards.append(write_shard(out, len(shards), pending, fmt="pt"))
    rename_shards(out, shards)
    (out / "config.json").write_text(json.dumps(cfg.hf_config(), indent=2))
    src = Path(tokenizer_from) if tokenizer_from is not None else embedded_default_dir()
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)
    return out


def preset(name: str, layers: int | None = None) -> SyntheticConfig:
    """A named real shape, optionally with fewer (or more) blocks."""
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return replace(cfg, num_hidden_layers=layers) if layers else replace(cfg)


def describe(cfg: SyntheticConfig) -> dict:
    return dict(asdict(cfg), n_params=n_params(cfg), bf16_bytes=2 * n_params(cfg))
