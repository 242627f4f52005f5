"""GGUF input: convert a llama- or gemma3-architecture GGUF file (any ggml quant type) into an HF-format float32
folder.

The tensor names map from llama.cpp's (``blk.N.attn_q`` ...) to the HF/mlx-lm ones; llama.cpp's rotary row
permutation of llama's q/k is undone, and the 1 it adds to Gemma's norm weights (its norms multiply by w, Gemma's by
1 + w) is taken off. The GGUF's vocabulary is rebuilt as a ``tokenizers`` tokenizer.json: a gpt2-style BPE from its
merges, or a SentencePiece BPE (``tokenizer.ggml.model`` "llama", e.g. Gemma's) from its pieces and scores, merges
ranked by the merged piece's score, byte fallback.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from .files import ModelError
from .save import rename_shards, replace_dir, write_shard


GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


GEMMA3_NAMES = dict(GGUF_NAMES, ffn_norm="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
                    post_ffw_norm="post_feedforward_layernorm", attn_q_norm="self_attn.q_norm",
                    attn_k_norm="self_attn.k_norm")  # Gemma-3's sandwich norms and q/k norms


OUTSIDE_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}  # llama.cpp's names of the tensors outside the blocks -> HF's


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row permutation of q/k (``convert_hf_to_gguf.py``): w [n_head * head_dim, ...] -- any
    per-row array (weights, codes, scales, biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of q/k: w [n_head * head_dim, in]."""
    rows = w.shape[0]  # inverse of llama.cpp's permute: reshape(n_head, 2, rows/n_head/2).swapaxes(1, 2)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges of a SentencePiece BPE vocabulary (piece -> id) with its scores: every split of a piece into
    two pieces of the vocabulary, ranked by the whole piece's score (higher first), then by the parts' ids."""
    out = []
    for piece, i in vocab.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        out.extend((scores[i], m) for m in local)
    out.sort(key=lambda x: -x[0])  # stable: equal scores keep the parts' id order
    return [m for _, m in out]


def _gguf_tokenizer(fields: dict, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    kind = fields.get("tokenizer.ggml.model")
    vocab = {t: i for i, t in enumerate(tokens)}

    def name(key):
        i = fields.get(key)
        return tokens[i] if i is not None else None

    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        add_bos = False
    elif kind == "llama":  # SentencePiece BPE (llama-2, gemma): pieces with "▁" for spaces, byte fallback
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        normal = {t: i for t, i in vocab.items() if types[i] in (1, 6)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(normal, scores), unk_token=name(
            "tokenizer.ggml.unknown_token_id"), fuse_unk=True, byte_fallback=True))
        prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                              + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        bos = name("tokenizer.ggml.bos_token_id")
        if add_bos and bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        raise ModelError(f"unsupported GGUF tokenizer model {kind!r} (gpt2 BPE or llama SentencePiece)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    tok.save(str(out / "tokenizer.json"))

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "add_bos_token": add_bos,
           "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
           "unk_token": name("tokenizer.ggml.unknown_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id"),
           "clean_up_tokenization_spaces": False}
    if "tokenizer.chat_template" in fields:
        cfg["chat_template"] = fields["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _hf_name(name: str, names: dict = GGUF_NAMES) -> str | None:
    """A GGUF tensor name -> its HF / mlx-lm name (None: not a tensor the model reads)."""
    if name in OUTSIDE_NAMES:
        return OUTSIDE_NAMES[name]
    if name.startswith("blk."):
        _, i, part, _ = name.split(".")
        return f"model.layers.{i}.{names[part]}.weight" if part in names else None
    return None


def _llama_config(g, fields: dict, tied: bool) -> dict:
    n_head, hidden = g("attention.head_count"), g("embedding_length")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": hidden // n_head,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied}


def _gemma3_config(g, fields: dict, tied: bool) -> dict:
    """Gemma-3 text: what the GGUF does not store (the local rotary base, every 6th layer global, the query
    scale) takes Gemma-3's published values. mlx-lm's gemma3_text ties its head when the weights have no
    lm_head."""
    head_dim = g("attention.key_length")
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim, "sliding_window": g("attention.sliding_window", 512),
            "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": g("final_logit_softcapping"), "attn_logit_softcapping": None,
            "tie_word_embeddings": tied}


ARCHS = {"llama": (_llama_config, GGUF_NAMES), "gemma3": (_gemma3_config, GEMMA3_NAMES)}  # GGUF architectures read


def convert_gguf(gguf_path: str | Path, out: str | Path, *, shard_bytes: int = 2 << 30) -> Path:
    """Convert a llama- or gemma3-architecture GGUF (any ggml quant type) into an HF-format fp32 folder, atomically, one tensor
    at a time (shards of about ``shard_bytes``, so a large GGUF never sits in memory whole)."""
    import gguf

    out = Path(out)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # noqa: BLE001 - the reader raises many types on bad files
        raise ModelError(f"cannot read GGUF file {gguf_path}: {e}") from e
    fields = {}
    for k, f in reader.fields.items():
        try:
            fields[k] = f.contents()
        except Exception:  # noqa: BLE001 - some exotic field types; not needed
            pass
    arch = fields.get("general.architecture")
    if arch not in ARCHS:
        raise ModelError(f"GGUF architecture {arch!r} is not supported for conversion ({', '.join(ARCHS)})")
    g = lambda k, d=None: fields.get(f"{arch}.{k}", d)  # noqa: E731
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    arch_config, names = ARCHS[arch]
    config = {
        "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")), "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": g("context_length"), "vocab_size": len(fields["tokenizer.ggml.tokens"]),
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"), "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        **arch_config(g, fields, tied),
        "torch_dtype": "float32", "mlx_holo_source": f"converted from {Path(gguf_path).name}",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pending, size, shards = {}, 0, []
        for name, t in tensors.items():  # one tensor dequantized at a time, a shard written every shard_bytes
            key = _hf_name(name, names)
            if key is None:
                continue
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            w = w.reshape([int(d) for d in reversed(t.shape)]) if w.size == int(np.prod(t.shape)) else w
            if arch == "llama" and name.endswith("attn_q.weight"):
                w = _unpermute(w, n_head)
            elif arch == "llama" and name.endswith("attn_k.weight"):
                w = _unpermute(w, n_kv)
            elif arch == "gemma3" and name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores Gemma's 1 + w
            pending[key] = mx.array(w)
            size += w.nbytes
            if size >= shard_bytes:
                shards.append(write_shard(tmp, len(shards), pending))
                pending, size = {}, 0
        if pending or not shards:
            shards.append(write_shard(tmp, len(shards), pending))
        rename_shards(tmp, shards)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _gguf_tokenizer(fields, tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
