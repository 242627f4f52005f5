"""Incoherence rotation (quant/rotate.py): orthogonality, the folded model's function, families refused, the saved
folder (stock mlx_lm.load, untied head, the rotation recorded for evaluation), and rounding of outlier columns."""
import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_tiny_arch, make_tiny_model

from mlx_holo.compression import compress
from mlx_holo.model.open import open_model
from mlx_holo.model.structure import blocks
from mlx_holo.quant.rotate import (CONFIG_KEY, RotationError, make_rotation, rotate_block, rotate_cols,
                                   rotate_outside, rotate_rows)
from mlx_holo.quant.rtn import quantize_rtn
from mlx_holo.recipe import Recipe, RecipeError

TOKENS = mx.array([[5, 17, 99, 3, 250, 41, 7, 64, 12, 200, 31, 8]])


@pytest.mark.parametrize("dim", [128, 576, 7, 96])
def test_rotation_is_orthogonal_and_inverts(dim):
    rot = make_rotation(dim, seed=3)
    Q = np.array(rot.matrix(), np.float64)
    np.testing.assert_allclose(Q @ Q.T, np.eye(dim), atol=1e-5)
    assert np.abs(Q).max() < 0.9 or dim == 7  # spread: no coordinate kept (a permutation would have 1s)
    x = mx.random.normal((3, dim), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(rot.invert(rot.apply(x))), np.array(x), atol=1e-5)
    np.testing.assert_allclose(np.array(rot.apply(x)), np.array(x) @ Q, atol=1e-4)
    w = mx.random.normal((5, dim), key=mx.random.key(1))
    np.testing.assert_allclose(np.array(rotate_cols(w.T, rot)), Q.T @ np.array(w).T, atol=1e-4)
    np.testing.assert_allclose(np.array(rotate_rows(w, rot)), np.array(w) @ Q, atol=1e-4)
    # a different seed is a different rotation
    assert np.abs(np.array(make_rotation(dim, seed=4).matrix()) - Q).max() > 0.1


def _rotated_logits(src, stored):
    m = open_model(str(src), lazy=True, stored_tables=stored)[0]
    rot = make_rotation(m.model.embed_tokens.weight.shape[-1], 0)
    info = rotate_outside(m, rot)
    heads = 0
    for i, b in enumerate(blocks(m)):
        mx.eval(b.parameters())
        heads += rotate_block(b, rot, seed=i)["heads"]
    return m(TOKENS).astype(mx.float32), info, heads


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral", "qwen2_moe", "phi3", "deepseek_v2"])
def test_rotated_model_computes_the_same_function(tmp_path, family):
    src = (make_tiny_model(tmp_path / "m") if family == "llama"  # tied table: untied by the rotation
           else make_tiny_arch(tmp_path / "m", family))
    base = open_model(str(src))[0]
    y0 = base(TOKENS).astype(mx.float32)
    for stored in (False, True):
        y1, info, heads = _rotated_logits(src, stored)
        assert float(mx.abs(y1 - y0).max()) < 1e-4 * float(mx.abs(y0).max())
        assert info["untied"] == (family == "llama")
        assert heads == (0 if family in ("phi3", "deepseek_v2") else 2)  # fused qkv / MLA: no per-head V/O pair


@pytest.mark.parametrize("family,why", [("gemma", "always reads its head"), ("gemma2", "always reads its head"),
                                        ("starcoder2", "RMSNorm"), ("olmo2", "differs from the original")])
def test_families_the_fold_does_not_hold_for_are_refused(tmp_path, family, why):
    src = make_tiny_arch(tmp_path / "m", family)
    m = open_model(str(src), lazy=True)[0]
    rot = make_rotation(m.model.embed_tokens.weight.shape[-1], 0)
    with pytest.raises(RotationError, match=why):
        rotate_outside(m, rot)
        for i, b in enumerate(blocks(m)):
            mx.eval(b.parameters())
            rotate_block(b, rot, seed=i)


def test_rotate_then_round_outlier_columns():
    """The point of the rotation: a weight whose error is dominated by a few outlier input channels rounds with a
    smaller output error once rotated (measured on inputs with the same outlier channels)."""
    rng = np.random.default_rng(0)
    d, o = 256, 128
    w = rng.standard_normal((o, d)).astype(np.float32)
    w[:, :4] *= 30.0  # outlier input channels
    x = rng.standard_normal((512, d)).astype(np.float32)
    w, x = mx.array(w), mx.array(x)
    rot = make_rotation(d, seed=0)

    def out_err(w_hat):
        return float(mx.linalg.norm(x @ (w - w_hat).T) / mx.linalg.norm(x @ w.T))

    plain = out_err(quantize_rtn(w, 4, 64, fit="minmax").dequantize())
    w_rot_hat = quantize_rtn(rotate_rows(w, rot), 4, 64, fit="minmax").dequantize()
    rotated = out_err(rot.invert(w_rot_hat))  # back to the input basis: (W Q)^ Q^T
    assert rotated < 0.5 * plain, (rotated, plain)


def _compress(src, out, text_file, **kw):
    r = Recipe(**{"calib_tokens": 512, "calib_seq_len": 128, "calib_corpus": str(text_file), **kw})
    return compress(str(src), r, str(out), eval_tokens=256, eval_seq_len=128, eval_corpus=str(text_file), gates=[])


def test_rotated_float_folder_opens_in_mlx_lm_and_equals_base(tmp_path, text_file):
    """--method none --rotate hadamard: the saved folder is the rotated float model; stock mlx_lm.load opens it
    (its own head now, tie_word_embeddings false) and it computes the base's logits; evaluation rotates its hidden
    states back, so the per-block cosines are 1."""
    from mlx_lm import load

    src = make_tiny_model(tmp_path / "m")
    ev = _compress(src, tmp_path / "r", text_file, method="none", bits=None, rotate="hadamard")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg[CONFIG_KEY] == {"kind": "hadamard", "seed": 0, "dim": 128}
    assert ev["rotation"]["untied"] and ev["rotation"]["blocks"] == 2 and ev["rotation"]["head_rotations"] == 2
    q, _ = load(str(tmp_path / "r"))
    base, _ = load(str(src))
    y0, y1 = base(TOKENS).astype(mx.float32), q(TOKENS).astype(mx.float32)
    assert float(mx.abs(y1 - y0).max()) < 2e-2  # float16 storage of the rotated weights
    assert ev["metrics"]["cos_min"] > 0.999 and ev["metrics"]["kl"] < 1e-4
    assert "lm_head.weight" in mx.load(str(tmp_path / "r" / "model.safetensors"))


def test_rotated_gptq_on_qwen2_and_mixtral(tmp_path, text_file):
    for family in ("qwen2", "mixtral"):
        src = make_tiny_arch(tmp_path / family, family)
        ev = _compress(src, tmp_path / f"{family}-r", text_file, method="gptq", bits=8, rotate="hadamard")
        assert not ev["rotation"]["untied"]
        assert ev["metrics"]["kl"] < 1e-3 and ev["metrics"]["cos_min"] > 0.99  # 8 bits: near the float model


def test_recipe_rotation_choices():
    assert Recipe(rotate="hadamard").validate().rotate == "hadamard"
    with pytest.raises(RecipeError, match="rotate must be one of"):
        Recipe(rotate="spin").validate()
    with pytest.raises(RecipeError, match="unties"):
        Recipe(method="gptq", rotate="hadamard", embed_first=True).validate()
