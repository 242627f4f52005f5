"""GGUF export: MLX affine codes at group size 32 written as llama.cpp's Q4_1 / Q5_1 / Q8_0 read back (with the
``gguf`` package's own dequantizer) bit for bit equal to our dequantized weights; names, permutation, refusals."""
import json

import gguf
import mlx.core as mx
import numpy as np
import pytest

from conftest import make_tiny_arch, make_tiny_model
from mlx_holo import model as models
from mlx_holo.compression import compress
from mlx_holo.model.files import load_weights
from mlx_holo.model.gguf import permute_rows
from mlx_holo.model.gguf_export import GGUFExportError, export_gguf, gguf_name, pack_q8_0
from mlx_holo.quant.formats import unpack
from mlx_holo.recipe import Recipe


def ours_float32(folder, key, cols):
    """Our stored tensor as float32: s * q + b per group of 32 for a quantized layer, the float tensor otherwise."""
    cfg = json.loads((folder / "config.json").read_text())
    W = load_weights(folder)
    path = key.rsplit(".", 1)[0]
    if not key.endswith(".weight") or path + ".scales" not in W:
        return np.asarray(W[key].astype(mx.float32))
    bits = cfg["quantization"].get(path, {}).get("bits", cfg["quantization"]["bits"])
    q = np.asarray(unpack(W[key], bits, cols)).astype(np.float32)
    s, b = (np.asarray(W[f"{path}.{n}"].astype(mx.float32)) for n in ("scales", "biases"))
    return (s[:, :, None] * q.reshape(q.shape[0], -1, 32) + b[:, :, None]).reshape(q.shape)


def read_back(folder, path, cfg):
    """Every tensor of the GGUF dequantized by the gguf package, compared with ours -> {gguf name: type name}."""
    W = load_weights(folder)
    types = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        key = next(k for k in W if gguf_name(k) == t.name)
        want = ours_float32(folder, key, back.shape[-1])
        heads = (cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
                 if ".attn_k." in t.name else 0)
        if heads and cfg["model_type"] == "llama":
            want = permute_rows(want, heads)
        assert np.array_equal(back.astype(np.float32), want), t.name
        types[t.name] = t.tensor_type.name
    return types


@pytest.mark.parametrize("bits,qtype", [(4, "Q4_1"), (5, "Q5_1")])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_codes_round_trip_bit_for_bit(tmp_path, text_file, bits, qtype, arch):
    src = make_tiny_model(tmp_path / "src") if arch == "llama" else make_tiny_arch(tmp_path / "src", "qwen2")
    out = tmp_path / "q"
    compress(str(src), Recipe(method="gptq", bits=bits, group_size=32, calib_tokens=512, calib_seq_len=64,
                              calib_corpus=str(text_file)), out, eval_tokens=0, gates=[])
    rep = export_gguf(out, tmp_path / "m.gguf")
    assert rep.requantized == {} and rep.bytes == (tmp_path / "m.gguf").stat().st_size
    cfg = json.loads((src / "config.json").read_text())
    types = read_back(out, tmp_path / "m.gguf", cfg)
    assert types["blk.0.attn_q.weight"] == qtype and types["token_embd.weight"] == qtype
    assert types["blk.1.ffn_norm.weight"] == "F32"
    if arch == "qwen2":
        assert types["blk.0.attn_q.bias"] == "F32" and "output.weight" in types
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith((arch, "tokenizer.ggml.model", "general.arch"))}
    assert f["general.architecture"] == arch and f[f"{arch}.block_count"] == 2
    assert f[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]


def test_our_gguf_reader_opens_the_export_with_the_same_weights(tmp_path, text_file):
    """llama: the exported file converted back by our own GGUF input (which undoes the q/k permutation) gives the
    compressed folder's weights."""
    src = make_tiny_model(tmp_path / "src", {"tie_word_embeddings": False})
    out = tmp_path / "q"
    compress(str(src), Recipe(method="rtn", bits=4, group_size=32), out, eval_tokens=0, gates=[])
    export_gguf(out, tmp_path / "m.gguf")
    back = models.open_model(str(tmp_path / "m.gguf"))[0]
    mine = models.open_model(str(out))[0]
    from mlx.utils import tree_flatten
    a, b = dict(tree_flatten(back.parameters())), dict(tree_flatten(mine.parameters()))
    assert set(a) == set(b)
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k


def test_layers_that_do_not_map_are_named_unless_requantized(tmp_path):
    src = make_tiny_model(tmp_path / "src")
    out = tmp_path / "q"
    compress(str(src), Recipe(method="rtn", bits=4, group_size=64), out, eval_tokens=0, gates=[])
    with pytest.raises(GGUFExportError, match=r"15 quantized layer.*model\.layers\.0\.mlp\.down_proj.*--group-size 32"):
        export_gguf(out, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
    rep = export_gguf(out, tmp_path / "m.gguf", requantize=True)
    assert set(rep.requantized) == {n for n, t in rep.tensors.items() if t == "Q4_1"}
    assert all(0 < e < 0.05 for e in rep.requantized.values())  # a second 4-bit rounding of 4-bit weights


def test_q8_0_blocks_and_other_architectures():
    codes = np.arange(64, dtype=np.uint8).reshape(1, 64) + 100
    scales = np.array([[0.5, 0.25]], np.float32)
    data = pack_q8_0(codes, scales)
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0).reshape(1, 64)
    want = (np.repeat(scales, 32, axis=1) * (codes.astype(np.float32) - 128))
    assert np.array_equal(back, want)


def test_cli_exit_codes(tmp_path, tiny_model_dir):
    from mlx_holo.cli.main import main

    assert main(["export", "--gguf", str(tmp_path / "x.gguf"), str(tmp_path / "missing")]) == 2
    gemma = make_tiny_arch(tmp_path / "gemma", "gemma")
    assert main(["export", "--gguf", str(tmp_path / "x.gguf"), str(gemma)]) == 2
    assert main(["export", "--gguf", str(tmp_path / "t.gguf"), str(tiny_model_dir)]) == 0  # a float folder: F16
    assert gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0].tensor_type.name in ("F16", "F32")
    assert main(["export", "--gguf", str(tmp_path / "t.gguf"), str(tiny_model_dir)]) == 2  # exists


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gguf_recipe_puts_8_bit_layers_on_q8_0s_grid(tmp_path, text_file, method):
    from mlx_holo.recipe import RecipeError

    src = make_tiny_model(tmp_path / "src")
    out = tmp_path / "q"
    r = Recipe(method=method, bits=8, group_size=32, gguf=True, calib_tokens=512, calib_seq_len=64,
               calib_corpus=str(text_file))
    compress(str(src), r, out, eval_tokens=0, gates=[])
    rep = export_gguf(out, tmp_path / "m.gguf")
    assert rep.requantized == {} and set(rep.tensors.values()) == {"Q8_0", "F32"}
    read_back(out, tmp_path / "m.gguf", json.loads((src / "config.json").read_text()))
    with pytest.raises(RecipeError, match="group-size 32"):
        Recipe(method="rtn", bits=8, gguf=True).validate()  # group size 64
    with pytest.raises(RecipeError, match="bits"):
        Recipe(method="rtn", bits=3, group_size=32, gguf=True).validate()


def test_compress_writes_a_gguf_beside_the_mlx_folder(tmp_path, text_file):
    from mlx_lm import load

    from mlx_holo import evidence

    src = make_tiny_model(tmp_path / "src")
    out = tmp_path / "q"
    with pytest.raises(GGUFExportError, match="--gguf"):
        compress(str(src), Recipe(method="rtn", bits=4, group_size=32), out, eval_tokens=0, gguf_file=True)
    assert not out.exists()
    ev = compress(str(src), Recipe(method="rtn", bits=4, group_size=32, gguf=True), out, eval_tokens=0, gates=[],
                  gguf_file=True)
    assert ev["gguf"]["bytes"] == (out / "model.gguf").stat().st_size and ev["gguf"]["requantized"] == {}
    assert "model.gguf" in ev["files"]
    assert evidence.check_folder(ev, out) == []  # validate --folder: the GGUF is among the hashed files
    read_back(out, out / "model.gguf", json.loads((src / "config.json").read_text()))
    load(str(out))  # the folder is still an mlx-lm folder
