"""QEP (quant/qep.py): the corrected target against a least-squares reference, and in the pipeline."""
import mlx.core as mx
import numpy as np
import pytest

from mlx_holo import model as models
from mlx_holo.pipeline import capture
from mlx_holo.quant.gptq import gptq_quantize
from mlx_holo.quant.qep import propagation_stats, qep_correct, qep_matrix
from mlx_holo.recipe import Recipe, RecipeError


def _problem(seed=0, n=4096, d_in=64, d_out=48, noise=0.05):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    x = rng.normal(size=(n, d_in)) @ A  # correlated float inputs
    B = 0.3 * rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    xq = x + x @ B + noise * rng.normal(size=(n, d_in))  # compressed-model inputs: a distortion of x plus noise
    w = rng.normal(size=(d_out, d_in)).astype(np.float32)
    return w, x.astype(np.float32), xq.astype(np.float32)


def _qep_objective(w, q, x, xq):  # mean ||w x - q x_q||^2 per token
    return float(np.mean(np.sum((x @ w.T - xq @ q.T) ** 2, axis=1)))


def test_full_correction_is_the_least_squares_map():
    w, x, xq = _problem()
    w_star = np.array(qep_correct(mx.array(w), mx.array(x), mx.array(xq), alpha=1.0, damp=1e-8))
    ref = np.linalg.lstsq(xq.astype(np.float64), (x @ w.T).astype(np.float64), rcond=None)[0].T  # min ||x w^T - xq W^T||
    np.testing.assert_allclose(w_star, ref, rtol=2e-3, atol=2e-3)
    assert _qep_objective(w, w_star, x, xq) < 0.5 * _qep_objective(w, w, x, xq)


def test_alpha_zero_is_the_identity_and_alpha_interpolates():
    w, x, xq = _problem(1)
    X, Xq = mx.array(x), mx.array(xq)
    assert np.array_equal(np.array(qep_correct(mx.array(w), X, Xq, alpha=0.0)), w)
    full = np.array(qep_correct(mx.array(w), X, Xq, alpha=1.0))
    half = np.array(qep_correct(mx.array(w), X, Xq, alpha=0.5))
    np.testing.assert_allclose(half, (w + full) / 2, rtol=1e-4, atol=1e-5)


def test_dead_inputs_get_no_correction():
    w, x, xq = _problem(2)
    x[:, 5] = 3.0  # the float model drives input 5, the compressed one never does
    xq[:, 5] = 0.0
    w_star = np.array(qep_correct(mx.array(w), mx.array(x), mx.array(xq), alpha=1.0))
    assert np.all(np.isfinite(w_star))
    np.testing.assert_allclose(w_star[:, 5], w[:, 5])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_on_the_corrected_weight_lowers_the_propagated_error(bits):
    """GPTQ of W* on H_q beats GPTQ of W on H_q on QEP's objective ||W x - Q x_q||^2: the point of the method."""
    w, x, xq = _problem(3)
    H, _ = propagation_stats(mx.array(x), mx.array(xq))
    plain = np.array(gptq_quantize(mx.array(w), H, bits, 32).dequantize())
    corrected = np.array(gptq_quantize(qep_correct(mx.array(w), mx.array(x), mx.array(xq), alpha=1.0), H, bits,
                                       32).dequantize())
    assert _qep_objective(w, corrected, x, xq) < 0.8 * _qep_objective(w, plain, x, xq)


@pytest.mark.parametrize("damp,rows", [(1.0, 1024), (1e-8, 1024), (1.0, 40)])
def test_the_in_place_solve_is_the_float64_formula(damp, rows, monkeypatch):
    """M = D (H + damp * mean(diag H) I)^-1 from H and D formed one at a time and solved in place equals the formula
    solved directly in float64 (a well-damped H by Cholesky; a nearly singular one too, or by LU), whether M is
    solved in one block of rows or several."""
    from mlx_holo.quant import qep

    monkeypatch.setattr(qep, "SOLVE_ROWS", rows)
    w, x, xq = _problem(4, n=256, d_in=96)
    xq[:, 7] = 0.0  # a dead input
    xq[:, 11] = xq[:, 12]  # two equal inputs: H singular before damping
    H, D = (np.array(a, np.float64) for a in propagation_stats(mx.array(x), mx.array(xq)))
    diag = np.diag(H).copy()
    Hd = H + damp * diag.mean() * np.eye(96)
    Hd[7, 7] += 1.0
    ref = np.linalg.solve(Hd, D.T).T
    ref[:, 7] = 0.0
    M = np.array(qep_matrix(mx.array(x), mx.array(xq), damp))
    assert M.dtype == np.float32 and np.all(M[:, 7] == 0)
    np.testing.assert_allclose(M, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_recipe_checks_qep():
    with pytest.raises(RecipeError, match="qep_alpha"):
        Recipe(method="gptq", qep_alpha=1.5).validate()
    with pytest.raises(RecipeError, match="qep_damp"):
        Recipe(method="gptq", qep_damp=0.0).validate()
    assert Recipe().qep_alpha == 0.5 and Recipe().qep_damp == 1.0  # on by default for gptq / mixed
    Recipe(method="awq").validate()  # other methods ignore it


def test_pipeline_feeds_qep_the_float_models_inputs(tiny_model_dir, text_file, monkeypatch):
    """Block 1's float inputs handed to QEP are the unmodified model's; the compressed ones differ from them."""
    from test_pipeline import make_calib, record_qep, run_pipeline

    calib = make_calib(tiny_model_dir, text_file, 256, 128)
    seen = record_qep(monkeypatch)
    res = run_pipeline(tiny_model_dir, calib, Recipe(method="gptq", bits=2))
    assert len(seen) == 14  # every linear of the 2 blocks (the tied head is not corrected)
    model = models.open_model(str(tiny_model_dir), lazy=True)[0]
    x, mask = capture.block_inputs(model, calib)
    y0, _ = capture.capture_linear_inputs(models.blocks(model)[0], x, mask)
    _, X1 = capture.capture_linear_inputs(models.blocks(model)[1], y0, mask)
    _, x_fp, x_q = seen[7]  # block 1's first linear (q_proj, in the pipeline's order)
    assert mx.allclose(x_fp, X1["self_attn.q_proj"], atol=1e-5).item()
    assert not mx.allclose(x_q, x_fp, atol=1e-3).item()
    plain = run_pipeline(tiny_model_dir, calib, Recipe(method="gptq", bits=2, qep_alpha=0.0))
    a = res.quantized["model.layers.1.mlp.down_proj"].dequantize()
    b = plain.quantized["model.layers.1.mlp.down_proj"].dequantize()
    assert not mx.array_equal(a, b).item()


def test_untied_head_aims_at_the_qep_target(tmp_path, tiny_model_dir, text_file, monkeypatch):
    """An untied lm_head is GPTQ'd toward QEP's corrected weight from the final-norm inputs of both models; a tied
    table is not (the input embedding reads it too)."""
    from conftest import make_tiny_model
    from test_pipeline import make_calib, run_pipeline

    from mlx_holo.pipeline import head

    calls, real = [], head.qep_matrix

    def spy(x_fp, x_q, damp):
        calls.append(tuple(x_fp.shape[1:]) + tuple(x_q.shape[1:]))
        return real(x_fp, x_q, damp)

    monkeypatch.setattr(head, "qep_matrix", spy)
    d = make_tiny_model(tmp_path / "untied", {"tie_word_embeddings": False})
    calib = make_calib(d, text_file, 256, 128)
    res = run_pipeline(d, calib, Recipe(method="gptq", bits=3))
    assert calls == [(128, 128)]  # once, on the head's D-wide inputs
    corrected = res.quantized["lm_head"].dequantize()
    plain = run_pipeline(d, calib, Recipe(method="gptq", bits=3, qep_alpha=0.0)).quantized["lm_head"].dequantize()
    assert not mx.array_equal(corrected, plain).item()
    calls.clear()
    run_pipeline(tiny_model_dir, make_calib(tiny_model_dir, text_file, 256, 128), Recipe(method="gptq", bits=3))
    assert calls == []  # tied: no correction


def test_awq_scales_then_gptq_feed_qep_the_folded_float_inputs(tiny_model_dir, text_file, monkeypatch):
    """AWQ+GPTQ: QEP's float inputs are captured after the scale fold, so w_folded x_fp reproduces the float model's
    output of the layer (inputs captured before the fold would be off by the per-channel scales)."""
    from test_pipeline import make_calib, record_qep, run_pipeline

    from mlx_holo.quant import awq_fold

    calib = make_calib(tiny_model_dir, text_file, 256, 128)
    seen = record_qep(monkeypatch)
    # alpha from AWQ's min/max proxy, which scales here (the default score may keep s = 1 on a random model)
    monkeypatch.setattr(awq_fold, "score", lambda recipe, g: None)
    res = run_pipeline(tiny_model_dir, calib, Recipe(method="gptq", bits=3, awq_scales=True))
    model = models.open_model(str(tiny_model_dir), lazy=True)[0]
    x, mask = capture.block_inputs(model, calib)
    _, X0 = capture.capture_linear_inputs(models.blocks(model)[0], x, mask)
    w0 = models.blocks(model)[0].mlp.gate_proj.weight.astype(mx.float32)
    want = X0["mlp.gate_proj"].astype(mx.float32) @ w0.T
    w, x_fp, _ = seen[4]  # block 0: q, k, v, o, then gate_proj
    assert tuple(w.shape) == tuple(w0.shape) and not mx.allclose(w, w0, atol=1e-4).item()  # scales were folded
    assert mx.allclose(x_fp @ w.T, want, atol=1e-3, rtol=1e-3).item()
    assert "model.layers.1.mlp.down_proj" in res.quantized
    with pytest.raises(RecipeError, match="awq_scales"):
        Recipe(method="rtn", awq_scales=True).validate()
