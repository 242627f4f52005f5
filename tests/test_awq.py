"""AWQ: the scale fold leaves the float model unchanged; AWQ beats RTN when activations have outlier channels."""
import mlx.core as mx
import numpy as np
import pytest

from mlx_holo.quant.awq import apply_awq_scale, awq_clip, awq_search
from mlx_holo.quant.rtn import quantize_rtn


def _outlier_problem(seed=0, n=512, n_in=256, outs=(96, 64)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    hot = rng.choice(n_in, 6, replace=False)
    x[:, hot] *= 40.0  # salient input channels, as in LLM activations
    ws = [rng.standard_normal((o, n_in)).astype(np.float32) * 0.05 for o in outs]
    return x, ws


def _out_err(x, w, w_hat):
    d = x.astype(np.float64) @ (np.asarray(w_hat, np.float64) - w.astype(np.float64)).T
    return float(np.sum(d * d))


def _rms_norm(x, g, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def test_fold_into_norm_leaves_float_model_unchanged():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    ws = [rng.standard_normal((48, 64)).astype(np.float32), rng.standard_normal((16, 64)).astype(np.float32)]
    s = mx.array(np.exp(rng.standard_normal(64)).astype(np.float32))  # scales spanning ~e^+-3
    new_g, new_ws = apply_awq_scale(mx.array(gamma), [mx.array(w) for w in ws], s)
    h0, h1 = _rms_norm(x, gamma), _rms_norm(x, np.asarray(new_g))
    for w, nw in zip(ws, new_ws):
        assert np.allclose(h1 @ np.asarray(nw).T, h0 @ w.T, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(new_g), gamma)  # the fold really moved the weights


def test_fold_into_previous_linear_leaves_float_model_unchanged():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    wv = rng.standard_normal((96, 64)).astype(np.float32)   # v_proj [hidden_v, d]
    wo = rng.standard_normal((64, 96)).astype(np.float32)   # o_proj [d, hidden_v]
    s = mx.array(np.exp(rng.standard_normal(96)).astype(np.float32))
    new_v, (new_o,) = apply_awq_scale(mx.array(wv), [mx.array(wo)], s)
    ref = (x @ wv.T) @ wo.T
    got = (x @ np.asarray(new_v).T) @ np.asarray(new_o).T
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError):  # GQA-shaped pair: v_proj rows != o_proj inputs
        apply_awq_scale(mx.array(wv[:32]), [mx.array(wo)], s)


def test_awq_beats_rtn_with_outlier_channels_at_3_bits():
    x, ws = _outlier_problem()
    res = awq_search([mx.array(w) for w in ws], mx.array(x), 3, 64)
    assert res.scales.shape == (x.shape[1],)
    assert res.ratio > 0.0 and res.loss_after < 0.8 * res.loss_before
    # recompute independently of awq_search's own bookkeeping
    s = np.asarray(res.scales)
    rtn = sum(_out_err(x, w, quantize_rtn(mx.array(w), 3, 64, fit="minmax").dequantize()) for w in ws)
    awq = sum(_out_err(x, w, np.asarray(quantize_rtn(mx.array(w * s), 3, 64, fit="minmax").dequantize()) / s)
              for w in ws)  # the search's own grid rule
    assert np.isclose(rtn, res.loss_before, rtol=1e-3) and np.isclose(awq, res.loss_after, rtol=1e-3)
    assert awq < 0.8 * rtn
    # the folded + clipped pipeline: quantize w*s, run on x/s
    _, new_ws = apply_awq_scale(mx.array(np.ones(x.shape[1], np.float32)), [mx.array(w) for w in ws], res.scales)
    xs = x / s
    clipped = sum(_out_err(xs, np.asarray(nw), awq_clip(nw, mx.array(xs), 3, 64).dequantize()) for nw in new_ws)
    assert clipped < awq


def test_awq_search_picks_ratio_zero_without_outliers_and_reports_rtn_loss():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    res = awq_search([mx.array(w)], mx.array(x), 4, 32, grid=10)
    rtn = _out_err(x, w, quantize_rtn(mx.array(w), 4, 32, fit="minmax").dequantize())
    assert np.isclose(res.loss_before, rtn, rtol=1e-3)
    assert res.loss_after <= res.loss_before


def test_awq_clip_no_group_worse_than_rtn_and_format_valid():
    x, (w, _) = _outlier_problem(seed=4)
    qw = awq_clip(mx.array(w), mx.array(x), 3, 64)
    codes = np.asarray(qw.codes)
    assert codes.max() < 8 and qw.scales.shape == (w.shape[0], w.shape[1] // 64)
    # per-group output error (the quantity awq_clip minimises) is never worse than min/max or mx.quantize-style RTN
    def group_err(w_hat):
        d = (np.asarray(w_hat, np.float64) - w).reshape(w.shape[0], -1, 64)
        xg = x.astype(np.float64).reshape(x.shape[0], -1, 64)
        return np.einsum("ngk,ogk->nog", xg, d) ** 2
    e_clip = group_err(qw.dequantize()).mean(0)
    for fit in ("minmax", "mlx"):  # both grids are candidates at k = 0
        e_rtn = group_err(quantize_rtn(mx.array(w), 3, 64, fit=fit).dequantize()).mean(0)
        assert np.all(e_clip <= e_rtn * (1 + 1e-4) + 1e-9)
        assert e_clip.sum() < 0.95 * e_rtn.sum()


def test_awq_search_confirms_its_choice_with_the_final_quantizer():
    """With ``final`` the winner is chosen on the quantizer really used (clip search + least-squares grid), among
    the proxy's best alphas and alpha = 0; its reported losses are that quantizer's, recomputed here."""
    x, ws = _outlier_problem()
    final = lambda w, xi: awq_clip(w, xi, 3, 64, fit="lsq").dequantize()  # noqa: E731
    res = awq_search([mx.array(w) for w in ws], mx.array(x), 3, 64, final=final)
    s = np.asarray(res.scales)
    def err(sc):
        return sum(_out_err(x, w, np.asarray(final(mx.array(w * sc), mx.array(x / sc))) / sc) for w in ws)
    assert np.isclose(res.loss_before, err(np.ones_like(s)), rtol=1e-3)
    assert np.isclose(res.loss_after, err(s), rtol=1e-3)
    assert res.ratio > 0.0 and res.loss_after < 0.9 * res.loss_before  # outlier channels: scaling still wins


def test_awq_search_objective_sees_dequantized_weights_in_the_original_basis():
    """``objective`` replaces the summed layer error: given that same error it picks what the default does; given
    its negative (a loss that prefers damage) it picks another alpha, and the reported losses are its values."""
    x, ws = _outlier_problem(seed=1)
    final = lambda w, xi: quantize_rtn(w, 3, 64, fit="lsq").dequantize()  # noqa: E731
    calls = []

    def layer_err(w_hat):
        calls.append([tuple(a.shape) for a in w_hat])
        return sum(_out_err(x, w, np.asarray(a)) for w, a in zip(ws, w_hat))

    plain = awq_search([mx.array(w) for w in ws], mx.array(x), 3, 64, final=final)
    same = awq_search([mx.array(w) for w in ws], mx.array(x), 3, 64, final=final, objective=layer_err)
    assert calls and all(c == [w.shape for w in ws] for c in calls)
    assert same.ratio == plain.ratio and np.isclose(same.loss_after, plain.loss_after, rtol=1e-3)
    worst = awq_search([mx.array(w) for w in ws], mx.array(x), 3, 64, final=final,
                       objective=lambda w_hat: -layer_err(w_hat))
    assert worst.ratio != plain.ratio and worst.loss_after <= -plain.loss_after


def test_awq_search_per_weight_inputs():
    """Experts: one scale for all, each weight's error on its own rows (xs); the statistics from x."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 64)).astype(np.float32) * np.where(np.arange(64) % 9 == 0, 12.0, 1.0)
    w = [rng.standard_normal((16, 64)).astype(np.float32) for _ in range(2)]
    rows = [x[:100], x[100:]]
    res = awq_search([mx.array(a) for a in w], mx.array(x), 3, 32, xs=[mx.array(r) for r in rows])
    s = np.asarray(res.scales)
    got = sum(_out_err(r, a, np.asarray(quantize_rtn(mx.array(a * s), 3, 32, fit="minmax").dequantize()) / s)
              for a, r in zip(w, rows))
    assert np.isclose(got, res.loss_after, rtol=1e-3)
    with pytest.raises(ValueError, match="inputs for"):
        awq_search([mx.array(w[0])], mx.array(x), 3, 32, xs=[mx.array(x), mx.array(x)])
