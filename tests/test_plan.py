"""Planner arithmetic: parameter counts checked by hand, storage formula, KV cache, fit and recommendation."""
import json
import subprocess
import sys

import pytest

from mlx_holo import plan as P

SMOL = dict(P.SMOLLM2_135M_CONFIG)
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "tie_word_embeddings": False}
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
              "tie_word_embeddings": True}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
           "num_experts_per_tok": 2, "tie_word_embeddings": False}


def test_smollm2_param_count_by_hand():
    emb = 49152 * 576
    layer = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536 + 2 * 576
    assert emb + 30 * layer + 576 == 134_515_008
    c = P.count_params(SMOL)
    assert c.total == 134_515_008
    assert c.embedding == emb and c.lm_head == 0
    assert c.norms == 30 * 2 * 576 + 576


def test_llama3_8b_param_count():
    c = P.count_params(LLAMA3_8B)
    assert c.total == 8_030_261_248
    assert abs(c.total - 8.03e9) / 8.03e9 < 1e-3
    assert c.lm_head == c.embedding == 128256 * 4096


def test_qwen_attention_bias_and_mixtral_experts():
    assert P.count_params(QWEN25_05B).total == 494_032_768      # published Qwen2.5-0.5B count
    assert P.count_params(MIXTRAL).total == 46_702_792_704      # published Mixtral-8x7B count


@pytest.mark.parametrize("cfg", [SMOL, LLAMA3_8B, QWEN25_05B, MIXTRAL])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_quantizable_plus_fp16_is_everything(cfg, g):
    c = P.count_params(cfg, g)
    assert c.quantizable + c.fp16 == c.total
    assert c.fp16 >= c.norms


def test_weight_bytes_formula():
    c = P.count_params(LLAMA3_8B, 64)
    norms = 32 * 2 * 4096 + 4096
    assert c.fp16 == norms
    assert P.weight_bytes(c, 4, 64) == (8_030_261_248 - norms) * 4.5 / 8 + 2 * norms
    assert P.weight_bytes(c, 16) == 2 * 8_030_261_248
    # group 32 costs exactly 0.5 bit/weight more than group 64
    c32 = P.count_params(LLAMA3_8B, 32)
    assert P.weight_bytes(c32, 4, 32) - P.weight_bytes(c, 4, 64) == pytest.approx(c.quantizable * 0.5 / 8, abs=1)
    # SmolLM2 group 128: 576 = 4.5 groups -> every matrix with in=576 stays fp16
    c128 = P.count_params(SMOL, 128)
    assert c128.quantizable == 30 * 576 * 1536   # only down_proj (in=1536) is quantizable


def test_kv_cache_bytes():
    assert P.kv_cache_bytes(LLAMA3_8B, 4096) == 2 * 32 * 8 * 128 * 2 * 4096 == 2**29
    assert P.kv_cache_bytes(LLAMA3_8B, 4096, batch=3) == 3 * 2**29
    assert P.kv_cache_bytes(LLAMA3_8B, 4096, kv_bits=8) == int(2**29 / 2 * (1 + 4 / 64))
    assert P.kv_cache_bytes(LLAMA3_8B, 4096, kv_bits=4) < P.kv_cache_bytes(LLAMA3_8B, 4096, kv_bits=8)
    with pytest.raises(P.PlanError):
        P.kv_cache_bytes(LLAMA3_8B, 4096, kv_bits=3)


def test_fits_and_rows_monotone():
    res = P.plan(LLAMA3_8B, context=4096)
    totals = [r.total_bytes for r in res.rows]
    assert totals == sorted(totals)
    fp16 = res.rows[-1]
    assert fp16.bits == 16 and 8 not in fp16.fits_gb and 16 not in fp16.fits_gb and 24 in fp16.fits_gb
    assert P.fits_in(int(0.75 * 8 * P.GIB)) == list(P.APPLE_MEMORY_GB)
    assert P.fits_in(int(0.75 * 8 * P.GIB) + 1)[0] == 16
    assert P.fits_in(int(0.5 * 16 * P.GIB) + 1, usable_fraction=0.5)[0] == 18


def test_does_not_fit():
    res = P.plan(LLAMA3_8B, context=4096, target_gb=2)
    assert res.fits is False and res.recipe is None
    assert "does not fit" in res.message


def _effective_bpw(res):
    r = res.recipe
    return r["bits_per_weight"] if r["method"] == "mixed" else r["bits"] + 32 / r["group_size"]


def test_recommendation_monotone_in_target():
    prev = 0.0
    seen = set()
    for gb in sorted([x / 4 for x in range(12, 80)] + list(P.APPLE_MEMORY_GB)):
        res = P.plan(LLAMA3_8B, context=4096, target_gb=gb)
        if res.fits:
            bpw = _effective_bpw(res)
            assert bpw >= prev - 1e-9, (gb, bpw, prev)
            assert res.rows[0].total_bytes <= res.budget_bytes
            prev = bpw
            seen.add(res.recipe["method"])
    assert seen == {"rtn", "mixed"}
    assert P.plan(LLAMA3_8B, target_gb=192).recipe["bits"] == 8


def test_recommended_recipe_fits_and_is_a_recipe():
    from mlx_holo.recipe import Recipe

    for gb in (4.5, 5, 8, 16):
        res = P.plan(LLAMA3_8B, context=4096, target_gb=gb)
        Recipe(**res.recipe).validate()
        c = res.params
        bits = _effective_bpw(res) - 32 / 64
        used = P.weight_bytes(c, bits, 64) + res.rows[0].kv_bytes + res.rows[0].activation_bytes
        assert used <= res.budget_bytes
    mixed = P.plan(LLAMA3_8B, context=4096, target_gb=5)
    assert mixed.recipe["method"] == "mixed" and 2.5 <= mixed.recipe["bits_per_weight"] < 4.5
    # 0.1 more bits per weight would not fit
    over = P.weight_bytes(mixed.params, mixed.recipe["bits_per_weight"] + 0.1 - 0.5) + \
        mixed.rows[0].kv_bytes + mixed.rows[0].activation_bytes
    assert over > mixed.budget_bytes


def test_kv_bits_and_context_change_the_answer():
    a = P.plan(LLAMA3_8B, context=32768, target_gb=8)
    b = P.plan(LLAMA3_8B, context=32768, target_gb=8, kv_bits=4)
    assert a.rows[0].kv_bytes == 4 * P.GIB and a.fits is False      # 32k fp16 KV alone takes 4 of 6 GiB
    assert b.fits is True and b.rows[0].kv_bytes == int(4 * P.GIB * (0.5 + 4 / 64) / 2)
    assert P.plan(LLAMA3_8B, context=512, target_gb=9).recipe["bits"] == 6


def test_to_dict_and_load_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_05B))
    cfg = P.load_config(str(tmp_path))
    d = P.plan(cfg, target_gb=8).to_dict()
    assert d["params"]["total"] == 494_032_768
    assert json.loads(json.dumps(d))["recipe"]["bits"] == 8
    assert P.load_config("default")["hidden_size"] == 576
    with pytest.raises(P.PlanError):
        P.load_config(str(tmp_path / "missing"))
    nested = {"model_type": "gemma3", "text_config": dict(QWEN25_05B, model_type="gemma3_text")}
    # gemma3 text: no qkv bias, q/k norms of head_dim 64, four norms per layer
    assert P.count_params(nested).total == 494_032_768 - 24 * (896 + 2 * 128) + 24 * 2 * 64 + 24 * 2 * 896


def test_cli(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    out = subprocess.run([sys.executable, "-m", "mlx_holo.plan", "--model", str(path), "--context", "4096",
                          "--batch", "1", "--target-gb", "2"], capture_output=True, text=True, check=True).stdout
    assert "8,030,261,248 parameters" in out and "does not fit" in out
    js = subprocess.run([sys.executable, "-m", "mlx_holo.plan", "--target-gb", "8", "--json"],
                        capture_output=True, text=True, check=True).stdout
    assert json.loads(js)["params"]["total"] == 134_515_008


def test_plan_imports_no_mlx_or_textual():
    code = "import sys, mlx_holo.plan; print('mlx.core' in sys.modules, 'textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_goal_recipes_are_valid_recipes_and_name_their_reason():
    from mlx_holo.recipe import Recipe

    cfg = P.load_config("default")
    rec, why = P.goal_recipe("fit", cfg, 0.5)
    assert rec["bits"] == 8 and "0.5 GB" in why           # 8-bit fits 0.5 GB for a 135M model
    rec, why = P.goal_recipe("fit", cfg, 0.25)          # only mixed precision's budget fits
    assert rec["method"] == "mixed" and rec["bits_per_weight"] < 8
    rec, _ = P.goal_recipe("best", None, 3)
    r = Recipe(**rec).validate()
    assert r.e2e_steps == 60 and r.to_flags()[:4] == ["--method", "gptq", "--bits", "3"]
    assert P.goal_recipe("fastest")[0] == {"method": "rtn", "bits": 6}
    with pytest.raises(P.PlanError, match="does not fit"):
        P.goal_recipe("fit", cfg, 0.01)
    with pytest.raises(P.PlanError):
        P.goal_recipe("best", None, 7)


def test_recipe_flags_round_trip_through_the_cli_parser():
    import argparse

    from mlx_holo.cli.common import add_recipe_arguments, recipe_from_args
    from mlx_holo.recipe import Recipe

    r = Recipe(method="mixed", bits=3, bits_per_weight=3.5, candidate_groups=(32, 64), act_order=False,
               embed_bits=6, e2e_lr=1e-4).validate()
    ap = argparse.ArgumentParser()
    add_recipe_arguments(ap)
    assert recipe_from_args(ap.parse_args(r.to_flags())).validate() == r
