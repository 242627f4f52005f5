"""D2Prune (prune/d2prune.py): exact sparsity and N:M, SparseGPT and Wanda as its lambda = 0 cases, what the
activation term protects, and the pipeline (target layers pruned without weight update)."""
import mlx.core as mx
import numpy as np
import pytest

from mlx_holo.compression import compress
from mlx_holo.prune.d2prune import d2_stats, d2prune_sparsegpt, d2prune_wanda
from mlx_holo.prune.masks import check_nm
from mlx_holo.prune.sparsegpt import sparsegpt_prune
from mlx_holo.prune.wanda import wanda_prune
from mlx_holo.pipeline.capture import hessian
from mlx_holo.recipe import Recipe, RecipeError


def _layer(seed=0, out=48, d=64, n=4 * 32):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.2, 3.0, d).astype(np.float32)
    w = rng.standard_normal((out, d)).astype(np.float32)
    return mx.array(w), mx.array(X)


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_exact_sparsity_and_nm(nm):
    w, X = _layer()
    st = d2_stats(w, X, windows=4)
    per_row = (w.shape[0] * round(0.6 * w.shape[1]))  # Wanda's comparison group: each output row
    for r, n in ((d2prune_sparsegpt(w, hessian(X), st, 0.6, nm, block_size=32), round(0.6 * w.size)),
                 (d2prune_wanda(w, st, 0.6, nm), per_row)):
        if nm is None:
            assert int((~np.array(r.mask)).sum()) == n
        else:
            assert check_nm(r.mask, 2, 4) and abs(r.sparsity - 0.5) < 1e-9
        assert np.all(np.array(r.weight)[~np.array(r.mask)] == 0)


def test_lambda_zero_is_sparsegpt_and_wanda():
    w, X = _layer(1)
    H = hessian(X)
    st = d2_stats(w, X, windows=4)
    a = d2prune_sparsegpt(w, H, st, 0.5, lambda1=0.0, lambda2=0.0, block_size=32)
    b = sparsegpt_prune(w, H, 0.5, block_size=32)
    assert np.array_equal(np.array(a.mask), np.array(b.mask))
    np.testing.assert_allclose(np.array(a.weight), np.array(b.weight), atol=1e-6)
    c = d2prune_wanda(w, st, 0.5, lambda1=0.0, lambda2=0.0)
    d = wanda_prune(w, mx.sqrt((X ** 2).sum(axis=0)), 0.5)
    assert np.array_equal(np.array(c.mask), np.array(d.mask))
    # with the activation term the mask moves
    e = d2prune_sparsegpt(w, H, st, 0.5, lambda1=1e4, block_size=32)
    assert not np.array_equal(np.array(e.mask), np.array(b.mask))


def test_first_order_term_protects_the_loud_output_channel():
    """y |w| x grows with the output channel's magnitude: a row whose outputs are loud keeps more of its weights
    than under SparseGPT's saliency alone, which does not see the output."""
    w, X = _layer(2)
    w = w.at[0].multiply(8.0)  # output channel 0: 8x the others' magnitude ...
    H = hessian(X)
    st = d2_stats(w, X, windows=4, s=1.0)
    plain = d2prune_sparsegpt(w, H, st, 0.5, lambda1=0.0, block_size=32)
    d2 = d2prune_sparsegpt(w, H, st, 0.5, lambda1=50.0, block_size=32)
    kept = lambda r: float(np.array(r.mask)[0].mean())  # noqa: E731
    assert kept(d2) > kept(plain)


def test_stats_follow_the_reference_units():
    w, X = _layer(3, n=3 * 8)
    st = d2_stats(w, X, windows=3, s=2.0)
    Xn = np.array(X).reshape(3, 8, -1)
    xn = np.sqrt((Xn ** 2).sum(1))                          # [N, in]
    yn = np.sqrt(((Xn @ np.array(w).T) ** 2).sum(1))        # [N, out]
    k = np.arange(1, 4)[:, None]
    np.testing.assert_allclose(np.array(st.y), (k * yn).sum(0) / 6, rtol=1e-5)
    np.testing.assert_allclose(np.array(st.x_obs), (np.sqrt(2 * k) * xn).sum(0) / 6, rtol=1e-5)
    np.testing.assert_allclose(np.array(st.wanda_row), (xn ** 2).mean(0), rtol=1e-5)
    assert st.h_scale == 16.0


def test_pipeline_prunes_targets_without_update(tmp_path, tiny_model_dir, text_file):
    r = Recipe(method="d2prune", sparsity=0.5, bits=None, calib_tokens=512, calib_seq_len=128,
               calib_corpus=str(text_file))
    ev = compress(str(tiny_model_dir), r, str(tmp_path / "p"), eval_tokens=256, eval_seq_len=128,
                  eval_corpus=str(text_file), gates=[])
    assert abs(ev["sparsity"]["overall"] - 0.5) < 0.01 and ev["sparsity"]["claims_hold"]
    saved = mx.load(str(tmp_path / "p" / "model.safetensors"))
    orig = mx.load(str(tiny_model_dir / "model.safetensors"))
    for name, updated in (("self_attn.v_proj", False), ("self_attn.q_proj", True)):
        k = f"model.layers.0.{name}.weight"
        a, b = np.array(saved[k].astype(mx.float32)), np.array(orig[k].astype(mx.float32))
        kept = a != 0
        assert abs(kept.mean() - 0.5) < 1e-6
        same = np.allclose(a[kept], b[kept], atol=1e-2)  # float16 storage
        assert same != updated, name  # v_proj: the kept weights as they were; q_proj: reconstructed


def test_recipe_d2_fields():
    with pytest.raises(RecipeError, match="d2_s"):
        Recipe(method="d2prune", sparsity=0.5, d2_s=0).validate()
    assert Recipe(method="d2prune", nm="2:4", recover="admm").validate().d2_lambda1 == 1.0


def _sink_block(tmp_path):
    """A tiny llama block whose attention sinks on the first token: every token carries channel 5, which q maps
    onto dims 0..3 of each head; the first token carries a loud channel 7, which k maps onto the same dims."""
    from conftest import make_tiny_model
    from mlx_holo.model.open import open_model
    from mlx_holo.model.structure import blocks

    b = blocks(open_model(str(make_tiny_model(tmp_path / "m")))[0])[0]
    x = np.random.default_rng(0).standard_normal((4, 64, 128)).astype(np.float32)
    x[:, :, 5] = 3.0
    x[:, 0, 7] = 40.0
    wq, wk = np.array(b.self_attn.q_proj.weight), np.array(b.self_attn.k_proj.weight)
    for h in range(4):
        wq[h * 32:h * 32 + 4, 5] = 2.0
    for h in range(2):
        wk[h * 32:h * 32 + 4, 7] = 2.0
    b.self_attn.q_proj.weight, b.self_attn.k_proj.weight = mx.array(wq), mx.array(wk)
    return b, mx.array(x)


def test_attention_choice_is_driven_by_the_attention_kl(tmp_path):
    from dataclasses import replace

    from mlx_holo.pipeline.attention import captured_attention, choose_updates
    from mlx_holo.pipeline.capture import capture_linear_inputs
    from mlx_holo.pipeline.layer import prune_weight

    b, x = _sink_block(tmp_path)
    probs = []
    with captured_attention(b.self_attn, probs):
        b(x[:1], "causal")
    assert float(np.array(probs[0])[..., 1:, 0].mean()) > 0.3  # the sink
    np.testing.assert_allclose(np.array(probs[0]).sum(-1), 1.0, atol=1e-5)
    _, X = capture_linear_inputs(b, x, "causal")
    r = Recipe(method="d2prune", sparsity=0.7, calib_seq_len=64)
    variants = {n: tuple(prune_weight(getattr(b.self_attn, n).weight, X[f"self_attn.{n}"],
                                      hessian(X[f"self_attn.{n}"]), "d2prune", 0.7, None, None, 0.01,
                                      replace(r, d2_targets=t), f"self_attn.{n}")[0] for t in ("", n))
                for n in ("q_proj", "k_proj", "v_proj")}
    dense = {n: np.array(getattr(b.self_attn, n).weight) for n in variants}
    _, s0 = choose_updates(b, variants, x, "causal", 0.0)
    best, s1 = choose_updates(b, variants, x, "causal", 1.0)
    best100, _ = choose_updates(b, variants, x, "causal", 100.0)
    kl = {k: s1[k] - s0[k] for k in s0}  # the attention KL of each choice
    assert len(kl) == 8 and min(kl.values()) > 0  # every pruned choice moves the distributions
    assert kl[",".join(sorted(best100)) or "-"] == min(kl.values())  # rho large: the choice of least KL
    assert s1[",".join(sorted(best)) or "-"] == min(s1.values())
    for n, w in dense.items():  # the block is left as it was
        assert np.array_equal(np.array(getattr(b.self_attn, n).weight), w)


def test_pipeline_auto_choice_is_recorded(tmp_path, tiny_model_dir, text_file):
    r = Recipe(method="d2prune", sparsity=0.5, bits=None, d2_targets="auto", calib_tokens=512, calib_seq_len=128,
               calib_corpus=str(text_file))
    ev = compress(str(tiny_model_dir), r, str(tmp_path / "p"), eval_tokens=256, eval_seq_len=128,
                  eval_corpus=str(text_file), gates=[])
    rec = ev["d2_attention"]
    assert [d["block"] for d in rec] == [0, 1] and all(len(d["scores"]) == 8 for d in rec)
    assert abs(ev["sparsity"]["overall"] - 0.5) < 0.01


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_d2admm_exact_pattern_and_lower_layer_error_than_fixed_mask_admm(nm):
    """The mask re-chosen inside ADMM (D2ADMM) reconstructs the layer better than ADMM on SparseGPT's fixed mask,
    on correlated inputs of uneven scale."""
    from mlx_holo.pipeline.capture import rel_error
    from mlx_holo.prune.admm import admm_recover
    from mlx_holo.prune.d2admm import d2admm_prune

    rng = np.random.default_rng(0)
    d, o, n = 128, 96, 8 * 64
    A = rng.standard_normal((d, d)).astype(np.float32) * 0.3 + np.eye(d, dtype=np.float32)
    X = mx.array((rng.standard_normal((n, d)).astype(np.float32) @ A) * rng.uniform(0.2, 3.0, d).astype(np.float32))
    w = mx.array(rng.standard_normal((o, d)).astype(np.float32))
    H = hessian(X)
    sg = sparsegpt_prune(w, H, 0.6, nm)
    fixed = admm_recover(w, sg.mask, H)
    r = d2admm_prune(w, H, 0.6, nm, stats=d2_stats(w, X, 8), mask0=sg.mask)
    a = np.array(r.weight)
    if nm is None:
        assert int((a == 0).sum()) == round(0.6 * a.size)
    else:
        assert check_nm(a, 2, 4) and (a == 0).mean() == 0.5
    assert np.array_equal(a != 0, np.array(r.mask))
    # unstructured: the freedom to move the mask is worth much more than within 2:4's groups
    assert rel_error(w, r.weight, H) < (0.9 if nm is None else 1.0) * rel_error(w, fixed, H)
