"""Model-level checks on the embedded SmolLM2-135M and real Wikipedia text (slow; run in CI)."""
import pytest

pytestmark = pytest.mark.slow

EVAL_TOKENS = 2048


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mlx_holo import models
    from mlx_holo.compress import compress
    from mlx_holo.recipe import Recipe

    root = tmp_path_factory.mktemp("embedded")
    base = models.open_model("default")[0]  # one base object: its outputs are computed once and reused
    out = {}
    for bits in (8, 4, 2):
        out[bits] = (compress("default", Recipe(method="rtn", bits=bits, group_size=64), str(root / f"q{bits}"),
                              eval_tokens=EVAL_TOKENS, base_model=base), root / f"q{bits}")
    return out


def test_conversion_generates_paris(embedded_dir):
    from mlx_lm import generate, load

    model, tok = load(str(embedded_dir))
    assert "Paris" in generate(model, tok, "The capital of France is", max_tokens=6)


def test_ppl_ordering(runs):
    m8, m4, m2 = (runs[b][0]["metrics"] for b in (8, 4, 2))
    base = m8["base_ppl"]
    assert 5 < base < 60                      # a sane LM on Wikipedia text
    assert abs(m8["ppl"] - base) / base < 0.01  # 8-bit within 1% of base
    assert m4["ppl"] > m8["ppl"]               # 4-bit worse than 8-bit
    assert m2["ppl"] > 3 * m4["ppl"]           # 2-bit far worse
    assert m8["kl"] < m4["kl"] < m2["kl"] and m8["top1"] > m4["top1"] > m2["top1"]
    assert m8["cos_min"] > m4["cos_min"] > m2["cos_min"]
    assert m8["determinism_delta"] == 0.0


def test_quantized_folder_generates_with_stock_mlx_lm(runs):
    from mlx_lm import generate, load

    model, tok = load(str(runs[8][1]))
    assert "Paris" in generate(model, tok, "The capital of France is", max_tokens=6)


def test_evidence_validates(runs):
    from mlx_holo import evidence

    for bits, (ev, folder) in runs.items():
        assert evidence.validate(evidence.load(folder / "evidence.json")) == []
        assert ev["verdict"] == evidence.apply_gates(ev)[0]
    assert runs[2][0]["verdict"] == "NO-GO"  # 2-bit RTN must never be written up as a pass
