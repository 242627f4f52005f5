"""Measured (ZeroQ-style) sensitivity: the KL one quantized layer adds, scored from its block on."""
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_holo import model as models
from mlx_holo.allocate.measured import extrapolate, kl_after, measured_errors, replay, scored_tokens
from mlx_holo.quant.rtn import quantize_rtn


def _rtn(path, w, bits):
    return quantize_rtn(w.astype(mx.float32), bits, 32).dequantize()


def test_measured_kl_equals_the_full_forward_and_restores_weights(tiny_model_dir):
    model = models.open_model(str(tiny_model_dir))[0]
    toks = mx.array(np.random.default_rng(0).integers(0, 200, size=(2, 24)).astype(np.int32))
    paths = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.embed_tokens.weight"]
    before = {k: np.asarray(v) for k, v in tree_flatten(model.parameters())}
    kl = measured_errors(model, toks, paths, lambda p: [2, 3, 4], _rtn)
    after = dict(tree_flatten(model.parameters()))
    assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)  # weights put back
    assert all(type(b).__name__.startswith("Replay") is False for b in models.blocks(model))

    # independent: the whole model run with the one weight replaced (no replay)
    base = model(toks).astype(mx.float32)
    mods = dict(model.named_modules())
    for p in paths:
        mod, name = p.rsplit(".", 1)
        w = after[p]
        for b in (2, 3, 4):
            setattr(mods[mod], name, _rtn(p, w, b))
            ref = kl_after(model, toks, base)
            setattr(mods[mod], name, w)
            assert kl[p][b] == pytest.approx(ref, rel=1e-3, abs=1e-7)
        assert kl[p][2] > kl[p][3] > kl[p][4] > 0  # fewer bits, more damage


def test_replay_skips_the_blocks_and_restores_them_on_error(tiny_model_dir):
    model = models.open_model(str(tiny_model_dir))[0]
    blocks = models.blocks(model)
    toks = mx.array([[1, 2, 3, 4, 5, 6]])
    full = model(toks)
    junk = [mx.zeros((1, 6, blocks[0].self_attn.q_proj.weight.shape[1]))] * len(blocks)
    with replay(blocks, junk):  # every block returns zeros: the output no longer depends on the tokens
        a = model(toks)
        b = model(mx.array([[9, 8, 7, 6, 5, 4]]))
    assert np.allclose(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(full))
    with pytest.raises(RuntimeError):
        with replay(blocks, junk):
            raise RuntimeError("boom")
    assert np.allclose(np.asarray(model(toks)), np.asarray(full))


def test_scored_tokens_are_the_first_of_the_windows():
    calib = mx.arange(4 * 8).reshape(4, 8)
    assert scored_tokens(calib, 5).tolist() == [[0, 1, 2, 3, 4]]
    assert scored_tokens(calib, 16).tolist() == calib[:2].tolist()
    assert scored_tokens(calib, 20).shape == (3, 8)  # whole windows: 20 tokens round up to 3 of them


def test_extrapolate_scales_by_the_proxy_ratio():
    measured = {(3, 64): 0.2, (4, 64): 0.05}
    proxy = {(3, 64): 4.0, (3, 128): 6.0, (4, 64): 1.0, (4, 32): 0.5, (6, 64): 0.0625}
    out = extrapolate(measured, proxy, lambda c: (c[0], 64) if c[0] <= 4 else (4, 64))
    assert out[(3, 64)] == 0.2 and out[(4, 64)] == 0.05  # measured kept
    assert out[(3, 128)] == pytest.approx(0.3)
    assert out[(4, 32)] == pytest.approx(0.025)
    assert out[(6, 64)] == pytest.approx(0.05 / 16)


def test_measured_errors_rejects_unknown_paths(tiny_model_dir):
    model = models.open_model(str(tiny_model_dir))[0]
    with pytest.raises(KeyError):
        measured_errors(model, mx.array([[1, 2, 3]]), ["model.nope.weight"], lambda p: [3], _rtn)


def test_recipe_checks_the_kl_sensitivity():
    from mlx_holo.recipe import Recipe, RecipeError

    Recipe(method="mixed", bits=2, bits_per_weight=3.5, sensitivity="kl", kl_tokens=64).validate()
    with pytest.raises(RecipeError, match="kl_tokens"):
        Recipe(method="mixed", bits=2, bits_per_weight=3.5, sensitivity="kl", kl_tokens=0).validate()
    with pytest.raises(RecipeError, match="sensitivity"):
        Recipe(method="mixed", bits=2, bits_per_weight=3.5, sensitivity="zeroq").validate()


def test_quality_table_runs_mixed_kl_at_the_uniform_budget(tiny_model_dir, tmp_path):
    """benchmarks/quality.py end to end on the tiny model: the kl-mixed row costs what uniform 3-bit costs and,
    calibrated (GPTQ under the allocation), is closer to the base than plain rounding."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    r = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--bits", "3",
                        "--methods", "rtn,mixed-kl", "--eval-tokens", "256", "--calib-tokens", "1024",
                        "--seq-len", "128", "--json", str(tmp_path / "q.json")],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "MLX_HOLO_NO_REEXEC": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["method"]: row for row in json.loads((tmp_path / "q.json").read_text())["rows"]}
    assert rows["mixed-kl"]["bpw"] == pytest.approx(rows["rtn"]["bpw"], abs=1e-3)
    assert rows["mixed-kl"]["kl"] < rows["rtn"]["kl"]
