import copy
import json
import subprocess
import sys

import pytest

from mlx_holo import evidence


def good() -> dict:
    return evidence.build(
        model={"id": "m", "hash": "a" * 64}, recipe={"method": "rtn", "bits": 4, "group_size": 64},
        corpora={"evaluation": {"name": "wiki", "sha256": "b" * 64, "tokens": 1024}},
        nbytes={"original": 1000, "codes": 200, "scales_biases": 50, "other": 10, "total": 260},
        n_quant_params=400, metrics={"ppl": 20.0, "base_ppl": 19.5, "delta_ppl_pct": 100 * 0.5 / 19.5, "kl": 0.01, "top1": 0.95,
                                     "cos_min": 0.99, "determinism_delta": 0.0},
        environment={"mlx": "0.32.4", "backend": "cpu", "device": "cpu"}, timings={"compress_s": 1.0},
        peak_memory_bytes=123)


def test_good_evidence_is_go():
    ev = good()
    assert evidence.validate(ev) == []
    assert ev["verdict"] == "GO"
    assert evidence.apply_gates(ev) == ("GO", [])
    assert abs(ev["ratio"] - 1000 / 260) < 1e-12 and ev["bits_per_weight"] == 5.0


@pytest.mark.parametrize("breakage", [
    lambda e: e["metrics"].pop("cos_min"),                     # missing metric: schema + gate fail
    lambda e: e["metrics"].__setitem__("cos_min", None),       # null metric: the gate fails closed
    lambda e: e["metrics"].__setitem__("delta_ppl_pct", 50.0),  # gate fails although verdict says GO
    lambda e: e.__setitem__("gates", []),                      # nothing checked is not a pass
    lambda e: e.pop("model"),
    lambda e: e["model"].__setitem__("hash", "xyz"),
    lambda e: e.__setitem__("verdict", "MAYBE"),
    lambda e: e["bytes"].__setitem__("total", -5),
    lambda e: e["gates"][0].__setitem__("op", "~"),
    lambda e: e["metrics"].__setitem__("ppl", float("nan")),
    lambda e: e.__setitem__("group_fallback", {"model.layers.0.mlp.up_proj": 48}),  # no MLX group size
    lambda e: e.__setitem__("awq_unscaled_groups", -1),
    lambda e: e.__setitem__("awq_alpha_zero_groups", "none"),
])
def test_broken_evidence_is_no_go(breakage):
    ev = copy.deepcopy(good())
    breakage(ev)
    verdict, failures = evidence.apply_gates(ev)
    assert verdict == "NO-GO" and failures


def test_edited_pass_flag_does_not_pass():
    ev = good()
    ev["metrics"]["cos_min"] = 0.5
    ev["gates"] = [dict(g, passed=True) for g in ev["gates"]]  # tampered: claims every gate passed
    assert evidence.apply_gates(ev)[0] == "NO-GO"


def test_bad_gate_text():
    with pytest.raises(evidence.EvidenceError):
        evidence.parse_gate("cos_min is big")


def test_validate_cli_exit_codes(tmp_path):
    ok, bad = tmp_path / "ok.json", tmp_path / "bad.json"
    ok.write_text(json.dumps(good()))
    b = good()
    del b["metrics"]["kl"]
    bad.write_text(json.dumps(b))
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlx_holo.validate", *a], capture_output=True,  # noqa
                                    text=True, timeout=120)
    assert run(str(ok)).returncode == 0
    r = run(str(ok), str(bad))
    assert r.returncode == 1 and "NO-GO" in r.stdout
    r = run(str(ok), "--gate", "cos_min>=0.999")
    assert r.returncode == 1
    (tmp_path / "junk.json").write_text("{")
    assert run(str(tmp_path / "junk.json")).returncode == 1


# ------------------------------------------------------------------------- forged evidence (gates are policy)

def failing() -> dict:
    """Evidence of a run that misses the default delta_ppl_pct<=10 gate (+26.5%)."""
    ev = good()
    ev["metrics"].update(ppl=24.6675, delta_ppl_pct=100 * (24.6675 - 19.5) / 19.5)
    return evidence.build(**{k: ev[k] for k in ("model", "recipe", "corpora", "environment", "timings",
                                                "peak_memory_bytes")}, nbytes=ev["bytes"], n_quant_params=400,
                          metrics=ev["metrics"])


@pytest.mark.parametrize("forgery", [
    lambda e: e["gates"][0].__setitem__("threshold", 50.0),                         # a raised threshold
    lambda e: e.__setitem__("gates", [{"metric": "ratio", "op": ">=", "threshold": 0.0, "value": 3.8,
                                       "passed": True}]),                           # a replaced gate list
    lambda e: e["metrics"].__setitem__("delta_ppl_pct", 5.0),                       # one edited metric
    lambda e: e["metrics"].__setitem__("delta_ppl_pct", -1e308),
    lambda e: e.__setitem__("verdict", "GO"),
    lambda e: (e["metrics"].__setitem__("ppl", 0.5), e["metrics"].__setitem__("base_ppl", 0.48),
               e["metrics"].__setitem__("delta_ppl_pct", 100 * 0.02 / 0.48)),       # consistent but impossible
])
def test_forged_evidence_stays_no_go(forgery):
    ev = failing()
    assert ev["verdict"] == "NO-GO"
    forgery(ev)
    ev["verdict"] = "GO"
    verdict, failures = evidence.apply_gates(ev)
    assert verdict == "NO-GO" and failures, failures


@pytest.mark.parametrize("edit,message", [
    (lambda e: e.__setitem__("ratio", 9.0), "ratio"),
    (lambda e: e.__setitem__("bits_per_weight", 2.0), "bits_per_weight"),
    (lambda e: e["bytes"].__setitem__("codes", 100), "bytes.total"),
    (lambda e: e["metrics"].__setitem__("top1", 1.5), "top1"),
    (lambda e: e["metrics"].__setitem__("kl", -0.5), "kl"),
])
def test_contradictions_are_named(edit, message):
    ev = good()
    edit(ev)
    assert any(message in c for c in evidence.contradictions(ev))
    assert evidence.apply_gates(ev)[0] == "NO-GO"


def test_validate_applies_policy_gates_and_checks_the_folder(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlx_holo.validate", *a], capture_output=True,  # noqa
                                    text=True, timeout=120)
    ev = good()
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    ev["files"] = evidence.file_hashes(folder)
    p = tmp_path / "ev.json"
    p.write_text(json.dumps(ev))
    assert run(str(p)).returncode == 0
    assert run(str(p), "--gate", "cos_min>=0.9").returncode == 0   # a policy gate can give GO (it could not before)
    r = run(str(p), "--gate", "cos_min>=0.999")
    assert r.returncode == 1 and "cos_min" in r.stdout
    (tmp_path / "policy.json").write_text(json.dumps({"gates": ["kl<=0.001"]}))
    assert run(str(p), "--policy", str(tmp_path / "policy.json")).returncode == 1
    assert run(str(p), "--folder", str(folder)).returncode == 0
    (folder / "model.safetensors").write_bytes(b"other weights")
    r = run(str(p), "--folder", str(folder))
    assert r.returncode == 1 and "model.safetensors: content differs" in r.stdout
    assert run(str(p), "--gate", "cos_min is big").returncode == 2


def test_validate_survives_any_json(tmp_path):
    """Top-level arrays, null, deep nesting, huge integers, non-UTF-8: NO-GO with a message, later files still read."""
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(good()))
    cases = {"array.json": b"[1, 2]", "null.json": b"null", "deep.json": b"[" * 100000 + b"]" * 100000,
             "huge.json": b'{"ratio": ' + b"9" * 5000 + b"}", "latin1.json": "{\"a\": \"\xe9\"}".encode("latin-1")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    r = subprocess.run([sys.executable, "-m", "mlx_holo.validate", *(str(tmp_path / n) for n in cases), str(ok)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.count("NO-GO") == len(cases) and f"GO  {ok}" in r.stdout


def test_fuzzed_evidence_never_crashes_and_never_turns_go():
    """Property: any mutation of a failing run's evidence is NO-GO, and no input raises."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = failing()
    json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(),
                               lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                               max_leaves=10)
    paths = st.sampled_from([("metrics", k) for k in base["metrics"]] + [(k,) for k in base if k != "metrics"])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(paths, json_values)
    def check(path, value):
        ev = copy.deepcopy(base)
        target = ev
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
        verdict, failures = evidence.apply_gates(ev)
        # the run failed on delta_ppl_pct: only rewriting ppl/base_ppl/delta consistently could pass, and then
        # contradictions must catch it unless the rewrite really is consistent and under the gate
        if verdict == "GO":
            m = ev["metrics"]
            assert 100 * (m["ppl"] - m["base_ppl"]) / m["base_ppl"] <= 10 + 1e-6

    check()


def test_compare_two_runs_side_by_side(tmp_path):
    a = good()
    b = copy.deepcopy(good())
    b["recipe"] = {"method": "gptq", "bits": 4, "group_size": 64, "calib_tokens": 8192}
    b["metrics"]["ppl"], b["metrics"]["delta_ppl_pct"] = 25.0, 100 * 5.5 / 19.5
    c = evidence.compare(a, b)
    assert c["recipe"] == {"method": ("rtn", "gptq")}  # calib_tokens 8192 is the default: no difference
    assert c["metrics"]["ppl"] == (20.0, 25.0) and c["verdicts"] == ("GO", "NO-GO")
    gate = next(g for g in c["gates"] if g["gate"].startswith("delta_ppl_pct"))
    assert gate["a_passed"] and not gate["b_passed"]
    assert c["comparable"] == []
    # the policy is the caller's, never the files': a stricter gate fails both
    assert evidence.compare(a, b, ["cos_min>=0.999"])["verdicts"] == ("NO-GO", "NO-GO")
    b["corpora"]["evaluation"]["tokens"] = 2048
    assert any("different evaluation text" in r for r in evidence.compare(a, b)["comparable"])

    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    run = lambda *x: subprocess.run([sys.executable, "-m", "mlx_holo.validate", *x], capture_output=True,  # noqa
                                    text=True, timeout=120)
    r = run("--compare", str(pa), str(pb))
    assert r.returncode == 1 and "method" in r.stdout and "not comparable" in r.stdout
    assert run("--compare", str(pa), str(pa)).returncode == 0
    assert run("--compare", str(pa)).returncode == 2
