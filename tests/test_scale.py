"""Scale: synthetic sharded checkpoints, sharded output written block by block, streaming evaluation equal to the
in-memory one, and memory that does not grow with depth -- on tiny synthetic checkpoints of the real families'
layouts."""
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_holo import data
from mlx_holo import model as models
from mlx_holo.compression import compress
from mlx_holo.evaluation import compare, stream_compare
from mlx_holo.model.synthetic import SyntheticConfig, n_params, tensor_specs, write_synthetic
from mlx_holo.recipe import Recipe

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=320)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from conftest import byte_tokenizer

    d = tmp_path_factory.mktemp("tok")
    byte_tokenizer(d)
    return d


def synth(path, tok_dir, model_type="llama", layers=2, shard_bytes=40_000, **kw):
    cfg = SyntheticConfig(model_type=model_type, num_hidden_layers=layers, **dict(TINY, **kw))
    return write_synthetic(path, cfg, tokenizer_from=tok_dir, shard_bytes=shard_bytes)


@pytest.mark.parametrize("model_type,kw", [("llama", {}), ("qwen2", {"tie_word_embeddings": False}),
                                           ("mixtral", {"num_local_experts": 4, "tie_word_embeddings": False})])
def test_synthetic_checkpoint_is_sharded_and_loads(tmp_path, tok_dir, model_type, kw):
    from mlx_lm import generate, load

    d = synth(tmp_path / "m", tok_dir, model_type, **kw)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    cfg = SyntheticConfig(model_type=model_type, num_hidden_layers=2, **dict(TINY, **kw))
    assert set(index["weight_map"]) == {n for n, _, _ in tensor_specs(cfg)}
    stored = {k: v for f in files for k, v in mx.load(str(d / f)).items()}
    assert all(v.dtype == mx.bfloat16 for v in stored.values())
    assert sum(v.size for v in stored.values()) == n_params(cfg)
    # structure: per-row scale spread and a few outlier channels in the norms
    q = np.array(stored["model.layers.0.self_attn.q_proj.weight"].astype(mx.float32))
    rows = np.linalg.norm(q, axis=1)
    assert rows.max() / rows.min() > 2
    norm = np.array(stored["model.layers.0.input_layernorm.weight"].astype(mx.float32))
    assert (norm > 10).sum() >= 1 and (norm == 1).mean() > 0.9
    model, tokenizer = load(str(d))
    model.set_dtype(mx.float32)  # MLX's CPU gather_mm (the experts) runs float32 only
    assert isinstance(generate(model, tokenizer, "ab", max_tokens=3), str)


def test_synthetic_is_seeded(tmp_path, tok_dir):
    a, b = synth(tmp_path / "a", tok_dir), synth(tmp_path / "b", tok_dir)
    for f in sorted(p.name for p in a.glob("model-*.safetensors")):
        x, y = mx.load(str(a / f)), mx.load(str(b / f))
        assert all(mx.array_equal(x[k], y[k]).item() for k in x)


def test_sharded_output_loads_in_mlx_lm_and_generates(tmp_path, tok_dir, text_file):
    from mlx_lm import generate, load

    src = synth(tmp_path / "src", tok_dir, layers=3)
    out = tmp_path / "q"
    ev = compress(str(src), Recipe(method="gptq", bits=4, calib_tokens=256, calib_seq_len=64,
                                   calib_corpus=str(text_file)), out, eval_tokens=256, eval_seq_len=64,
                  eval_corpus=str(text_file), gates=[], shard_bytes=30_000)
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) >= 3 and ev["output"]["shards"] == len(files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    stored = {k: v for f in files for k, v in mx.load(str(out / f)).items()}
    assert set(index["weight_map"]) == set(stored)
    assert ev["bytes"]["total"] == sum(v.nbytes for v in stored.values())
    assert not list(out.glob(".shard-*"))
    model, tokenizer = load(str(out))
    assert isinstance(generate(model, tokenizer, "the", max_tokens=3), str)
    assert len(ev["block_seconds"]) == 3


def test_streaming_evaluation_equals_in_memory(tmp_path, tok_dir, text_file):
    src = synth(tmp_path / "src", tok_dir, layers=3, tie_word_embeddings=False)
    out = tmp_path / "q"
    compress(str(src), Recipe(method="rtn", bits=3), out, eval_tokens=0)
    tok = models.open_model(str(src), lazy=True)[1]
    wins = data.windows(data.tokenize(tok, data.load_corpus(str(text_file)), 512), 64)  # 8 windows
    mem = compare(models.open_model(str(out))[0], models.open_model(str(src))[0], wins, det_windows=2)
    st = stream_compare(models.open_model(str(out), lazy=True)[0], models.open_model(str(src), lazy=True)[0], wins,
                        det_windows=2, chunk=3)
    for k in ("ppl", "base_ppl", "kl", "top1", "cos_min"):
        assert getattr(st, k) == pytest.approx(getattr(mem, k), rel=1e-4, abs=1e-5), k
    np.testing.assert_allclose(st.cos_per_layer, mem.cos_per_layer, rtol=1e-4)
    assert st.determinism_delta == 0.0 and st.tokens == mem.tokens
    assert mem.kl > 0.01  # the two models really differ


def test_peak_memory_of_compress_and_evaluate_does_not_grow_with_depth(tmp_path, tok_dir, text_file):
    peaks = {}
    for layers in (2, 8):
        src = synth(tmp_path / f"src{layers}", tok_dir, layers=layers, hidden_size=256, intermediate_size=768,
                    shard_bytes=1 << 20)
        r = Recipe(method="gptq", bits=4, calib_tokens=512, calib_seq_len=64, calib_corpus=str(text_file))
        compress(str(src), r, tmp_path / f"q{layers}", eval_tokens=0, gates=[])
        tok = models.open_model(str(src), lazy=True)[1]
        wins = data.windows(data.tokenize(tok, data.load_corpus(str(text_file)), 512), 64)
        mx.clear_cache()
        mx.reset_peak_memory()
        stream_compare(models.open_model(str(tmp_path / f"q{layers}"), lazy=True)[0],
                       models.open_model(str(src), lazy=True)[0], wins)
        peaks[layers] = mx.get_peak_memory()
    block = 4 * (4 * 256 * 256 + 3 * 256 * 768)  # one block in float32
    assert peaks[8] < peaks[2] + 2 * block, peaks  # 6 more blocks would be 6 more


def test_preflight_refuses_a_run_that_cannot_fit_and_names_the_flag(tmp_path, tok_dir, text_file):
    from mlx_holo.preflight import PreflightError, estimate

    src = synth(tmp_path / "src", tok_dir, layers=2)
    r = Recipe(method="gptq", bits=4, calib_tokens=4096, calib_seq_len=64, calib_corpus=str(text_file))
    cfg = json.loads((src / "config.json").read_text())
    est = estimate(cfg, r, eval_tokens=0)
    with pytest.raises(PreflightError, match=r"--calib-tokens"):
        compress(str(src), r, tmp_path / "o", eval_tokens=0, max_memory_gb=est.peak_bytes / 1e9 * 0.9)
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
    # more calibration tokens, more memory; the estimate is recorded beside the measured peak
    assert estimate(cfg, Recipe(**{**r.to_dict(), "calib_tokens": 8192}), eval_tokens=0).peak_bytes > est.peak_bytes
    ev = compress(str(src), r, tmp_path / "ok", eval_tokens=0, gates=[], max_memory_gb=est.peak_bytes / 1e9 * 1.1)
    assert ev["memory_estimate"]["peak_bytes"] == est.peak_bytes and ev["peak_memory_bytes"] > 0


def test_preflight_scales_with_the_model():
    from mlx_holo.model.synthetic import preset
    from mlx_holo.preflight import estimate

    small = estimate(preset("qwen2.5-0.5b").hf_config(), Recipe(method="gptq", calib_tokens=1024), eval_tokens=512)
    big = estimate(preset("llama3-8b").hf_config(), Recipe(method="gptq", calib_tokens=1024), eval_tokens=512)
    assert 0 < small.peak_bytes < big.peak_bytes < 32e9  # an 8B run fits a 32 GB machine, block by block
    e2e = estimate(preset("llama3-8b").hf_config(), Recipe(method="gptq", e2e_steps=10), eval_tokens=512)
    assert e2e.peak_phase == "tuning" and e2e.peak_bytes > 2 * 8e9 * 4  # end-to-end tuning holds two fp32 models


@pytest.mark.slow
def test_gguf_conversion_is_written_in_shards_and_equals_the_one_file_conversion(tmp_path, embedded_dir):
    from mlx_holo.model.gguf import convert_gguf
    from mlx_holo.model.open import embedded_gguf

    out = convert_gguf(embedded_gguf(), tmp_path / "conv", shard_bytes=100 << 20)
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) >= 3 and (out / "model.safetensors.index.json").exists()
    ref = models.load_weights(embedded_dir)
    got = models.load_weights(out)
    assert set(got) == set(ref)
    assert all(mx.array_equal(got[k], ref[k]).item() for k in ref)


def test_prefetcher_advises_the_next_blocks_bytes(tiny_model_dir, monkeypatch):
    """The prefetch hint covers exactly the byte ranges of the tensors under the prefix, read from the headers."""
    import os

    from mlx_holo.model.files import prefetcher, tensor_extents

    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, a, n, advice: calls.append((a, n, advice)), raising=False)
    ext = tensor_extents(tiny_model_dir)
    want = sorted((a, b - a) for name, (_, a, b) in ext.items() if name.startswith("model.layers.1."))
    prefetcher(tiny_model_dir)("model.layers.1.")
    assert sorted((a, n) for a, n, _ in calls) == want and len(want) >= 9
    t = mx.load(str(tiny_model_dir / "model.safetensors"))
    f, a, b = ext["model.layers.1.mlp.down_proj.weight"]
    assert b - a == t["model.layers.1.mlp.down_proj.weight"].nbytes
    with open(f, "rb") as fh:  # the extent holds the tensor's bytes
        fh.seek(a)
        raw = fh.read(b - a)
    assert raw == bytes(memoryview(t["model.layers.1.mlp.down_proj.weight"]))


@pytest.mark.parametrize("tied", [True, False])
def test_stored_tables_score_as_float32_tables_and_hold_no_float32_copy(tmp_path, tok_dir, text_file, monkeypatch,
                                                                        tied):
    """Tables kept as stored (bf16 here; 3-bit codes in the compressed folder) and applied in slices of rows, to
    slices of positions, give the float32 tables' metrics, while holding only their stored bytes."""
    from mlx_holo import evaluation
    from mlx_holo.model import tables

    src = synth(tmp_path / "src", tok_dir, layers=2, tie_word_embeddings=tied, vocab_size=1000)
    out = tmp_path / "q"
    compress(str(src), Recipe(method="rtn", bits=3), out, eval_tokens=0)
    tok = models.open_model(str(src), lazy=True)[1]
    wins = data.windows(data.tokenize(tok, data.load_corpus(str(text_file)), 256), 64)
    want = compare(models.open_model(str(out))[0], models.open_model(str(src))[0], wins)  # whole float32 logits
    monkeypatch.setattr(tables, "ROW_ELEMENTS", 128 * 96)  # 96 rows a slice: 11 slices, the last a short one
    assert tables.row_slices(1000, 128)[-1] == (960, 1000)
    monkeypatch.setattr(evaluation, "HEAD_POSITIONS", 128)  # two 64-token windows at a time
    monkeypatch.setattr(evaluation, "LOGIT_ELEMENTS", 128 * 80)  # 80 vocabulary rows a slice, the last a short one
    got = stream_compare(models.open_model(str(out), lazy=True, stored_tables=True)[0],
                         models.open_model(str(src), lazy=True, stored_tables=True)[0], wins, det_windows=3)
    assert got.determinism_delta == 0.0 and got.tokens == want.tokens
    for k in ("ppl", "base_ppl", "kl", "top1", "cos_min"):
        assert getattr(got, k) == pytest.approx(getattr(want, k), rel=1e-5, abs=1e-6), k
    assert want.kl > 0.01  # the two models really differ
    base = models.open_model(str(src), lazy=True, stored_tables=True)[0]
    comp = models.open_model(str(out), lazy=True, stored_tables=True)[0]
    paths = sorted(p for p, _ in tables.table_modules(base))
    assert paths == (["model.embed_tokens"] if tied else ["lm_head", "model.embed_tokens"])
    assert all(models.get_module(base, p).weight.dtype == mx.bfloat16 for p in paths)
    assert all(models.get_module(comp, p).weight.dtype == mx.uint32 for p in paths)  # still the 3-bit codes
    assert base.model.layers[0].mlp.up_proj.weight.dtype == mx.float32  # the blocks are float32 as before


def test_tables_are_quantized_in_slices_with_the_whole_tables_result(tmp_path, tok_dir, text_file, monkeypatch):
    """The head's GPTQ with QEP and the input embedding's RTN, slice by slice, give the codes of one whole pass."""
    from mlx_holo.model import tables
    from mlx_holo.pipeline import run as pipeline_run

    src = synth(tmp_path / "src", tok_dir, layers=2, tie_word_embeddings=False, vocab_size=1000)
    tok = models.open_model(str(src), lazy=True)[1]
    calib = data.calibration_windows(tok, data.load_corpus(str(text_file)), 512, 64, seed=0)
    r = Recipe(method="gptq", bits=3)

    def heads():
        res = pipeline_run.run(models.open_model(str(src), lazy=True, stored_tables=True)[0], calib, r)
        return {k: res.quantized[k] for k in ("lm_head", "model.embed_tokens")}, \
            {rec.name: rec.error for rec in res.layers if rec.name == "lm_head"}

    whole, err_whole = heads()
    monkeypatch.setattr(tables, "ROW_ELEMENTS", 128 * 200)
    sliced, err_sliced = heads()
    for k in whole:
        assert mx.array_equal(whole[k].packed(), sliced[k].packed()).item(), k
        assert mx.array_equal(whole[k].scales, sliced[k].scales).item(), k
    assert err_sliced["lm_head"] == pytest.approx(err_whole["lm_head"], rel=1e-4)
