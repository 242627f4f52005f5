"""Mixed precision: MLX byte accounting, budget never exceeded, bits go where the error is, brute-force optimality."""
import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_holo.allocate.bits import (LayerCost, allocate_bits, allocation_bytes, fisher_error, hessian_error,
                                  layer_bytes, rtn_layer_cost)
from mlx_holo.quant.rtn import quantize_rtn

BITS = (2, 3, 4, 5, 6, 8)


def _layers(sens, n_params=4096, group=64):
    # err halves-ish per extra bit (4^-b, as for uniform quantization noise), scaled by the layer's sensitivity
    return [LayerCost(f"l{i}", n_params, group, {b: s * 4.0**-b for b in BITS}) for i, s in enumerate(sens)]


def test_layer_bytes_match_mlx_storage():
    w = mx.zeros((64, 256))
    for bits in BITS:
        for g in (32, 64, 128):
            packed, scales, biases = mx.quantize(w, group_size=g, bits=bits)
            mlx_bytes = packed.nbytes + 2 * scales.size * 2  # scales/biases stored as fp16
            assert layer_bytes(w.size, bits, g) == mlx_bytes
    assert layer_bytes(1000, None, 64) == 2000
    assert layer_bytes(256 * 64, 4, -1) == layer_bytes(256 * 64, 4, 128)


@pytest.mark.parametrize("bpw", [2.7, 3.5, 4.25, 5.0, 6.3])
def test_budget_respected_and_sensitive_layers_get_more_bits(bpw):
    sens = [1.0, 100.0, 3.0, 1000.0, 10.0, 30.0]
    layers = _layers(sens)
    bits = allocate_bits(layers, bits_per_weight=bpw)
    budget = int(bpw * sum(c.n_params for c in layers) // 8)
    assert allocation_bytes(layers, bits) <= budget
    order = np.argsort(sens)
    got = [bits[f"l{i}"] for i in order]
    assert got == sorted(got)  # more sensitive -> at least as many bits
    assert got[-1] > got[0]
    assert allocation_bytes(layers, bits) > budget - layer_bytes(4096, 8, 64)  # the budget is actually used


def test_matches_brute_force_on_small_instances():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = 4
        sizes = rng.integers(1, 9, n) * 1024
        layers = [LayerCost(f"l{i}", int(sizes[i]), 64,
                            {b: float(rng.uniform(0.5, 2) * 10 ** rng.uniform(0, 3) * 4.0**-b
                                      + rng.uniform(0, 1e-3)) for b in BITS}) for i in range(n)]
        target = int(rng.uniform(2.4, 7.0) * sum(c.n_params for c in layers) / 8)
        got = allocate_bits(layers, target_bytes=target)
        assert allocation_bytes(layers, got) <= target
        best = min(sum(c.err[b] for c, b in zip(layers, combo))
                   for combo in itertools.product(BITS, repeat=n)
                   if sum(layer_bytes(c.n_params, b, 64) for c, b in zip(layers, combo)) <= target)
        mine = sum(c.err[got[c.name]] for c in layers)
        assert mine <= best * (1 + 1e-9), (trial, mine, best)  # greedy or DP (+ fix-up) reach the optimum


def test_infeasible_budget_raises():
    layers = _layers([1.0, 2.0])
    with pytest.raises(ValueError, match="infeasible"):
        allocate_bits(layers, bits_per_weight=2.0)  # 2-bit codes alone, no room for the scales
    low = sum(layer_bytes(c.n_params, 2, c.group_size) for c in layers)
    assert set(allocate_bits(layers, target_bytes=low).values()) == {2}  # exactly the floor is feasible
    with pytest.raises(ValueError, match="infeasible"):
        allocate_bits(layers, target_bytes=low - 1)
    with pytest.raises(ValueError):
        allocate_bits(layers)  # neither budget given
    with pytest.raises(ValueError):
        allocate_bits(layers, bits_per_weight=4.0, target_bytes=10**6)


def test_allow_float_and_non_monotone_errors():
    layers = _layers([1.0, 1e6])
    layers[1].err[None] = 0.0
    big = allocate_bits(layers, bits_per_weight=10.0, allow_float=True)
    assert big["l1"] is None and big["l0"] in BITS  # the very sensitive layer stays in float
    # a bit-width that is worse than a cheaper one is never chosen
    odd = [LayerCost("a", 4096, 64, {2: 5.0, 3: 9.0, 4: 1.0, 5: 0.5, 6: 0.4, 8: 0.3})]
    assert allocate_bits(odd, bits_per_weight=3.6)["a"] == 2
    assert allocate_bits(odd, bits_per_weight=4.6)["a"] == 4


def test_hessian_and_fisher_error():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    H = x.T @ x / 256
    w = rng.standard_normal((16, 64)).astype(np.float32)
    qw = quantize_rtn(mx.array(w), 3, 32)
    d = (x @ (np.asarray(qw.dequantize()) - w).T).astype(np.float64)
    assert np.isclose(hessian_error(mx.array(w), mx.array(H), qw), np.sum(d * d) / 256, rtol=1e-3)
    F = rng.uniform(size=w.shape).astype(np.float32)
    ref = np.sum(F * (np.asarray(qw.dequantize()) - w) ** 2)
    assert np.isclose(fisher_error(mx.array(w), mx.array(F), qw), ref, rtol=1e-4)
    cost = rtn_layer_cost("w", mx.array(w), mx.array(H), 32)
    errs = [cost.err[b] for b in BITS]
    assert all(a > b for a, b in zip(errs, errs[1:]))  # RTN error falls with every extra bit


def test_group_size_choices_are_priced_and_filtered_by_width():
    """(bits, group) choices: bytes as MLX stores them, only group sizes that divide a layer's width, and the
    brute-force optimum over the pairs."""
    from mlx_holo.allocate.bits import bits_group, choices, feasible

    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 192)).astype(np.float32)
    w = rng.standard_normal((32, 192)).astype(np.float32)  # 192 = 3 x 64: no 128-groups
    cost = rtn_layer_cost("w", mx.array(w), mx.array(x.T @ x / 256), 64, candidate_bits=(3, 4),
                          candidate_groups=(32, 64, 128))
    assert set(cost.err) == {(3, 32), (3, 64), (4, 32), (4, 64)}
    assert cost.err[(3, 32)] < cost.err[(3, 64)]  # smaller groups, smaller error
    assert feasible([3, (3, 128), (3, -1)], 192, 64) == [3, (3, -1)]
    assert bits_group(3, 64) == (3, 64) and bits_group((2, 32), 64) == (2, 32)
    assert choices((2, 3), ()) == [2, 3] and len(choices((2, 3), (32, 128))) == 4

    groups = (32, 64, 128)
    for trial in range(10):
        n = 3
        layers = []
        for i in range(n):
            s = 10 ** rng.uniform(0, 3)
            err = {(b, g): s * 4.0**-b * (1 + g / 256) * rng.uniform(0.9, 1.1) for b in (2, 3, 4) for g in groups}
            if i == 0:  # a layer too narrow for 128-groups
                err = {k: v for k, v in err.items() if k[1] != 128}
            layers.append(LayerCost(f"l{i}", 4096 * (i + 1), 64, err))
        target = int(rng.uniform(2.6, 4.4) * sum(c.n_params for c in layers) / 8)
        got = allocate_bits(layers, target_bytes=target, candidate_bits=(2, 3, 4), candidate_groups=groups)
        assert allocation_bytes(layers, got) <= target
        assert got["l0"][1] != 128
        best = min(sum(c.err[k] for c, k in zip(layers, combo))
                   for combo in itertools.product(*[list(c.err) for c in layers])
                   if sum(layer_bytes(c.n_params, *k) for c, k in zip(layers, combo)) <= target)
        assert sum(c.err[got[c.name]] for c in layers) <= best * (1 + 1e-9)


def test_cli_infeasible_budget_is_a_clear_error(tiny_model_dir, text_file, tmp_path, capsys):
    from mlx_holo.cli.compress import main

    out = tmp_path / "never"
    rc = main(["--model", str(tiny_model_dir), "--method", "mixed", "--bits", "2", "--target-mb", "0.01",
               "--calib-tokens", "256", "--calib-seq-len", "128", "--calib-corpus", str(text_file),
               "--eval-corpus", str(text_file), "--out", str(out)])
    assert rc == 2
    assert "infeasible" in capsys.readouterr().err
    assert not out.exists()
