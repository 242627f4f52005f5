"""Shared fixtures: a tiny seeded llama model folder (fast unit tests) and the embedded model (slow tests).

Importing this file re-executes pytest with Debian's OpenBLAS preloaded when it is installed (MLX's bundled CPU BLAS
is ~20x slower); set MLX_HOLO_NO_REEXEC=1 to opt out.
"""
import json
import os
from pathlib import Path

import pytest

from mlx_holo.hardware import ensure_fast_blas


def pytest_configure(config):
    """Re-exec with OpenBLAS preloaded; pytest's fd capture is stopped first so output reaches the terminal."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None and ensure_fast_blas.__module__ and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        capman.stop_global_capturing()
    ensure_fast_blas()

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True,
    "vocab_size": 320,
}


def byte_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer with no merges (256 byte tokens + 2 specials), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))


def make_tiny_model(out: Path, config: dict | None = None, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    cfg = dict(TINY_CONFIG, **(config or {}))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(cfg))
    byte_tokenizer(out)
    return out


ARCH_CONFIGS = {  # tiny members of other families (untied heads): attention biases, and two kinds of MoE
    "qwen2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "gemma": {},                                    # RMSNorm scaling by (1 + w)
    "gemma2": {"query_pre_attn_scalar": 32},        # norms after attention and after the MLP too
    "starcoder2": {"norm_epsilon": 1e-5},           # LayerNorm with a bias, c_fc/c_proj MLP
    "phi3": {},                                     # fused qkv_proj and gate_up_proj
    "olmo2": {},                                    # norms after attention and MLP only (no input norms)
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "logits_scaling": 1.0, "attention_bias": False,
                   "embedding_multiplier": 1.0, "attention_multiplier": 1.0, "residual_multiplier": 1.0},
    "deepseek_v2": {"moe_intermediate_size": 64, "n_routed_experts": 4, "n_shared_experts": 1,  # MLA attention;
                    "num_experts_per_tok": 2, "kv_lora_rank": 32, "q_lora_rank": None,        # block 0 dense
                    "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 16, "first_k_dense_replace": 1,
                    "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                    "routed_scaling_factor": 1.0, "rope_scaling": {"type": "default", "factor": 1.0}},
}


def make_tiny_arch(out: Path, model_type: str, seed: int = 0, config: dict | None = None) -> Path:
    """A seeded tiny ``model_type`` folder in mlx-lm's own parameter layout (which its sanitize leaves as is)."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    M = importlib.import_module(f"mlx_lm.models.{model_type}")
    cfg = dict(TINY_CONFIG, model_type=model_type, architectures=[], tie_word_embeddings=False,
               **ARCH_CONFIGS[model_type])
    cfg.update(config or {})
    mx.random.seed(seed)
    model = M.Model(M.ModelArgs.from_dict(cfg))
    model.update(random_norms_and_biases(model))  # ones and zeros would hide a dropped bias or a wrong scale fold
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(cfg))
    byte_tokenizer(out)
    return out


def random_norms_and_biases(model):
    """Random (seeded) values for every ``bias`` and every norm's weight (around 1, or around 0 for Gemma's 1 + w)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    gemma = type(model).__module__.split(".")[-1].startswith("gemma")
    out = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith(".bias"):
            out.append((k, 0.5 * mx.random.normal(v.shape)))
        elif "norm" in k and v.ndim == 1:
            out.append((k, (0.0 if gemma else 1.0) + 0.3 * mx.random.normal(v.shape)))
    return tree_unflatten(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    import random
    rnd = random.Random(0)
    words = "the of and a to in is was for on that with as by at from his her it an were are".split()
    p.write_text(" ".join(rnd.choice(words) for _ in range(6000)))
    return p


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from mlx_holo import model as models
    return models.embedded_default_dir()
