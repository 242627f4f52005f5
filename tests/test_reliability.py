"""Bad input gets a clear message and exit 2, before any work where it can be; nothing half-written survives a kill;
no code or link from a model folder is followed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mlx_holo import model as models
from mlx_holo.recipe import Recipe, RecipeError

ENV = {**os.environ, "MLX_HOLO_NO_REEXEC": "1"}


def cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(method="rtn", sparsity=0.5), "for the pruners"),
    (dict(method="gptq", nm="2:4"), "for the pruners"),
    (dict(method="gptq", calib_tokens=300), "less than one 512-token window"),
    (dict(method="wanda", sparsity=0.5, calib_tokens=0), "less than one"),
])
def test_recipes_that_would_be_ignored_or_recorded_wrongly_are_refused(kw, match):
    with pytest.raises(RecipeError, match=match):
        Recipe(**kw).validate()
    assert Recipe(method="rtn", calib_tokens=0).validate()  # data-free RTN needs no calibration


def test_out_is_checked_before_any_work(tiny_model_dir, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    t = time.perf_counter()
    r = cli("mlx_holo.compress", "--model", str(tiny_model_dir), "--method", "gptq", "--out", str(f))
    assert r.returncode == 2 and "is an existing file" in r.stderr
    r = cli("mlx_holo.compress", "--model", str(tiny_model_dir), "--out", str(f / "sub"))
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr
    r = cli("mlx_holo.compress", "--model", str(tiny_model_dir), "--eval-tokens", "100", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no 512-token window" in r.stderr
    r = cli("mlx_holo.compress", "--model", str(tiny_model_dir), "--eval-tokens", "-5", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert time.perf_counter() - t < 120 and not (tmp_path / "o").exists()


def test_sigterm_leaves_no_output_and_a_sigkill_leftover_is_cleaned(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "o"
    args = [sys.executable, "-m", "mlx_holo.compress", "--model", str(tiny_model_dir), "--method", "gptq",
            "--calib-corpus", str(text_file), "--calib-tokens", "4096", "--calib-seq-len", "128",
            "--eval-corpus", str(text_file), "--eval-tokens", "4096", "--eval-seq-len", "128", "--out", str(out)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".o.tmp-*")):  # wait until it writes
            time.sleep(0.05)
        p.send_signal(sig)
        p.wait(timeout=120)
        assert not out.exists()
        left = list(tmp_path.glob(".o.tmp-*"))
        if sig == signal.SIGTERM:
            assert p.returncode == 130 and left == [], (p.returncode, left)
        else:
            assert left  # nothing can clean up after SIGKILL ... until the next run into the same folder
    r = cli("mlx_holo.compress", "--model", str(tiny_model_dir), "--eval-tokens", "0", "--out", str(out))
    assert "left by an earlier run that was killed" in r.stderr
    assert not list(tmp_path.glob(".o.*")) and (out / "config.json").exists()


def test_overwrite_onto_a_file_leaves_nothing_behind(tiny_model_dir, tmp_path):
    f = tmp_path / "target"
    f.write_text("old")
    r = cli("mlx_holo.compress", "--model", str(tiny_model_dir), "--eval-tokens", "0", "--overwrite", "--out", str(f))
    assert r.returncode in (0, 1), r.stderr
    assert f.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["target"]


@pytest.mark.parametrize("config,match", [
    ([1, 2], "not a config object"),
    ({"model_type": 7}, "not an architecture name"),
    ({"model_type": "../etc"}, "not an architecture name"),
    ({"model_type": "cache"}, "helper module"),
])
def test_bad_configs_are_clear_errors(tiny_model_dir, tmp_path, config, match):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelError, match=match):
        models.open_model(str(d))
    r = cli("mlx_holo.eval", "--model", str(d))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_links_out_of_the_model_folder_are_refused(tiny_model_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "tokenizer.model").symlink_to(secret)
    with pytest.raises(models.ModelError, match="outside the model folder"):
        models.open_model(str(d))
    (d / "tokenizer.model").unlink()
    (d / "tokenizer.model").symlink_to(d / "tokenizer.json")  # a link inside the folder is fine
    models.open_model(str(d), lazy=True)


def test_a_changed_gguf_is_converted_again(tmp_path):
    from mlx_holo.model.open import gguf_key

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    k1 = gguf_key(f)
    f.write_bytes(b"GGUF" + b"\1" * 100)
    assert gguf_key(f) != k1
    r = cli("mlx_holo.eval", "--model", str(f))
    assert r.returncode == 2 and "cannot read GGUF" in r.stderr


@pytest.mark.parametrize("args", [["--target-gb", "nan"], ["--target-gb", "0"], ["--target-gb", "-1"],
                                  ["--model", "/nonexistent/config.json"]])
def test_plan_bad_values(args):
    r = cli("mlx_holo.plan", *args)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--prompt-tokens", "0"], ["--group-size", "100"], ["--bits", "7"]])
def test_bench_bad_values(args):
    r = cli("mlx_holo.bench", *args)
    assert r.returncode == 2 and r.stderr.startswith("error:")


def test_eval_checks_the_recorded_base(tiny_model_dir, tmp_path):
    from conftest import make_tiny_model

    out = tmp_path / "q"
    r = cli("mlx_holo.compress", "--model", str(tiny_model_dir), "--eval-tokens", "0", "--out", str(out))
    ev = json.loads((out / "evidence.json").read_text())
    assert os.path.isabs(ev["model"]["path"]) and os.path.isabs(ev["output"]["path"])
    other = make_tiny_model(tmp_path / "other", seed=5)  # same shape, other weights
    ev["model"]["path"] = str(other)
    (out / "evidence.json").write_text(json.dumps(ev))
    r = cli("mlx_holo.eval", "--model", str(out), "--eval-tokens", "0")
    assert r.returncode == 2 and "hash differs" in r.stderr
    wide = make_tiny_model(tmp_path / "wide", {"vocab_size": 384})
    r = cli("mlx_holo.eval", "--model", str(out), "--base", str(wide), "--eval-tokens", "512", "--seq-len", "128",
            "--corpus", str(tiny_model_dir / "config.json"))
    assert r.returncode == 2 and "same vocabulary" in r.stderr, r.stderr[-500:]


def test_validate_rescore_measures_again(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    cli("mlx_holo.compress", "--model", str(tiny_model_dir), "--eval-tokens", "512", "--eval-seq-len", "128",
        "--eval-corpus", str(text_file), "--out", str(out))
    r = cli("mlx_holo.validate", str(out / "evidence.json"), "--folder", str(out), "--rescore", "--gate", "kl>=0")
    assert r.returncode == 0, r.stdout
    ev = json.loads((out / "evidence.json").read_text())
    ev["metrics"]["kl"] *= 0.5  # a forged KL, consistent with everything else
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(ev))
    assert cli("mlx_holo.validate", str(forged), "--gate", "kl>=0").returncode == 0  # only re-measuring sees it
    r = cli("mlx_holo.validate", str(forged), "--folder", str(out), "--rescore", "--gate", "kl>=0")
    assert r.returncode == 1 and "rescore: kl" in r.stdout


def _json_values():
    from hypothesis import strategies as st

    return st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True)
                        | st.integers(min_value=-10**30, max_value=10**30) | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                        max_leaves=8)


def test_fuzzed_configs_give_plan_errors_never_tracebacks():
    """Property: the planner and the pre-flight either answer or raise PlanError, for any config.json content."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mlx_holo import plan, preflight

    keys = st.sampled_from(["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                            "vocab_size", "intermediate_size", "head_dim", "num_local_experts", "text_config",
                            "tie_word_embeddings", "model_type"])
    good = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100,
            "intermediate_size": 128}

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(keys, _json_values(), max_size=6) | _json_values())
    def check(patch):
        config = dict(good, **patch) if isinstance(patch, dict) else patch
        try:
            plan.plan(config, target_gb=16)
            preflight.estimate(config, Recipe(method="gptq"))
        except plan.PlanError:
            pass

    check()


def test_fuzzed_recipes_give_recipe_errors_never_tracebacks():
    """Property: Recipe.from_dict accepts a valid recipe or raises RecipeError, for any dict."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    import dataclasses

    names = st.sampled_from([f.name for f in dataclasses.fields(Recipe)] + ["nonsense"])

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(names, _json_values(), max_size=5) | _json_values())
    def check(d):
        try:
            r = Recipe.from_dict(d)
        except RecipeError:
            return
        assert r.validate() is r

    check()


def test_missing_tokenizer_is_named(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(models.ModelError, match="has no tokenizer"):
        models.open_model(str(d))


def test_an_internal_error_is_exit_3_with_one_line_and_a_hint(tiny_model_dir, tmp_path, monkeypatch):
    from mlx_holo.cli import common

    def boom():
        raise ZeroDivisionError("a bug")

    assert common.run_guarded(boom) == 3
    with pytest.raises(ZeroDivisionError):
        common.run_guarded(boom, debug=True)
    r = cli("mlx_holo.eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "missing" / "m.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr
