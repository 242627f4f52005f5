"""bench: what a decode step reads, computed from the stored tensors of a folder, and the bench of folders + a sweep."""
import json
import math

import mlx.core as mx
import pytest

from mlx_holo import bench
from mlx_holo.model.open import open_model


def _compress(src, out, *args):
    from mlx_holo.cli.compress import main

    assert main(["--model", str(src), "--eval-tokens", "0", "--out", str(out), *args]) in (0, 1)
    return out


def test_folder_costs_of_a_4bit_folder(tiny_model_dir, tmp_path):
    """Every tensor counted once with the bytes it is stored in; an untied table one row; a packed word 8 weights."""
    out = _compress(tiny_model_dir, tmp_path / "q4", "--method", "rtn", "--bits", "4", "--group-size", "32")
    cfg = json.loads((out / "config.json").read_text())
    costs = bench.folder_costs(out)
    tensors = mx.load(str(next(out.glob("*.safetensors"))))
    total = sum(v.nbytes for v in tensors.values())
    assert costs["model_bytes"] == total
    emb = [k for k in tensors if "embed_tokens" in k]
    if cfg.get("tie_word_embeddings", False):
        assert costs["bytes_per_token"] == total
    else:
        table = sum(tensors[k].nbytes for k in emb)
        assert costs["bytes_per_token"] == int(total - table + table / tensors[emb[0]].shape[0])
    # 4-bit codes + fp16 scale and bias per 32 weights: 5 bits/weight for the linears, more with the float norms
    linears = [k for k, v in tensors.items() if v.dtype == mx.uint32]
    n_q = sum(tensors[k].size * 8 for k in linears)
    assert sum(tensors[k].nbytes + tensors[k[:-6] + "scales"].nbytes + tensors[k[:-6] + "biases"].nbytes
               for k in linears) * 8 / n_q == pytest.approx(5.0)
    assert 5.0 < costs["bits_per_weight"] < 6.0


def test_read_costs_mixed_bits_and_experts():
    """Per-layer bits from the quantization block; k of E stacked experts; scales/biases hold no weights."""
    cfg = {"quantization": {"bits": 4, "group_size": 64, "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 64}},
           "num_experts_per_tok": 2, "tie_word_embeddings": True}
    t = {"model.layers.0.mlp.down_proj.weight": ((64, 16), 64 * 16 * 4, True),       # 8-bit: 4 weights a word
         "model.layers.0.mlp.down_proj.scales": ((64, 1), 128, False),
         "model.layers.0.self_attn.q_proj.weight": ((64, 8), 64 * 8 * 4, True),       # 4-bit: 8 weights a word
         "model.layers.0.block_sparse_moe.switch_mlp.up_proj.weight": ((4, 32, 8), 4 * 32 * 8 * 4, True),
         "model.norm.weight": ((64,), 128, False)}
    c = bench.read_costs(t, cfg)
    assert c["weights_per_token"] == 64 * 64 + 64 * 64 + 2 * 32 * 64 + 64
    assert c["bytes_per_token"] == 4096 + 128 + 2048 + 4096 // 2 + 128
    assert c["model_bytes"] == 4096 + 128 + 2048 + 4096 + 128
    assert c["bits_per_weight"] == pytest.approx(8 * c["bytes_per_token"] / c["weights_per_token"])


def test_bench_folder_and_sweep_rows(tiny_model_dir, tmp_path):
    """One row per folder, then per sweep point; the sweep's costs match a folder of the same format; the CPU note."""
    out = _compress(tiny_model_dir, tmp_path / "q4", "--method", "rtn", "--bits", "4", "--group-size", "64")
    seen = []
    res = bench.run_bench(str(tiny_model_dir), [16, 4], folders=[str(out)], prompt_tokens=8, gen_tokens=2,
                          on_progress=lambda s, i, n: seen.append((i, n)))
    rows = res["rows"]
    assert [r["label"] for r in rows] == ["q4", "float", "q4"] and seen[-1] == (3, 3)
    assert rows[0]["runs"] == "mlx-lm" and rows[0]["source"] == str(out)
    for r in rows:
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and r["ttft_s"] > 0 and r["peak_mem_bytes"] > 0
        assert math.isclose(r["bw_gbps"], r["bytes_per_token_run"] * r["decode_tps"] / 1e9)
        assert r["bytes_per_token_run"] > r["bytes_per_token"]  # float32 floats on the CPU backend
        assert math.isclose(r["bw_util_measured"], r["bw_gbps"] / max(res["copy_gbps"], res["matvec_gbps"]))
    assert rows[1]["bits_per_weight"] == pytest.approx(16.0)  # stored float16 (run in float32 here)
    assert rows[1]["bytes_per_token_run"] == 2 * rows[1]["bytes_per_token"]
    # the in-memory sweep point at 4 bits / g64 stores what compress wrote (only the codes' values differ)
    assert rows[2]["bytes_per_token"] == rows[0]["bytes_per_token"]
    assert res["note"] == bench.CPU_NOTE
    import plotext

    assert "bits/w" in bench.table(res) and "float (16.00 b/w)" in plotext.uncolorize(bench.chart(res))


def test_bench_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = {"device": {"device": "cpu", "chip": "x"}, "peak_gbps": 10.0, "peak_source": "test",
           "rows": [{"label": "a", "bits_per_weight": 4.5, "bw_util": 0.2, "decode_tps": 3.0},
                    {"label": "b", "bits_per_weight": 16.0, "bw_util": 0.5, "decode_tps": 1.0}]}
    p = bench.save_png(res, tmp_path / "c.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_bench_refuses_bad_entries(tmp_path):
    from mlx_holo.model.files import ModelError

    with pytest.raises(ModelError, match="no config.json"):
        bench.run_bench(None, [], folders=[str(tmp_path)])
    with pytest.raises(ModelError, match="nothing to bench"):
        bench.run_bench(None, [])


def test_ensemble_folder_runs_through_the_kernels(tiny_model_dir, tmp_path):
    """A replicated-ensemble folder (stock mlx-lm cannot open it) is benched through mlx_holo.kernels: its codes are
    counted once, its K scale sets K times."""
    from mlx_holo.replicate import replicate_mlps, save

    model, _, cfg, _ = open_model(str(tiny_model_dir))
    replicate_mlps(model, 2, 3, 32)
    out = tmp_path / "ens"
    out.mkdir()
    save(model, cfg, out, src=tiny_model_dir)
    res = bench.run_bench(None, [], folders=[str(out)], prompt_tokens=4, gen_tokens=2)
    r = res["rows"][0]
    assert r["runs"] == "ensemble through mlx_holo.kernels" and r["decode_tps"] > 0
    ens = mx.load(str(out / "ensemble.safetensors"))
    rest = mx.load(str(out / "model.safetensors"))  # attention, norms, the tied table (read whole as the head)
    assert r["bytes_per_token"] == sum(v.nbytes for v in ens.values()) + sum(v.nbytes for v in rest.values())
    mlp_weights = sum(v.size * 32 // 3 for k, v in ens.items() if k.endswith(".weight"))  # 3-bit codes, once
    other_weights = sum(v.size for v in rest.values())
    assert r["weights_per_token"] == mlp_weights + other_weights


def test_kernel_chain_benchmark_checks_the_active_face(tmp_path):
    """benchmarks/kernels_chain.py on a shrunken shape: every row's face agrees with mx.quantized_matmul, the K and M
    ratios are filled in, and the exit status says so."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_chain.py"
    spec = importlib.util.spec_from_file_location("kernels_chain", path)
    kc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kc)
    out = tmp_path / "kc.json"
    assert kc.main(["--scale", "32", "--layers", "1", "--bits", "3,4", "--k", "1,2", "--m", "1,2", "--iters", "1",
                    "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 2 * 2 * 2 * 2  # bits x (chain, large layer) x M x K
    assert res["max_rel_err"] < 1e-4 and res["face"] == "reference"
    r = next(r for r in res["rows"] if r["k"] == 2 and r["m"] == 2)
    assert r["ours_k_ratio"] > 0 and r["ours_m_ratio"] > 0
    one = next(x for x in res["rows"] if x["k"] == 1 and x["m"] == 2 and x["case"] == r["case"]
               and x["bits"] == r["bits"])
    assert one["bytes"] < r["bytes"] < 2 * one["bytes"]  # K scale sets, the codes once
