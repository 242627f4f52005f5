"""GGUF input of a Gemma-3 file: names, the 1 llama.cpp adds to Gemma's norms, the SentencePiece BPE tokenizer."""
import gguf
import mlx.core as mx
import numpy as np
from conftest import random_norms_and_biases

from mlx_holo.model.gguf import GEMMA3_NAMES, convert_gguf, spm_merges
from mlx_holo.model.open import open_model

CFG = {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 96,
       "num_attention_heads": 2, "head_dim": 32, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
       "query_pre_attn_scalar": 32, "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6,
       "rope_local_base_freq": 10000.0, "max_position_embeddings": 512}
PIECES = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + [
    "▁", "a", "b", "c", "ab", "▁a", "▁ab", "abc", "▁abc"]


def _scores():
    # control and byte pieces score 0; a later normal piece scores lower (as SentencePiece's own ranks do)
    return [0.0] * 260 + [-float(i) for i in range(len(PIECES) - 260)]


def _write_gguf(path, model):
    from mlx.utils import tree_flatten

    back = {v: k for k, v in GEMMA3_NAMES.items()}
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(CFG["num_hidden_layers"])
    w.add_embedding_length(CFG["hidden_size"])
    w.add_feed_forward_length(CFG["intermediate_size"])
    w.add_head_count(CFG["num_attention_heads"])
    w.add_head_count_kv(CFG["num_key_value_heads"])
    w.add_key_length(CFG["head_dim"])
    w.add_value_length(CFG["head_dim"])
    w.add_layer_norm_rms_eps(CFG["rms_norm_eps"])
    w.add_rope_freq_base(CFG["rope_theta"])
    w.add_context_length(CFG["max_position_embeddings"])
    w.add_sliding_window(CFG["sliding_window"])
    w.add_tokenizer_model("llama")
    w.add_token_list(PIECES)
    w.add_token_scores(_scores())
    w.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * (len(PIECES) - 260))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for k, v in tree_flatten(model.parameters()):
        a = np.array(v.astype(mx.float32))
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        else:
            _, _, i, *rest = k.split(".")
            name = f"blk.{i}.{back['.'.join(rest[:-1])]}.weight"
        if name.endswith("norm.weight"):
            a = a + 1.0  # llama.cpp's Gemma norms multiply by w, stored as 1 + w
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gemma3_gguf_converts_to_the_same_model(tmp_path):
    from mlx_lm.models import gemma3_text

    mx.random.seed(0)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(dict(CFG, vocab_size=len(PIECES))))
    model.update(random_norms_and_biases(model))
    model.tie_word_embeddings = True  # as Gemma-3 is (and its GGUF, without output.weight)
    model.pop("lm_head")
    mx.eval(model.parameters())
    _write_gguf(tmp_path / "g.gguf", model)
    out = convert_gguf(tmp_path / "g.gguf", tmp_path / "g")
    m, tok, cfg, _ = open_model(str(out))
    assert cfg["model_type"] == "gemma3_text" and cfg["head_dim"] == 32 and cfg["query_pre_attn_scalar"] == 32
    tokens = mx.array([[2, 264, 265, 266, 267, 268, 100, 263]])
    np.testing.assert_allclose(np.array(m(tokens)), np.array(model(tokens)), rtol=1e-4, atol=1e-4)
    # the tokenizer: BOS first, SentencePiece's "▁" for spaces, merges by score, bytes for what no piece covers
    ids = tok.encode("ab abc")
    assert [PIECES[i] for i in ids] == ["<bos>", "ab", "▁abc"]
    assert [PIECES[i] for i in tok.encode("z")] == ["<bos>", "<0x7A>"]
    assert tok.decode(ids, skip_special_tokens=True) == "ab abc"


def test_spm_merges_rank_by_the_merged_piece():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    scores = [0, 0, 0, -5.0, -1.0, -9.0]  # bc ranks above ab
    merges = spm_merges(vocab, scores)
    assert merges[:2] == [("b", "c"), ("a", "b")]
    assert set(merges[2:]) == {("a", "bc"), ("ab", "c")}
