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
        n_quant_params=400, metrics={"ppl": 20.0, "base_ppl": 19.5, "delta_ppl_pct": 2.56, "kl": 0.01, "top1": 0.95,
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
