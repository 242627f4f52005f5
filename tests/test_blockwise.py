"""Block-wise tuning of quantization parameters (codes frozen), on a tiny seeded llama model."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_holo import data, model as models
from mlx_holo.pipeline import capture
from mlx_holo.compression import compress
from mlx_holo.tune.block import tune_block
from mlx_holo.quant.rtn import quantize_rtn
from mlx_holo.recipe import Recipe, RecipeError


def _block_and_inputs(folder, text_file, n=512, seq=64):
    model, tok = models.open_model(str(folder))[:2]
    calib = data.calibration_windows(tok, data.load_corpus(str(text_file)), n, seq, seed=0)
    x, mask = capture.block_inputs(model, calib)
    block = models.blocks(model)[0]
    y = block(x, mask)  # the float block's output: what the quantized block should reproduce
    mx.eval(x, y)
    return block, x, mask, y


def _quantize_block(block, bits=2):
    """RTN every linear of the block; set the dequantized weights -> {path: QuantizedWeight}."""
    qws = {}
    for path, lin in models.linear_modules(block):
        qw = quantize_rtn(lin.weight.astype(mx.float32), bits, 32)
        lin.weight = qw.dequantize()
        qws[path] = qw.compact()
    return qws


def _mse(block, x, mask, y):
    d = block(x, mask) - y
    return float(((d * d).sum(-1) / (y * y).sum(-1)).mean().item())


def test_tuning_lowers_the_block_error_with_codes_frozen(tiny_model_dir, text_file):
    block, x, mask, y = _block_and_inputs(tiny_model_dir, text_file)
    qws = _quantize_block(block)
    before = _mse(block, x, mask, y)
    codes = {p: np.array(q.unpacked()) for p, q in qws.items()}
    new, res = tune_block(block, qws, x, mask, y, steps=60, lr=1e-2, batch=2, holdout=0)
    assert res.kept and res.loss_before == pytest.approx(before, rel=1e-4)
    assert res.loss_after < 0.8 * res.loss_before  # measured 0.37x on this block
    assert _mse(block, x, mask, y) == pytest.approx(res.loss_after, rel=1e-4)  # the block now holds the tuned weights
    for p, q in new.items():
        assert np.array_equal(np.array(q.unpacked()), codes[p])  # codes frozen
        assert not np.array_equal(np.array(q.scales), np.array(qws[p].scales))  # parameters moved
        assert mx.array_equal(q.scales.astype(mx.float16).astype(q.scales.dtype), q.scales).item()  # fp16 as stored
        lin = models.get_module(block, p)
        assert type(lin) is nn.Linear and mx.allclose(lin.weight, q.dequantize(), atol=0).item()
    assert len(block.trainable_parameters()["self_attn"]) > 0  # the block is left unfrozen, as it was


def test_tuning_that_does_not_help_is_dropped(tiny_model_dir, text_file):
    block, x, mask, y = _block_and_inputs(tiny_model_dir, text_file)
    qws = _quantize_block(block)
    weights = {p: mx.array(lin.weight) for p, lin in models.linear_modules(block)}
    new, res = tune_block(block, qws, x, mask, y, steps=5, lr=50.0)  # a diverging learning rate
    assert not res.kept and res.loss_after == res.loss_before
    assert all(new[p] is qws[p] for p in qws)
    for p, lin in models.linear_modules(block):
        assert mx.array_equal(lin.weight, weights[p]).item()


def _plain_and_tuned(folder, text_file, tmp_path, eval_tokens: int, recipe: dict, tuning: dict):
    """compress ``folder`` with ``recipe`` and with ``recipe`` + ``tuning`` -> (plain evidence, tuned evidence,
    plain model, tuned model), the models loaded back by stock mlx_lm."""
    from mlx_lm import load

    kw = dict(eval_tokens=eval_tokens, eval_seq_len=128, eval_corpus=str(text_file))
    recipe = dict(recipe, calib_corpus=str(text_file))
    plain = compress(str(folder), Recipe(**recipe), str(tmp_path / "plain"), **kw)
    ev = compress(str(folder), Recipe(**recipe, **tuning), str(tmp_path / "tuned"), **kw)
    return plain, ev, load(str(tmp_path / "plain"))[0], load(str(tmp_path / "tuned"))[0]


def test_compress_with_tuning_saves_tuned_parameters(tiny_model_dir, text_file, tmp_path):
    plain, ev, a, b = _plain_and_tuned(tiny_model_dir, text_file, tmp_path, 256,
                                       dict(method="gptq", bits=2, calib_tokens=512, calib_seq_len=128),
                                       dict(tune_steps=40, tune_lr=1e-3))
    recs = ev["block_tune"]
    assert [t["block"] for t in recs] == [0, 1]
    assert all(t["loss_after"] <= t["loss_before"] for t in recs) and any(t["kept"] for t in recs)
    assert "block_tune" not in plain
    i = next(t["block"] for t in recs if t["kept"])
    qa, qb = a.model.layers[i].mlp.down_proj, b.model.layers[i].mlp.down_proj
    assert mx.array_equal(qa.weight, qb.weight).item()  # same codes (GPTQ is deterministic) ...
    assert not mx.array_equal(qa.scales, qb.scales).item()  # ... tuned scales


def test_tuning_recipe_errors():
    with pytest.raises(RecipeError, match="tune_steps"):
        Recipe(method="gptq", tune_steps=-1).validate()
    with pytest.raises(RecipeError, match="affine"):
        Recipe(method="rtn", mode="mxfp4", tune_steps=10).validate()
    with pytest.raises(RecipeError, match="pruned"):
        Recipe(method="wanda", sparsity=0.5, tune_steps=10).validate()


def test_held_out_windows_are_not_trained_on(tiny_model_dir, text_file):
    block, x, mask, y = _block_and_inputs(tiny_model_dir, text_file)
    assert x.shape[0] == 8
    qws = _quantize_block(block)
    weights = {p: mx.array(lin.weight) for p, lin in models.linear_modules(block)}
    _, clean = tune_block(block, qws, x, mask, y, steps=10, lr=1e-2, holdout=0.25)
    for p, lin in models.linear_modules(block):
        lin.weight = weights[p]
    noisy_y = mx.concatenate([y[:6], 100.0 * mx.random.normal(y[6:].shape)])  # corrupt the 2 held-out windows
    _, noisy = tune_block(block, qws, x, mask, noisy_y, steps=10, lr=1e-2, holdout=0.25)
    assert noisy.losses == clean.losses  # the same training steps ...
    assert noisy.loss_before != pytest.approx(clean.loss_before, rel=1e-3)  # ... judged on the held-out windows


def test_end_to_end_kl_tuning_lowers_held_out_kl(tiny_model_dir, text_file, tmp_path):
    from mlx_holo.tune.codes import swap_code_linears, to_float
    from mlx_holo.tune.e2e import tune_kl

    kw = dict(eval_tokens=0, eval_corpus=str(text_file))
    compress(str(tiny_model_dir), Recipe(method="rtn", bits=2, calib_corpus=str(text_file)), str(tmp_path / "q"), **kw)
    m, tok = models.open_model(str(tmp_path / "q"), dequantize=False)[:2]
    code = swap_code_linears(m)
    assert len(code) == 15  # 2 blocks x 7 linears + the tied table (input lookups and output head)
    models.dequantize_model(m)
    base = models.open_model(str(tiny_model_dir))[0]
    calib = data.calibration_windows(tok, data.load_corpus(str(text_file)), 1024, 128, seed=0)
    codes = {p: np.array(cl._codes) for p, cl in code.items()}
    res = tune_kl(m, base, code, calib, steps=30, lr=1e-2)
    assert res.kept and res.kl_after < 0.9 * res.kl_before
    tuned = to_float(m, code)
    for p, qw in tuned.items():
        assert np.array_equal(np.array(qw.unpacked()).reshape(codes[p].shape), codes[p].astype(np.uint8))
        assert mx.array_equal(models.get_module(m, p).weight, qw.dequantize()).item()
    from mlx_lm import load
    models.save_replaced(tmp_path / "q", tmp_path / "t", {f"{p}.{k}": getattr(q, k) for p, q in tuned.items()
                                                          for k in ("scales", "biases")})
    loaded, _ = load(str(tmp_path / "t"))
    p, qw = next(iter(tuned.items()))
    lin = models.get_module(loaded, p)
    assert mx.array_equal(lin.scales, qw.scales.astype(lin.scales.dtype)).item()
    assert mx.array_equal(lin.weight, qw.wq).item()
    assert not (tmp_path / "t" / "evidence.json").exists()


def test_end_to_end_batch_is_the_mean_kl_of_its_windows(tiny_model_dir, text_file, tmp_path):
    from mlx_holo.tune.codes import swap_code_linears
    from mlx_holo.tune.e2e import tune_kl
    from mlx_holo.tune.optim import kl_to_base

    kw = dict(eval_tokens=0, eval_corpus=str(text_file))
    compress(str(tiny_model_dir), Recipe(method="rtn", bits=2, calib_corpus=str(text_file)), str(tmp_path / "q"), **kw)
    base = models.open_model(str(tiny_model_dir))[0]
    calib = data.calibration_windows(models.open_model(str(tmp_path / "q"), lazy=True)[1],
                                     data.load_corpus(str(text_file)), 1024, 128, seed=0)  # [8, 128]: 6 train, 2 held
    runs = []
    for seed in (0, 1):
        m = models.open_model(str(tmp_path / "q"), dequantize=False)[0]
        code = swap_code_linears(m)
        models.dequantize_model(m)
        first = float(kl_to_base(m(calib[:6]).astype(mx.float32), base(calib[:6]).astype(mx.float32)).item())
        res = tune_kl(m, base, code, calib, steps=5, lr=1e-2, batch=6, seed=seed)  # every training window a step
        assert res.losses[0] == pytest.approx(first, rel=1e-4)
        runs.append(res.losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)  # no sampling left: the seed does not matter
    with pytest.raises(ValueError, match="batch"):
        tune_kl(m, base, code, calib, steps=1, batch=0)


def test_compress_with_e2e_tuning_saves_tuned_parameters(tiny_model_dir, text_file, tmp_path):
    plain, ev, a, b = _plain_and_tuned(tiny_model_dir, text_file, tmp_path, 512,
                                       dict(method="rtn", bits=2, calib_tokens=1024, calib_seq_len=128),
                                       dict(e2e_steps=30, e2e_lr=1e-2))
    rep = ev["e2e_tune"]
    assert rep["kept"] and rep["heldout_kl_after"] < 0.9 * rep["heldout_kl_before"]
    assert rep["linears"] == 14 and rep["embeddings"] == 1 and rep["windows"] == 8
    assert ev["timings"]["e2e_tune_s"] > 0
    assert ev["metrics"]["kl"] < plain["metrics"]["kl"]  # what was saved is what was tuned
    assert "e2e_tune" not in plain and ev["recipe"]["e2e_steps"] == 30
    qa, qb = a.model.layers[1].mlp.down_proj, b.model.layers[1].mlp.down_proj
    assert mx.array_equal(qa.weight, qb.weight).item()  # same codes ...
    assert not mx.array_equal(qa.scales, qb.scales).item() and qb.scales.dtype == qa.scales.dtype  # tuned, fp16
    ea, eb = a.model.embed_tokens, b.model.embed_tokens  # the tied table (lookups and head): same codes, tuned
    assert mx.array_equal(ea.weight, eb.weight).item() and not mx.array_equal(ea.scales, eb.scales).item()
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir() if p.suffix == ".safetensors") == \
        ["model.safetensors"]


def test_e2e_recipe_errors():
    with pytest.raises(RecipeError, match="e2e_steps"):
        Recipe(method="gptq", e2e_steps=-1).validate()
    with pytest.raises(RecipeError, match="e2e_lr"):
        Recipe(method="gptq", e2e_steps=5, e2e_lr=0).validate()
    with pytest.raises(RecipeError, match="affine"):
        Recipe(method="rtn", mode="mxfp4", e2e_steps=10).validate()
    with pytest.raises(RecipeError, match="pruned"):
        Recipe(method="wanda", sparsity=0.5, e2e_steps=10).validate()
    with pytest.raises(RecipeError, match="e2e_batch"):
        Recipe(method="gptq", e2e_steps=5, e2e_batch=0).validate()


def test_code_embedding_matches_quantized_embedding():
    from mlx_holo.tune.codes import CodeEmbedding
    from mlx_holo.quant.formats import QuantizedWeight

    mx.random.seed(0)
    emb = nn.QuantizedEmbedding(100, 64, group_size=32, bits=3)
    ce = CodeEmbedding(QuantizedWeight(None, emb.scales, emb.biases, 3, 32, wq=emb.weight))
    ids = mx.array([[0, 5, 99], [7, 7, 1]])
    x = mx.random.normal((2, 3, 64))
    assert mx.allclose(ce(ids), emb(ids), atol=1e-6).item()
    assert mx.allclose(ce.as_linear(x), emb.as_linear(x), atol=1e-4).item()
    assert mx.allclose(ce(ids), ce.weight()[ids]).item()
