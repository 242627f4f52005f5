"""Other families than llama: attention biases (qwen2) and mixtures of experts (mixtral, qwen2-moe) through the
compress pipeline, saved folders opened by stock mlx_lm.load."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import ARCH_CONFIGS, make_tiny_arch, make_tiny_model

from mlx_holo import data, model as models
from mlx_holo.pipeline import capture, run as pipeline_run
from mlx_holo.compression import compress
from mlx_holo.allocate.bits import expert_cost
from mlx_holo.model.experts import expert_modules, router_paths, routed_rows, split_by_expert
from mlx_holo.model.structure import find_module
from mlx_holo.recipe import Recipe, RecipeError


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return {mt: make_tiny_arch(root / mt, mt) for mt in ARCH_CONFIGS}


def _compress(src, out, text_file, **kw):
    r = Recipe(**{"calib_tokens": 512, "calib_seq_len": 128, "calib_corpus": str(text_file), **kw})
    return compress(str(src), r, str(out), eval_tokens=256, eval_seq_len=128, eval_corpus=str(text_file), gates=[])


def _logits(model, tokens):
    return model(tokens).astype(mx.float32)


def _kl(p_logits, q_logits) -> float:
    lp, lq = (a - mx.logsumexp(a, axis=-1, keepdims=True) for a in (p_logits, q_logits))
    return float((mx.exp(lp) * (lp - lq)).sum(-1).mean().item())


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_qwen2_attention_biases_survive(arch_dirs, text_file, tmp_path, method):
    from mlx_lm import load

    src = arch_dirs["qwen2"]
    _compress(src, tmp_path / "q", text_file, method=method, bits=8)
    saved = mx.load(str(tmp_path / "q" / "model.safetensors"))
    orig = mx.load(str(src / "model.safetensors"))
    biases = [k for k in orig if k.endswith(".bias")]
    assert len(biases) == 6  # q/k/v of two blocks
    for k in biases:  # AWQ folds no scale into q/k/v's outputs: the biases are kept as they were
        np.testing.assert_allclose(np.array(saved[k].astype(mx.float32)), np.array(orig[k]), atol=1e-3)
    q, _ = load(str(tmp_path / "q"))
    base, _ = load(str(src))
    tokens = mx.array([[5, 17, 99, 3, 250, 41, 7, 64]])
    # 8 bits: the quantized model is the float one up to rounding; without its biases it would not be
    assert _kl(_logits(base, tokens), _logits(q, tokens)) < 1e-3
    for k in biases:
        base.load_weights([(k, mx.zeros_like(orig[k]))], strict=False)
    assert _kl(_logits(base, tokens), _logits(q, tokens)) > 1e-2


def test_routed_rows_and_split():
    inp = mx.arange(2 * 3 * 4, dtype=mx.float32).reshape(2, 3, 1, 1, 4)  # unsorted: [B, L, 1, 1, in]
    idx = mx.array([[[0, 2], [1, 2], [2, 0]]] * 2)  # [B, L, k]
    x, e = routed_rows(inp, idx)
    assert x.shape == (12, 4) and e.shape == (12,)
    np.testing.assert_array_equal(np.array(x[1]), np.array(inp[0, 0, 0, 0]))  # token 0's second expert
    parts = split_by_expert(x, e, 4)
    assert [None if p is None else p.shape[0] for p in parts] == [4, 2, 6, None]
    np.testing.assert_array_equal(np.array(parts[1]), np.array(inp[:, 1, 0, 0]))


@pytest.mark.parametrize("mt", ["mixtral", "qwen2_moe", "granitemoe", "deepseek_v2"])
def test_moe_structure(arch_dirs, mt):
    model = models.open_model(str(arch_dirs[mt]))[0]
    block = models.blocks(model)[-1]
    ex = [p for p, _ in expert_modules(block)]
    assert len(ex) == 3 and all(".switch_mlp." in p for p in ex)
    routers = router_paths(block)
    want = {"mixtral": {"block_sparse_moe.gate"}, "qwen2_moe": {"mlp.gate", "mlp.shared_expert_gate"},
            "granitemoe": {"block_sparse_moe.router.layer"},
            "deepseek_v2": set()}[mt]  # DeepSeek's MoEGate is no nn.Linear: float anyway
    assert routers == want
    lin = [p for p, _ in models.linear_modules(block)]
    assert not routers & set(lin)
    if mt == "qwen2_moe":  # the shared expert is an ordinary MLP: quantized
        assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj"} <= set(lin)


@pytest.mark.parametrize("mt", ["mixtral", "qwen2_moe", "granitemoe"])
def test_moe_gptq_saves_quantized_experts_float_router(arch_dirs, text_file, tmp_path, mt):
    from mlx_lm import load

    src = arch_dirs[mt]
    ev_g = _compress(src, tmp_path / "gptq", text_file, method="gptq", bits=3)
    q, _ = load(str(tmp_path / "gptq"))
    kinds = {p: type(m).__name__ for p, m in q.model.layers[0].named_modules()}
    sw = [p for p, k in kinds.items() if k == "QuantizedSwitchLinear"]
    assert len(sw) == 3
    assert all(kinds[r] == "Linear" for r in router_paths(models.blocks(models.open_model(str(src))[0])[0]))
    m = dict(q.model.layers[0].named_modules())[sw[0]]
    assert m.bits == 3 and m.weight.shape[0] == 4  # [E, out, in * 3 / 32]
    # every quantized byte counted: the experts are most of the weights, so 3.5 bits/weight overall
    assert ev_g["bits_per_weight"] == pytest.approx(3.5, abs=0.01)
    # stock mlx_lm (gather_qmm on the packed experts) computes what our dequantized copy computes
    ours = models.open_model(str(tmp_path / "gptq"))[0]
    tokens = mx.array([[5, 17, 99, 3, 250, 41, 7, 64, 12, 200]])
    np.testing.assert_allclose(np.array(_logits(q, tokens)), np.array(_logits(ours, tokens)), atol=2e-2)
    # GPTQ on each expert's routed tokens beats (clip-searched) rounding on that calibration error
    err = {e["name"]: e["error"] for e in ev_g["layers"] if ".switch_mlp." in e["name"]}
    model, tok = models.open_model(str(src))[:2]
    calib = data.calibration_windows(tok, data.load_corpus(str(text_file)), 512, 128, seed=0)
    rtn = pipeline_run.run(model, calib, Recipe(method="rtn", bits=3, clip_search=True))
    err_r = {r.name: r.error for r in rtn.layers if ".switch_mlp." in r.name}
    assert len(err) == 6 and None not in err.values() and None not in err_r.values()
    assert all(err[k] < err_r[k] for k in err), (err, err_r)


def test_awq_on_moe_scales_every_reader_of_the_mlp_norm(arch_dirs, text_file, tmp_path):
    """A MoE block's MLP norm scales the router(s) (float, folded exactly), the experts' gate/up and a shared
    expert's gate/up together; each expert's up -> down pair is its own group. A shared expert's down_proj whose
    hidden width equals the model width (here 128 = 128) is not taken for a reader."""
    from mlx_holo.quant import awq_fold

    model = models.open_model(str(arch_dirs["qwen2_moe"]))[0]
    block = models.blocks(model)[0]
    got = [(k, ps) for _, k, ps in awq_fold.groups(block)]
    assert got[0] == ("norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    assert ("norm", ["mlp.gate", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate",
                     "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj"]) in got
    assert ("linear", ["mlp.shared_expert.down_proj"]) in got and ("experts", ["mlp.switch_mlp.down_proj"]) in got
    ev = _compress(arch_dirs["mixtral"], tmp_path / "awq", text_file, method="awq", bits=4)
    ev_rtn = _compress(arch_dirs["mixtral"], tmp_path / "rtn", text_file, method="rtn", bits=4)
    assert ev["metrics"]["kl"] < ev_rtn["metrics"]["kl"]
    assert ev["awq_unscaled_groups"] == 0 and 0 <= ev["awq_alpha_zero_groups"] <= 6  # 2 blocks x 3 groups


def test_awq_moe_fold_scales_router_and_experts(arch_dirs):
    """On a mixtral block with salient MLP-input channels the fold really moves the router's and every expert's
    columns and each expert's up rows (per-expert scales), and the block computes what it did (routing included)."""
    from mlx_holo.quant import awq_fold

    block, x, mask, y0, X = _block0(arch_dirs["mixtral"], salient=True)
    moe = block.block_sparse_moe
    router0, gate0 = np.array(moe.gate.weight), np.array(moe.switch_mlp.gate_proj.weight)
    up0, down0 = np.array(moe.switch_mlp.up_proj.weight), np.array(moe.switch_mlp.down_proj.weight)
    alphas = awq_fold.apply(block, X, Recipe(method="awq", bits=3), x, mask)
    assert len(alphas) == 3 and None not in alphas and alphas[1] > 0 and alphas[2] > 0
    s = router0[0] / np.array(moe.gate.weight)[0]  # 1 / the norm's scale, read off the router's columns
    assert np.ptp(s) > 0.1
    np.testing.assert_allclose(np.array(moe.switch_mlp.gate_proj.weight), gate0 / s, rtol=1e-4)
    s_up = up0[:, :, 0] / np.array(moe.switch_mlp.up_proj.weight)[:, :, 0] / s[0]  # [E, inter], one per expert
    assert np.ptp(s_up, axis=1).min() > 0 and np.abs(s_up[0] - s_up[1]).max() > 1e-3
    np.testing.assert_allclose(np.array(moe.switch_mlp.down_proj.weight), down0 * s_up[:, None, :], rtol=1e-4)
    assert _rel(block(x, mask), y0) < 1e-4


def test_awq_module_objective_scores_the_attention_and_mlp_outputs(arch_dirs):
    """--awq-objective module: the loss of a norm's group is the output of the attention / MLP holding its readers
    (0 for the float weights, restored after each call); a MoE MLP keeps the layer loss; the fold keeps the float
    function."""
    from mlx_holo.quant import awq_fold

    block, x, mask, y0, X = _block0(arch_dirs["qwen2"], salient=True)
    objs = {}
    for prev, kind, paths in awq_fold.groups(block):
        if kind != "norm":
            continue
        lins = [find_module(block, p) for p in paths]
        obj = awq_fold.module_objective(block, paths, lins, X, x, mask)
        objs[paths[0].split(".")[0]] = obj is not None
        if obj is None:
            continue
        ws = [m.weight for m in lins]
        assert obj(ws) < 1e-6 * float(mx.sum(y0.astype(mx.float32) ** 2).item())
        assert obj([w * 1.01 for w in ws]) > 0 and all(m.weight is w for m, w in zip(lins, ws))
    assert objs == {"self_attn": True, "mlp": True}  # qwen2 has GQA: no v -> o group
    alphas = awq_fold.apply(block, X, Recipe(method="awq", bits=3, awq_objective="module"), x, mask)
    assert len(alphas) == 3 and None not in alphas and alphas[1] > 0
    assert _rel(block(x, mask), y0) < 1e-4
    moe, _, _, _, Xm = _block0(arch_dirs["mixtral"])
    (_, _, readers) = awq_fold.groups(moe)[1]
    assert awq_fold.module_objective(moe, readers, [find_module(moe, p) for p in readers],
                                      Xm, x, mask) is None
    with pytest.raises(RecipeError, match="awq_objective"):
        Recipe(method="awq", awq_objective="block").validate()
    with pytest.raises(RecipeError, match="awq_objective module goes with"):
        Recipe(method="gptq", awq_objective="module").validate()
    Recipe(method="gptq", awq_scales=True, awq_objective="module").validate()


@pytest.mark.parametrize("sensitivity", ["hessian", "fisher", "kl"])
def test_mixed_allocates_moe_experts_within_budget(arch_dirs, text_file, tmp_path, sensitivity):
    ev = _compress(arch_dirs["qwen2_moe"], tmp_path / "m", text_file, method="mixed", bits=2, bits_per_weight=4.0,
                   sensitivity=sensitivity, kl_tokens=128)
    alloc = ev["allocation"]
    assert alloc["allocated_bytes"] <= alloc["budget_bytes"]
    assert ev["bits_per_weight"] <= 4.0 + 1e-6
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    sw = {e["name"]: e["bits"] for e in ev["layers"] if ".switch_mlp." in e["name"]}
    assert len(sw) == 6
    for name, b in sw.items():  # what the allocation chose is what is written
        assert (cfg[name]["bits"] if name in cfg else cfg["bits"]) == b


def test_expert_cost_weights_experts_by_their_tokens():
    w = mx.random.normal((3, 4, 8), key=mx.random.key(0))
    x = mx.random.normal((10, 8), key=mx.random.key(1))
    idx = mx.array([0] * 6 + [1] * 4)  # expert 2 never routed

    def err(we, H):
        return {3: float((we @ H * we).sum().item()), 4: 1.0}

    out = expert_cost(w, (x, idx), 5, err)
    h0, h1 = (x[:6].T @ x[:6]) / 6, (x[6:].T @ x[6:]) / 4
    want = 6 / 5 * err(w[0], h0)[3] + 4 / 5 * err(w[1], h1)[3]
    assert out[3] == pytest.approx(want, rel=1e-5) and out[4] == pytest.approx(2.0)


def test_bench_counts_only_routed_experts(arch_dirs):
    from mlx.utils import tree_flatten

    from mlx_holo.bench import bytes_per_token

    model = models.open_model(str(arch_dirs["mixtral"]), dtype=mx.float16)[0]
    experts = sum(m.weight.nbytes for b in models.blocks(model) for _, m in expert_modules(b))
    table = model.model.embed_tokens.weight.nbytes
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    # 2 of 4 experts a token: half the expert bytes are not read; of the (untied) table one row
    assert bytes_per_token(model) == total - experts // 2 - (table - table // 320)


def _block0(folder, salient=False, index=0):
    model, tok = models.open_model(str(folder))[:2]
    if salient:  # a few MLP-input channels 8x larger, as in trained LLMs
        ln = models.blocks(model)[index].post_attention_layernorm
        ln.weight = ln.weight * mx.where(mx.arange(ln.weight.shape[0]) % 29 == 3, 8.0, 1.0)
    tokens = mx.array(np.random.default_rng(0).integers(0, 320, (2, 64)))
    x, mask = capture.block_inputs(model, tokens)
    for b in models.blocks(model)[:index]:
        x = b(x, mask)
    block = models.blocks(model)[index]
    y0, X = capture.capture_linear_inputs(block, x, mask)
    return block, x, mask, y0, X


def _rel(a, b):
    return float(mx.linalg.norm((a - b).reshape(-1)).item() / mx.linalg.norm(b.reshape(-1)).item())


@pytest.mark.parametrize("mt", ["qwen2", "gemma", "gemma2", "starcoder2", "phi3", "qwen2_moe", "olmo2",
                                "deepseek_v2", "mixtral", "granitemoe"])
def test_awq_folds_keep_the_float_function(arch_dirs, mt):
    """Every group folds (Gemma's 1 + w norm, a LayerNorm's bias, Gemma-2's pre-feedforward norm, phi3's fused
    projections) and the float block computes what it did; OLMo-2's post_attention_layernorm (on the attention's
    output, not the MLP's input) is tried by name and undone."""
    from mlx_holo.quant import awq_fold

    block, x, mask, y0, X = _block0(arch_dirs[mt])
    alphas = awq_fold.apply(block, X, Recipe(method="awq", bits=3), x, mask)
    if mt == "olmo2":
        assert alphas[0] is None and alphas[1] is not None and len(alphas) == 2  # norm -> gate/up undone; up -> down
    else:  # GQA (or DeepSeek's MLA) everywhere here: no v -> o
        assert None not in alphas and len(alphas) == {"qwen2_moe": 4, "starcoder2": 2, "phi3": 2}.get(mt, 3)
    assert _rel(block(x, mask), y0) < 1e-4
    if mt == "gemma2":
        assert ["mlp.gate_proj", "mlp.up_proj"] in [p for _, _, p in awq_fold.groups(block)]


def test_awq_folds_deepseek_moe_block_with_its_custom_router(arch_dirs):
    """DeepSeek-V2's MoE block (block 1): the router is a MoEGate module (no nn.Linear) with a [E, D] weight; it is
    folded with the experts and the shared experts, and routing is unchanged."""
    from mlx_holo.quant import awq_fold

    block, x, mask, y0, X = _block0(arch_dirs["deepseek_v2"], salient=True, index=1)
    if not np.abs(np.array(block.mlp.gate.weight)).max():  # mlx-lm creates the MoEGate weight as zeros
        block.mlp.gate.weight = 0.1 * mx.random.normal(block.mlp.gate.weight.shape, key=mx.random.key(0))
        y0, X = capture.capture_linear_inputs(block, x, mask)
    got = [(k, ps) for _, k, ps in awq_fold.groups(block)]
    assert ("norm", ["mlp.gate", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                     "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj"]) in got
    w0 = np.array(block.mlp.gate.weight)
    alphas = awq_fold.apply(block, X, Recipe(method="awq", bits=3), x, mask)
    assert len(alphas) == 4 and None not in alphas
    assert not np.allclose(np.array(block.mlp.gate.weight), w0)
    assert _rel(block(x, mask), y0) < 1e-4


def test_awq_undoes_a_fold_that_changes_the_block(tmp_path, monkeypatch):
    """A norm that does not feed the linears it is paired with (here: attention's norm with the MLP) must not keep
    the fold: the block's output would change."""
    from mlx_holo.quant import awq_fold

    folder = make_tiny_model(tmp_path / "m")
    model = models.open_model(str(folder))[0]
    model.update(__import__("conftest").random_norms_and_biases(model))
    block = models.blocks(model)[0]
    tokens = mx.array(np.random.default_rng(0).integers(0, 320, (2, 64)))
    x, mask = capture.block_inputs(model, tokens)
    y0, X = capture.capture_linear_inputs(block, x, mask)
    wrong = [(block.input_layernorm, "norm", ["mlp.gate_proj", "mlp.up_proj"])]
    monkeypatch.setattr(awq_fold, "groups", lambda b: wrong)
    w_before = np.array(block.mlp.up_proj.weight)
    assert awq_fold.apply(block, X, Recipe(method="awq", bits=3), x, mask) == [None]
    assert _rel(block(x, mask), y0) < 1e-6
    np.testing.assert_array_equal(np.array(block.mlp.up_proj.weight), w_before)


def test_fold_norm_rules():
    from mlx_lm.models.gemma import RMSNorm as GemmaRMSNorm

    from mlx_holo.quant.awq_fold import fold_norm

    probe = mx.random.normal((8, 16), key=mx.random.key(0))
    s = mx.random.uniform(0.5, 2.0, (16,), key=mx.random.key(1))
    for norm in (nn.RMSNorm(16), nn.LayerNorm(16), GemmaRMSNorm(16)):
        norm.update({k: v + 0.3 * mx.random.normal(v.shape, key=mx.random.key(2)) for k, v in norm.parameters().items()})
        want = norm(probe) / s
        norm.update(fold_norm(norm, s, probe))
        np.testing.assert_allclose(np.array(norm(probe)), np.array(want), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no weight"):
        fold_norm(nn.LayerNorm(16, affine=False), s, probe)


def test_moe_peak_memory_does_not_grow_with_depth(tmp_path, text_file):
    """The per-expert path holds one block's routed rows and experts at a time, like the dense path."""
    peaks = {}
    for layers in (2, 6):
        d = make_tiny_arch(tmp_path / f"m{layers}", "mixtral", config={"num_hidden_layers": layers, "hidden_size": 256,
                                                                        "intermediate_size": 512, "head_dim": 64})
        model, tok = models.open_model(str(d), lazy=True)[:2]
        calib = data.calibration_windows(tok, data.load_corpus(str(text_file)), 512, 128, seed=0)
        mx.clear_cache()
        peaks[layers] = pipeline_run.run(model, calib, Recipe(method="gptq", bits=4)).peak_memory_bytes
    block_bytes = 4 * (2 * 256 * 256 + 2 * 256 * 128 + 4 * 3 * 256 * 512)
    assert peaks[6] - peaks[2] < 2 * block_bytes  # 4 more blocks would add 4 x block_bytes if all were held


def test_e2e_tunes_moe_expert_scales(arch_dirs, text_file, tmp_path):
    """E2E (codes frozen) trains the experts' scales too; they are written back as [E, out, G] and load."""
    from mlx_lm import load

    kw = dict(method="gptq", bits=3, calib_tokens=2048)
    plain = _compress(arch_dirs["mixtral"], tmp_path / "plain", text_file, **kw)
    ev = _compress(arch_dirs["mixtral"], tmp_path / "e2e", text_file, e2e_steps=30, e2e_lr=1e-3, **kw)
    rep = ev["e2e_tune"]
    assert rep["expert_layers"] == 6 and rep["kept"] and rep["heldout_kl_after"] < rep["heldout_kl_before"]
    assert ev["metrics"]["kl"] < plain["metrics"]["kl"]
    key = "model.layers.0.block_sparse_moe.switch_mlp.down_proj"
    a = mx.load(str(tmp_path / "plain" / "model.safetensors"))
    b = mx.load(str(tmp_path / "e2e" / "model.safetensors"))
    np.testing.assert_array_equal(np.array(a[f"{key}.weight"]), np.array(b[f"{key}.weight"]))  # codes frozen
    assert b[f"{key}.scales"].shape == a[f"{key}.scales"].shape == (4, 128, 4)
    assert not np.array_equal(np.array(a[f"{key}.scales"]), np.array(b[f"{key}.scales"]))
    load(str(tmp_path / "e2e"))


def test_group_size_falls_back_per_layer(arch_dirs, text_file, tmp_path):
    """Asked for 128-groups, a 192-wide layer takes the largest MLX group size dividing its width (64); a width no
    group divides stays float (as mlx_lm.convert leaves it); both recorded, and stock mlx_lm loads the folder."""
    from mlx_lm import load

    from mlx_holo.quant.formats import fit_group

    assert [fit_group(w, 128) for w in (576, 1536, 96, 100)] == [64, 128, 32, None]
    assert fit_group(576, 64) == 64 and fit_group(576, -1) == -1 and fit_group(100, -1) is None
    src = make_tiny_arch(tmp_path / "m", "qwen2", config={"hidden_size": 192, "intermediate_size": 256,
                                                          "head_dim": 48})
    for method in ("gptq", "mixed", "awq"):
        kw = {"bits_per_weight": 4.0, "bits": 3} if method == "mixed" else {"bits": 4}
        ev = _compress(src, tmp_path / method, text_file, method=method, group_size=128, **kw)
        fb = ev["group_fallback"]
        assert fb["model.layers.0.self_attn.q_proj"] == 64 and "model.layers.0.mlp.down_proj" not in fb
        assert fb["model.embed_tokens"] == 64 and fb["lm_head"] == 64  # outside the blocks, recorded too
        cfg = json.loads((tmp_path / method / "config.json").read_text())["quantization"]
        assert cfg["model.layers.0.self_attn.q_proj"]["group_size"] == 64
        q, _ = load(str(tmp_path / method))
        assert q.model.layers[0].self_attn.q_proj.group_size == 64
        assert q.model.layers[0].mlp.down_proj.group_size == 128


def test_moe_experts_pruned_nm_and_checked(arch_dirs, text_file, tmp_path):
    """SparseGPT 2:4 reaches the experts (each on its routed tokens); the saved experts hold the pattern and the
    evidence's read-back check covers them."""
    ev = _compress(arch_dirs["mixtral"], tmp_path / "p", text_file, method="sparsegpt", nm="2:4", bits=4)
    sp = ev["sparsity"]
    assert sp["layers_checked"] == 2 * (4 + 3)  # attention + the three expert layers, two blocks
    assert sp["claims_hold"] and sp["nm_pattern_holds"]
    w = mx.load(str(tmp_path / "p" / "model.safetensors"))
    key = "model.layers.1.block_sparse_moe.switch_mlp.up_proj"
    deq = mx.dequantize(w[f"{key}.weight"], w[f"{key}.scales"], w[f"{key}.biases"], group_size=64, bits=4)
    assert deq.shape == (4, 256, 128)
    groups = (deq.reshape(-1, 4) == 0).sum(axis=-1)
    assert bool((groups >= 2).all())


def test_pipeline_recompresses_a_quantized_model(arch_dirs, text_file, tmp_path):
    """A quantized folder opened as it is stored (what a GPU backend does: no dequantization on load) is compressed
    again on its dequantized weights: every linear and expert layer gets new codes, nothing packed is passed on as
    a 'float'."""
    _compress(arch_dirs["mixtral"], tmp_path / "q8", text_file, method="rtn", bits=8)
    model, tok = models.open_model(str(tmp_path / "q8"), dequantize=False, lazy=True)[:2]
    assert any(type(m).__name__ == "QuantizedSwitchLinear" for _, m in model.named_modules())
    calib = data.calibration_windows(tok, data.load_corpus(str(text_file)), 512, 128, seed=0)
    res = pipeline_run.run(model, calib, Recipe(method="gptq", bits=4))
    assert sum(".layers." in k for k in res.quantized) == 2 * (4 + 3)
    assert all(v.dtype != mx.uint32 for v in res.floats.values())
    assert all(q.bits == 4 for q in res.quantized.values())
