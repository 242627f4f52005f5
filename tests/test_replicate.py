"""Replicated-layer ensembles: format, K=1 equivalence, frozen-code tuning, MoE router, save/load, bytes."""
from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_holo.quant.formats import pack
from mlx_holo.quant.rtn import quantize_rtn
from mlx_holo.replicate import (EnsembleMLP, ReplicatedWeight, ensemble_from_mlp, ensemble_nbytes, find_mlps,
                                fit_affine, init_replicas, load, mlp_output_error, replicate_mlps, replicate_moe,
                                save, select_replication, tune_ensemble_block, tune_ensemble_kl)


def _llama_args(**kw):
    from mlx_lm.models import llama
    d = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96, tie_word_embeddings=True)
    d.update(kw)
    return llama.ModelArgs(**d)


def _mlp(seed=0):
    from mlx_lm.models import llama
    mx.random.seed(seed)
    m = llama.MLP(_llama_args())
    mx.eval(m.parameters())
    return m


def _x(n=512, d=128, seed=1):
    return mx.random.normal((n, d), key=mx.random.key(seed))


def test_fit_affine_matches_numpy_lstsq():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 128)).astype(np.float32)
    q = quantize_rtn(mx.array(w), 2, 64)
    s, b = fit_affine(mx.array(w), q.codes, 64)
    codes = np.array(q.codes).astype(np.float64)
    for r in range(8):
        for gi in range(2):
            qq, ww = codes[r, gi * 64:(gi + 1) * 64], w[r, gi * 64:(gi + 1) * 64]
            A = np.stack([qq, np.ones_like(qq)], 1)
            (s_ref, b_ref), *_ = np.linalg.lstsq(A, ww, rcond=None)
            assert abs(float(s[r, gi]) - s_ref) < 1e-4 and abs(float(b[r, gi]) - b_ref) < 1e-4
    # the LS fit never has a larger reconstruction error than RTN's own min/max parameters
    err_ls = float(((q.codes.astype(mx.float32).reshape(8, 2, 64) * s[..., None] + b[..., None]).reshape(8, 128)
                    - mx.array(w)).square().sum())
    err_rtn = float((q.dequantize() - mx.array(w)).square().sum())
    assert err_ls <= err_rtn * (1 + 1e-6)


def test_init_replicas_shares_codes_and_differs_in_params():
    w = _x(64, 128, 3)
    rw = init_replicas(w, 3, 2, 64)
    assert rw.codes.shape == (64, 128) and rw.codes.dtype == mx.uint8
    assert rw.scales.shape == (3, 64, 2) and rw.biases.shape == (3, 64, 2)
    assert int(rw.codes.max()) <= 3
    W = np.array(rw.dequantize())
    assert not np.allclose(W[0], W[1]) and not np.allclose(W[1], W[2])
    # symmetric perturbations: with odd K the mean replica is replica 0 (up to fp16 rounding)
    np.testing.assert_allclose(W.mean(0), W[0], atol=2e-3 * np.abs(W[0]).max())


def test_k1_mean_equals_plain_quantized_mlp():
    from mlx_lm.models import llama
    mlp = _mlp()
    ens = ensemble_from_mlp(mlp, 1, 3, 64, mixing="mean", refit=False, clip_search=False)
    plain = llama.MLP(_llama_args())
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(plain, name).weight = quantize_rtn(getattr(mlp, name).weight, 3, 64).dequantize()
    x = _x()
    np.testing.assert_allclose(np.array(ens(x)), np.array(plain(x)), rtol=1e-5, atol=1e-6)


def test_kernel_backend_equals_dense():
    mlp = _mlp()
    ens = ensemble_from_mlp(mlp, 3, 2, 64, mixing="softmax")
    ens.mix = mx.array([0.3, -0.2, 0.5])
    x = _x(4)
    dense = np.array(ens(x))
    ens.backend = "kernel"
    np.testing.assert_allclose(np.array(ens(x)), dense, rtol=1e-4, atol=1e-5)


def test_ensemble_is_not_an_affine_collapse():
    """Mixing replicas across the non-linearity differs from one MLP with averaged parameters."""
    mlp = _mlp()
    ens = ensemble_from_mlp(mlp, 2, 2, 64, mixing="mean", perturbations=[(1.3, 0.4), (0.7, -0.4)])
    avg = ensemble_from_mlp(mlp, 1, 2, 64, mixing="mean")
    for n in ("gate_proj", "up_proj", "down_proj"):
        lin, a = getattr(ens, n), getattr(avg, n)
        a.scales, a.biases = lin.scales.mean(0, keepdims=True), lin.biases.mean(0, keepdims=True)
    x = _x()
    diff = float(mx.abs(ens(x) - avg(x)).max())
    assert diff > 1e-3 * float(mx.abs(avg(x)).max())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tuning_lowers_block_mse_and_keeps_codes(k):
    mlp = _mlp()
    x = _x(1024)
    y = mlp(x)
    ens = ensemble_from_mlp(mlp, k, 2, 64, mixing="softmax")
    codes = {n: np.array(getattr(ens, n).codes) for n in ("gate_proj", "up_proj", "down_proj")}
    r = tune_ensemble_block(ens, x, y, steps=100, batch=256, lr=1e-2)
    assert r.mse_after < 0.97 * r.mse_before, (r.mse_before, r.mse_after)
    for n, c in codes.items():
        assert np.array_equal(np.array(getattr(ens, n).codes), c)
    # tuned parameters are stored values: fp16-representable
    s = np.array(ens.gate_proj.scales)
    assert np.array_equal(s, s.astype(np.float16).astype(np.float32))


def test_tune_block_detects_changed_codes(monkeypatch):
    """The frozen-code assertion is live: if an update touched codes, tune_ensemble_block raises."""
    from mlx_holo.replicate import tune as T
    mlp = _mlp()
    x = _x(256)
    ens = ensemble_from_mlp(mlp, 1, 2, 64)
    orig = T.round_params

    def corrupt(module, dtype=mx.float16):
        orig(module, dtype)
        module.gate_proj.codes = 3 - module.gate_proj.codes

    monkeypatch.setattr(T, "round_params", corrupt)
    with pytest.raises(AssertionError, match="codes"):
        tune_ensemble_block(ens, x, mlp(x), steps=2)


def test_bytes_accounting():
    mlp = _mlp()
    for k in (1, 2, 3):
        ens = ensemble_from_mlp(mlp, k, 2, 64, mixing="softmax")
        nb = ensemble_nbytes(ens)
        codes = sum(pack(getattr(ens, n).codes, 2).nbytes for n in ("gate_proj", "up_proj", "down_proj"))
        params = sum(k * 2 * (getattr(ens, n).codes.size // 64) * 2 for n in ("gate_proj", "up_proj", "down_proj"))
        assert nb["codes"] == codes == 3 * 128 * 256 * 2 // 8
        assert nb["scales_biases"] == params
        assert nb["mix"] == 4 * k and nb["total"] == codes + params + 4 * k
        rw = ReplicatedWeight(ens.gate_proj.codes, ens.gate_proj.scales, ens.gate_proj.biases, 2, 64)
        assert rw.nbytes()["codes"] == pack(rw.codes, 2).nbytes


def test_select_replication_budget():
    sens = {"a": 0.5, "b": 0.1, "c": 0.3}
    extra = {"a": 100, "b": 100, "c": 100}
    assert select_replication(sens, extra, 0) == {"a": 1, "b": 1, "c": 1}
    assert select_replication(sens, extra, 100) == {"a": 2, "b": 1, "c": 1}
    assert select_replication(sens, extra, 200) == {"a": 2, "b": 1, "c": 2}
    assert select_replication(sens, extra, 10_000, k_max=3) == {"a": 3, "b": 3, "c": 3}
    ks = select_replication(sens, extra, 350, k_max=3)
    assert sum((v - 1) * 100 for v in ks.values()) <= 350


def test_mlp_output_error_orders_bits():
    mlp = _mlp()
    x = _x()
    e2 = mlp_output_error(mlp, ensemble_from_mlp(mlp, 1, 2, 64), x)
    e4 = mlp_output_error(mlp, ensemble_from_mlp(mlp, 1, 4, 64), x)
    assert 0 < e4 < e2


def _tiny_moe(kind="mixtral"):
    mx.random.seed(0)
    if kind == "mixtral":
        from mlx_lm.models import mixtral as M
        args = M.ModelArgs(model_type="mixtral", vocab_size=64, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2)
    else:
        from mlx_lm.models import qwen2_moe as M
        args = M.ModelArgs(model_type="qwen2_moe", vocab_size=64, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                           rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    model = M.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_replication_keeps_router(kind):
    from mlx_holo.replicate import EnsembleSwitchGLU
    model = _tiny_moe(kind)
    toks = mx.array([[1, 5, 9, 13, 2, 7, 30, 41]])
    ref = model(toks)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    routers = [k for k in before if k.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight",
                                                "shared_expert_gate.weight"))]
    assert routers
    done = replicate_moe(model, 2, 4, 64, mixing="softmax")
    assert len(done) == 2
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for k in routers:
        assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
    out = model(toks)
    assert isinstance(dict(model.named_modules())[done[0]], EnsembleSwitchGLU)
    # 4-bit experts: close to the float model, not equal
    rel = float(mx.abs(out - ref).max() / mx.abs(ref).max())
    assert 0 < rel < 0.2
    # end-to-end KL tuning moves only expert quantization parameters; the router stays bit-identical
    losses = tune_ensemble_kl(model, [ref], toks, steps=3, lr=1e-2)
    assert len(losses) == 3
    tuned = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for k in routers:
        assert np.array_equal(tuned[k], before[k]), k
    for k, v in tuned.items():
        if k.endswith("codes"):
            assert np.array_equal(v, after[k]), k


def test_moe_k1_mean_equals_dequantized_switchglu():
    from mlx_lm.models.switch_layers import SwitchGLU
    mx.random.seed(0)
    sw = SwitchGLU(64, 128, 4)
    mx.eval(sw.parameters())
    x = mx.random.normal((2, 5, 64))
    idx = mx.array(np.random.default_rng(0).integers(0, 4, size=(2, 5, 2)).astype(np.uint32))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.sw = sw

    h = Holder()
    replicate_moe(h, 1, 4, 64, mixing="mean", refit=False, clip_search=False)
    for n in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(sw, n).weight
        getattr(sw, n).weight = quantize_rtn(w.reshape(-1, w.shape[-1]), 4, 64).dequantize().reshape(w.shape)
    np.testing.assert_allclose(np.array(h.sw(x, idx)), np.array(sw(x, idx)), rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    from mlx_lm.models import llama
    mx.random.seed(0)
    args = _llama_args()
    model = llama.Model(args)
    mx.eval(model.parameters())
    config = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 96,
              "tie_word_embeddings": True}
    ks = replicate_mlps(model, {"model.layers.0.mlp": 3, "model.layers.1.mlp": 1}, 2, 64, mixing="softmax")
    assert ks == {"model.layers.0.mlp": 3, "model.layers.1.mlp": 1}
    ens0 = dict(model.named_modules())["model.layers.0.mlp"]
    ens0.mix = mx.array([0.1, 0.7, -0.3])
    toks = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    nb = save(model, config, tmp_path, float_dtype=mx.float32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["ensemble"]["modules"]["model.layers.0.mlp"]["k"] == 3
    loaded = load(tmp_path)
    assert np.array_equal(np.array(loaded(toks)), np.array(model(toks)))
    # bytes written = packed codes once + K fp16 (scales, biases) + fp32 mixing per block
    expect = sum(ensemble_nbytes(m)["total"] for _, m in find_mlps_ens(model))
    assert nb["codes"] + nb["scales_biases"] == expect
    # stock mlx_lm cannot open it (the MLP weights live in ensemble.safetensors)
    from mlx_lm.utils import load_model
    with pytest.raises(ValueError):
        load_model(tmp_path)


def find_mlps_ens(model):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, EnsembleMLP)]


def test_find_mlps_and_replicate_in_place():
    from mlx_lm.models import llama
    mx.random.seed(0)
    model = llama.Model(_llama_args())
    mx.eval(model.parameters())
    assert [p for p, _ in find_mlps(model)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    replicate_mlps(model, 2, 4, 64)
    assert all(isinstance(l.mlp, EnsembleMLP) and l.mlp.k == 2 for l in model.model.layers)
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters()) if "mlp" in k]
    assert trainable and not any(k.endswith("codes") for k in trainable)
