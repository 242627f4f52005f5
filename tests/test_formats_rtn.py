import mlx.core as mx
import numpy as np
import pytest

from mlx_holo.quant.formats import AFFINE_BITS, GROUP_SIZES, FormatError, dequantize, pack, unpack
from mlx_holo.quant.rtn import quantize_rtn


def np_rtn(w: np.ndarray, bits: int, g: int, fit: str = "mlx"):
    """Independent numpy reference: min/max affine RTN with fp16-rounded scale and bias."""
    out, n = w.shape
    wg = w.reshape(out, n // g, g).astype(np.float32)
    lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
    if fit == "minmax":  # bias = min, scale = range / (2**bits - 1): the grid spans [min, max]
        scale = np.maximum((hi - lo) / (2**bits - 1), 1e-7).astype(np.float16).astype(np.float32)
        bias = lo.astype(np.float16).astype(np.float32)
        q = np.clip(np.round((wg - bias) / scale), 0, 2**bits - 1)
        return q.reshape(out, n), scale[..., 0], bias[..., 0]
    lo_edge = np.abs(lo) > np.abs(hi)  # MLX's choice: the larger edge is exact and 0 lies on the grid
    scale = np.maximum((hi - lo) / (2**bits - 1), 1e-7)
    scale = np.where(lo_edge, scale, -scale)
    edge = np.where(lo_edge, lo, hi)
    q0 = np.round(edge / scale)
    scale = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scale)
    bias = np.where(q0 == 0, 0.0, edge)
    scale = scale.astype(np.float16).astype(np.float32)
    bias = bias.astype(np.float16).astype(np.float32)
    q = np.clip(np.round((wg - bias) / scale), 0, 2**bits - 1)
    return q.reshape(out, n), scale[..., 0], bias[..., 0]


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_pack_matches_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(16, 128)).astype(np.uint8)
    packed = pack(mx.array(codes), bits)
    # mx.dequantize with unit scale and zero bias reads the codes back exactly when our layout is MLX's.
    ones = mx.ones((16, 2), dtype=mx.float32)
    back = mx.dequantize(packed, ones, mx.zeros_like(ones), group_size=64, bits=bits)
    np.testing.assert_array_equal(np.array(back), codes.astype(np.float32))
    np.testing.assert_array_equal(np.array(unpack(packed, bits, 128)), codes)


@pytest.mark.parametrize("fit", ["mlx", "minmax"])
@pytest.mark.parametrize("bits", AFFINE_BITS)
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_rtn_error_bounds_vs_numpy(bits, g, fit):
    rng = np.random.default_rng(100 * bits + g)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    qw = quantize_rtn(mx.array(w), bits, g, fit=fit)
    q_ref, s_ref, b_ref = np_rtn(w, bits, g, fit)
    codes = np.array(qw.codes).astype(np.float32)
    # same codes as the reference except where fp32 rounding of (w - b) / s lands exactly on .5
    assert (codes == q_ref).mean() > 0.999
    np.testing.assert_allclose(np.array(qw.scales), s_ref, rtol=0, atol=0)
    w_hat = np.array(qw.dequantize())
    step = np.abs(np.repeat(s_ref, g, axis=1))
    # weights inside the grid's span lie within half a step of their reconstruction (plus fp16 rounding of the
    # bias); MLX's zero-exact grid may leave the far edge up to one step outside the span: never more than a step.
    slack = np.abs(np.repeat(b_ref, g, axis=1)) * 2**-10 + 1e-6
    b, s = np.repeat(b_ref, g, axis=1), np.repeat(s_ref, g, axis=1)
    lo_span, hi_span = np.minimum(b, b + (2**bits - 1) * s), np.maximum(b, b + (2**bits - 1) * s)
    inside = (w >= lo_span) & (w <= hi_span)
    err = np.abs(w_hat - w)
    assert np.all(err[inside] <= (step / 2 + slack)[inside])
    assert np.all(err <= step + slack)
    # and the error shrinks with bits: relative RMS error below the uniform-noise bound of the range
    rel = np.sqrt(((w_hat - w) ** 2).mean()) / w.std()
    assert rel < 2.0 ** (-bits) * 4
    if fit == "minmax":  # nothing falls off a min/max grid
        assert np.all(err <= step / 2 + slack + 1e-3 * step)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_lsq_fit_never_worse_per_group(bits):
    """fit='lsq' refines the better of the mlx/minmax grids: per group (weighted) error <= both, and lower overall."""
    rng = np.random.default_rng(bits)
    w = mx.array((rng.standard_normal((64, 512)) * np.exp(rng.standard_normal((64, 1)))).astype(np.float32))
    imp = mx.array(np.exp(rng.standard_normal(512)).astype(np.float32))

    def group_err(fit):
        d = (quantize_rtn(w, bits, 64, fit=fit, importance=imp).dequantize() - w) ** 2 * imp[None, :]
        return np.array(d.reshape(64, 8, 64).sum(-1))

    lsq, ref = group_err("lsq"), np.minimum(group_err("mlx"), group_err("minmax"))
    assert np.all(lsq <= ref * (1 + 1e-5) + 1e-9)
    assert lsq.sum() < 0.97 * ref.sum()  # the refinement does something on gaussian weights


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_zlsq_keeps_zero_on_the_grid_and_is_never_worse_than_the_mlx_grid(bits):
    """fit='zlsq': per group (weighted) error <= the mlx grid it starts from, lower overall; the grid's zero point
    -bias/scale stays an integer (up to fp16 storage), so small weights can round to an exact 0; weight error
    lies between the mlx grid and the free lsq grid."""
    rng = np.random.default_rng(10 + bits)
    w = mx.array((rng.standard_normal((64, 512)) * np.exp(rng.standard_normal((64, 1)))).astype(np.float32))
    imp = mx.array(np.exp(rng.standard_normal(512)).astype(np.float32))

    def group_err(fit):
        d = (quantize_rtn(w, bits, 64, fit=fit, importance=imp).dequantize() - w) ** 2 * imp[None, :]
        return np.array(d.reshape(64, 8, 64).sum(-1))

    z, m, lsq = group_err("zlsq"), group_err("mlx"), group_err("lsq")
    assert np.all(z <= m * (1 + 1e-5) + 1e-9)
    assert z.sum() < 0.99 * m.sum()
    assert z.sum() > lsq.sum()  # the integer zero point costs weight error
    qw = quantize_rtn(w, bits, 64, fit="zlsq")
    zp = np.array(-qw.biases / qw.scales)
    assert np.abs(zp - np.round(zp)).max() < 2e-3 * max(1, np.abs(zp).max())
    assert not np.allclose(np.array(qw.scales), np.array(quantize_rtn(w, bits, 64, fit="mlx").scales))


def test_lsq_and_minmax_recover_a_q4_1_grid_exactly():
    """A weight that is already a 4-bit g32 asymmetric grid (a dequantized GGUF Q4_1, like the embedded model) comes
    back exactly at 4 bits / g32 with min/max and lsq grids; MLX's zero-on-grid rule bends the scale and clips."""
    rng = np.random.default_rng(0)
    d = (np.abs(rng.standard_normal((48, 8, 1))) * 0.05 + 0.01).astype(np.float16).astype(np.float32)
    m = (rng.standard_normal((48, 8, 1)) * 0.2 - 7.5 * d).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, size=(48, 8, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # every block uses both ends, as Q4_1's own min/max rule guarantees
    w = mx.array((m + d * q).reshape(48, 256))
    for fit in ("minmax", "lsq"):
        err = mx.abs(quantize_rtn(w, 4, 32, fit=fit).dequantize() - w).max().item()
        assert err < 1e-6 * mx.abs(w).max().item(), fit
    assert mx.abs(quantize_rtn(w, 4, 32, fit="mlx").dequantize() - w).max().item() > 1e-3


def test_rtn_matches_mx_quantize_quality():
    w = mx.random.normal((64, 512), key=mx.random.key(1))
    for bits in (2, 3, 4, 8):
        ours = ((quantize_rtn(w, bits, 64).dequantize() - w) ** 2).mean().item()
        theirs = ((mx.dequantize(*mx.quantize(w, 64, bits), 64, bits) - w) ** 2).mean().item()
        assert ours <= 1.01 * theirs  # same scheme; ours stores fp16 scales


def test_clip_search_never_worse_and_stochastic_is_unbiased():
    w = mx.random.normal((64, 256), key=mx.random.key(2)) ** 3  # heavy tails: clipping helps
    plain = ((quantize_rtn(w, 3, 64).dequantize() - w) ** 2).mean().item()
    clipped = ((quantize_rtn(w, 3, 64, clip_search=True).dequantize() - w) ** 2).mean().item()
    assert clipped < plain
    a = quantize_rtn(w, 2, 64, rounding="stochastic", seed=1)
    b = quantize_rtn(w, 2, 64, rounding="stochastic", seed=1)
    c = quantize_rtn(w, 2, 64, rounding="stochastic", seed=2)
    assert mx.array_equal(a.codes, b.codes) and not mx.array_equal(a.codes, c.codes)
    # unbiased: the mean of many stochastic reconstructions approaches w closer than nearest rounding does
    mean = sum(quantize_rtn(w, 2, 64, rounding="stochastic", seed=s).dequantize() for s in range(64)) / 64
    near = quantize_rtn(w, 2, 64).dequantize()
    assert mx.abs(mean - w).mean().item() < mx.abs(near - w).mean().item()


def test_grid_offset_and_per_channel():
    w = mx.random.normal((16, 256), key=mx.random.key(3))
    q0, q1 = quantize_rtn(w, 4, 64), quantize_rtn(w, 4, 64, grid_offset=0.5)
    assert not mx.array_equal(q0.biases, q1.biases)
    pc = quantize_rtn(w, 4, -1)
    assert pc.scales.shape == (16, 1) and pc.group_size == -1
    np.testing.assert_allclose(np.array(dequantize(pc.codes, pc.scales, pc.biases)), np.array(pc.dequantize()))
    assert ((pc.dequantize() - w) ** 2).mean().item() > ((q0.dequantize() - w) ** 2).mean().item()


def test_bad_bits_and_groups():
    w = mx.zeros((4, 96))
    with pytest.raises(FormatError):
        quantize_rtn(w, 7, 32)
    with pytest.raises(FormatError):
        quantize_rtn(w, 4, 64)  # 96 is not a multiple of 64


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_exact_zero_grid_keeps_zeros_through_mlx_dequantize(bits, group_size):
    """With fp16 scales/biases the plain grid turns many zeros into tiny residuals; exact_zero keeps every zero, and
    costs almost nothing in error: the worst error, in steps, is within 0.1 step of the plain grid's."""
    mx.random.seed(bits)
    keep = mx.random.uniform(shape=(128, 512)) > 0.5
    w = mx.random.normal((128, 512)) * 0.02 * keep
    q = quantize_rtn(w, bits, group_size, exact_zero=True)
    d = mx.dequantize(q.packed(), q.scales.astype(mx.float16), q.biases.astype(mx.float16), group_size=group_size,
                      bits=bits).astype(mx.float32)
    assert bool(mx.all(mx.where(keep, True, d == 0)).item())
    plain = quantize_rtn(w, bits, group_size)
    e_exact = float(((q.dequantize() - w) ** 2).mean().item())
    e_plain = float(((plain.dequantize() - w) ** 2).mean().item())
    assert e_exact <= 1.6 * e_plain
    step = mx.repeat(mx.abs(plain.scales), group_size, axis=1)
    worst = float((mx.abs(q.dequantize() - w) / step).max().item())
    assert worst <= float((mx.abs(plain.dequantize() - w) / step).max().item()) + 0.1


def test_auto_fit_picks_zero_on_grid_only_for_uncompensated_low_bit_rounding():
    from mlx_holo.pipeline.layer import grid_fit
    from mlx_holo.recipe import Recipe

    r = Recipe()
    assert r.fit == "auto"
    assert [grid_fit(r, b, compensated=False) for b in (2, 3, 4, 8)] == ["zlsq", "zlsq", "lsq", "lsq"]
    assert grid_fit(r, 3, compensated=True) == "lsq"
    assert grid_fit(Recipe(fit="mlx"), 3, compensated=False) == "mlx"


def _lsq_reference(wg, scale, bias, bits, imp, iters=8):
    """The plain alternation: every group, every iteration (what lsq_refine's active set must reproduce)."""
    from mlx_holo.quant.rtn import _group_error, round_codes

    a = mx.ones_like(wg) if imp is None else mx.broadcast_to(imp, wg.shape)
    best_err = _group_error(wg, scale, bias, bits, imp)
    best_s, best_b = scale, bias
    sa, sw = a.sum(2, keepdims=True), (a * wg).sum(2, keepdims=True)
    for _ in range(iters):
        q = round_codes(wg, scale, bias, bits)
        sq, sqq, sqw = (a * q).sum(2, keepdims=True), (a * q * q).sum(2, keepdims=True), (a * q * wg).sum(2, keepdims=True)
        det = sa * sqq - sq * sq
        ok = det > 1e-12 * mx.maximum(sa * sqq, 1e-30)
        s_new = mx.where(ok, (sa * sqw - sq * sw) / mx.where(ok, det, 1.0), scale)
        b_new = mx.where(ok, (sw - s_new * sq) / mx.maximum(sa, 1e-30), bias)
        s_new = mx.where(mx.abs(s_new) < 1e-7, scale, s_new)
        scale, bias = s_new.astype(mx.float16).astype(mx.float32), b_new.astype(mx.float16).astype(mx.float32)
        err = _group_error(wg, scale, bias, bits, imp)
        better = err < best_err
        best_err = mx.where(better, err, best_err)
        best_s, best_b = mx.where(better, scale, best_s), mx.where(better, bias, best_b)
    return best_s, best_b


@pytest.mark.parametrize("bits,weighted", [(4, False), (3, True), (2, False), (8, True)])
def test_lsq_active_set_equals_full_iterations(bits, weighted):
    """lsq_refine iterates only the groups still moving; the result is bit-identical to iterating every group."""
    from mlx_holo.quant.rtn import affine_params, lsq_refine, split_groups

    mx.random.seed(bits)
    w = mx.random.normal((96, 256)) * mx.exp(0.5 * mx.random.normal((96, 1)))
    wg, _ = split_groups(w, 32)
    imp = (mx.abs(mx.random.normal((1, 8, 32))) + 0.1) if weighted else None
    s0, b0 = affine_params(wg.min(axis=2, keepdims=True), wg.max(axis=2, keepdims=True), bits, fit="minmax")
    got = lsq_refine(wg, s0, b0, bits, imp)
    want = _lsq_reference(wg, s0, b0, bits, imp)
    assert all(mx.array_equal(g, w_).item() for g, w_ in zip(got, want))
    assert not mx.array_equal(got[0], s0).item()  # the refinement did move the grids


@pytest.mark.parametrize("fit", ["lsq", "zlsq", "mlx"])
def test_rtn_in_row_slices_equals_whole(monkeypatch, fit):
    """A large matrix is quantized in slices of rows (bounded work arrays): the same codes, scales and biases."""
    from mlx_holo import preflight
    from mlx_holo.quant import rtn

    from mlx_holo.quant import gptq

    assert preflight.RTN_CHUNK == rtn.CHUNK_ELEMENTS  # the pre-flight counts the same slices
    assert preflight.GPTQ_CHUNK == gptq.CHUNK_ELEMENTS
    from mlx_holo.quant import rtn_cpu

    monkeypatch.setattr(rtn_cpu, "FITS", ())  # the MLX face (the CPU face slices by rows on its own)
    mx.random.seed(1)
    w = mx.random.normal((300, 256))
    whole = quantize_rtn(w, 3, 64, fit=fit)
    monkeypatch.setattr(rtn, "CHUNK_ELEMENTS", 256 * 64)  # 64-row slices, the last one shorter
    sliced = quantize_rtn(w, 3, 64, fit=fit)
    for a, b in ((whole.codes, sliced.codes), (whole.scales, sliced.scales), (whole.biases, sliced.biases)):
        assert mx.array_equal(a, b).item()


def _group_errors(qw, w, imp=None):
    d = (np.array(qw.dequantize()) - w) ** 2 * (1.0 if imp is None else imp[None, :])
    return d.reshape(w.shape[0], -1, qw.group_size).sum(-1)


@pytest.mark.parametrize("fit", ["mlx", "minmax", "lsq"])
@pytest.mark.parametrize("bits,g,weighted", [(4, 64, False), (3, 32, True), (2, 128, False), (8, 64, True),
                                             (5, 32, False), (6, 64, False)])
def test_cpu_face_equals_the_mlx_face(monkeypatch, fit, bits, g, weighted):
    """rtn_cpu (NumPy, threads) and rtn's MLX ops are one algorithm: the closed-form grids bit for bit, lsq's
    iterates the same up to float summation order (a few groups' fp16 scale may land one ulp apart): nearly every
    group's error equal, the total within 1%, and no group worse than its starting grid."""
    from mlx_holo.quant import rtn, rtn_cpu

    monkeypatch.setattr(rtn, "CPU_FACE_MIN", 0)  # this small matrix through the CPU face too
    rng = np.random.default_rng(10 * bits + g)
    w = (rng.standard_normal((96, 512)) * np.exp(0.5 * rng.standard_normal((96, 1)))).astype(np.float32)
    w[:, 7] *= 6.0  # an outlier input channel
    imp = (np.abs(rng.standard_normal(512)) + 0.1).astype(np.float32) if weighted else None
    kw = dict(fit=fit, importance=None if imp is None else mx.array(imp))
    cpu = quantize_rtn(mx.array(w), bits, g, **kw)
    monkeypatch.setattr(rtn_cpu, "FITS", ())
    ref = quantize_rtn(mx.array(w), bits, g, **kw)
    same = (np.array(cpu.scales) == np.array(ref.scales)).mean()
    if fit == "lsq":  # one ulp apart, two local searches may part ways: per group, neither face dominates
        assert same > 0.98
        e_cpu, e_ref = _group_errors(cpu, w, imp), _group_errors(ref, w, imp)
        assert np.isclose(e_cpu, e_ref, rtol=1e-5).mean() > 0.97
        assert abs(e_cpu.sum() / e_ref.sum() - 1) < 0.01
        start = np.minimum(*(_group_errors(quantize_rtn(mx.array(w), bits, g, fit=f), w, imp)
                             for f in ("mlx", "minmax")))
        assert np.all(e_cpu <= start * (1 + 1e-5) + 1e-9)  # never worse than its start, as the MLX face
    else:
        assert same == 1.0
        assert mx.array_equal(cpu.codes, ref.codes).item() and mx.array_equal(cpu.biases, ref.biases).item()


def test_cpu_face_threads_and_slices_do_not_change_the_result(monkeypatch):
    """Rows are independent: one thread on the whole matrix and two threads on 3-row slices agree bit for bit."""
    from mlx_holo.quant import rtn_cpu

    rng = np.random.default_rng(3)
    w = rng.standard_normal((50, 256)).astype(np.float32)
    one = rtn_cpu.quantize_rows(w, 4, 64, "lsq", workers=1)
    monkeypatch.setattr(rtn_cpu, "SLICE_ELEMENTS", 3 * 256)
    two = rtn_cpu.quantize_rows(w, 4, 64, "lsq", workers=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="zlsq"):
        rtn_cpu.quantize_rows(w, 4, 64, "zlsq")


@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_pack_round_trips_wide_matrices(bits):
    """pack/unpack on many rows and a width that is not a power of two, against mx.quantize's own words."""
    mx.random.seed(bits)
    w = mx.random.normal((40, 96 * 8))
    wq, _, _ = mx.quantize(w, 32, bits)
    codes = unpack(wq, bits, w.shape[1])
    assert mx.array_equal(pack(codes, bits), wq).item()
    assert mx.array_equal(pack(np.array(codes), bits), wq).item()  # a NumPy input packs the same


def test_cpu_face_takes_whole_layers_only(monkeypatch):
    """On a CPU a layer of at least CPU_FACE_MIN weights goes to rtn_cpu, a smaller matrix (GPTQ's column blocks)
    stays on the MLX face."""
    from mlx_holo.quant import rtn, rtn_cpu

    calls = []
    real = rtn_cpu.quantize_rows
    monkeypatch.setattr(rtn_cpu, "quantize_rows", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(rtn, "CPU_FACE_MIN", 64 * 256)
    quantize_rtn(mx.random.normal((63, 256)), 4, 64)
    assert calls == []
    quantize_rtn(mx.random.normal((64, 256)), 4, 64)
    assert calls == [(64, 256)]
