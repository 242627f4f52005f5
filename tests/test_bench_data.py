import hashlib

import mlx.core as mx
import pytest

from mlx_holo import data, hardware
from mlx_holo.bench import run_bench


def test_bench_rows_are_consistent(tiny_model_dir):
    res = run_bench(str(tiny_model_dir), [16, 8, 4], prompt_tokens=32, gen_tokens=4, peak_gbps=100.0)
    rows = {r["bits"]: r for r in res["rows"]}
    assert res["peak_source"] == "argument"
    for r in rows.values():
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["ttft_s"] > 0
        assert r["bw_util"] == pytest.approx(r["bytes_per_token_run"] * r["decode_tps"] / 1e9 / 100.0)
    # lower bits read fewer bytes per token and store fewer bytes
    assert rows[16]["bytes_per_token"] > rows[8]["bytes_per_token"] > rows[4]["bytes_per_token"]
    assert rows[16]["model_bytes"] > rows[8]["model_bytes"] > rows[4]["model_bytes"]


def test_chip_table_and_probe():
    assert hardware.chip_peak_gbps("Apple M3 Max") == 400
    assert hardware.chip_peak_gbps("Apple M2") == 100
    assert hardware.chip_peak_gbps("Intel Xeon") is None
    assert hardware.copy_bandwidth_gbps(mb=16, repeats=2) > 0.1
    assert hardware.matvec_bandwidth_gbps(mb=16, repeats=2) > 0.1


def test_corpus_hash_and_windows(text_file):
    c = data.load_corpus(str(text_file))
    assert c.sha256 == hashlib.sha256(text_file.read_text().encode()).hexdigest()
    toks = mx.arange(1000)
    w = data.windows(toks, 128)
    assert w.shape == (7, 128) and w[1, 0].item() == 128  # non-overlapping, in order
    assert data.windows(toks, 128, 300).shape == (2, 128)
    with pytest.raises(data.DataError):
        data.windows(toks, 2000)
    with pytest.raises(data.DataError):
        data.load_corpus("/no/such/file.txt")


def _bos_tokenizer_dir(src, out):
    """A copy of a tiny model whose tokenizer puts <s> in front of every encoding (as Llama-3's and Gemma's do)."""
    import shutil

    from tokenizers import Tokenizer, processors

    shutil.copytree(src, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(out / "tokenizer.json"))
    return out, bos


def test_bos_windows(tiny_model_dir, tmp_path, text_file):
    """A tokenizer that adds BOS gets windows that start with it, then seq_len - 1 consecutive text tokens (none
    dropped or repeated, the same number of windows); one that does not gets the plain windows."""
    from mlx_holo.model.open import open_model

    folder, bos = _bos_tokenizer_dir(tiny_model_dir, tmp_path / "bos")
    tok_plain = open_model(str(tiny_model_dir))[1]
    tok_bos = open_model(str(folder))[1]
    assert data.bos_id(tok_plain) is None and data.bos_id(tok_bos) == bos
    toks = mx.arange(1000)
    w = data.windows(toks, 128, 600, bos=7)
    assert w.shape == (4, 128) and (w[:, 0] == 7).all().item()
    assert mx.array_equal(w[:, 1:].reshape(-1), mx.arange(4 * 127)).item()
    corpus = data.load_corpus(str(text_file))
    plain, with_bos = data.text_windows(tok_plain, corpus, 512, 64), data.text_windows(tok_bos, corpus, 512, 64)
    assert plain.shape == with_bos.shape == (8, 64)
    assert (with_bos[:, 0] == bos).all().item() and not (plain[:, 0] == bos).any().item()
    assert mx.array_equal(with_bos[0, 1:], plain[0, :63]).item()
    cal = data.calibration_windows(tok_bos, corpus, 256, 32, seed=1)
    assert cal.shape == (8, 32) and (cal[:, 0] == bos).all().item()


def test_evidence_records_the_bos_convention(tiny_model_dir, tmp_path):
    from mlx_holo.compression import compress
    from mlx_holo.recipe import Recipe

    folder, _ = _bos_tokenizer_dir(tiny_model_dir, tmp_path / "bos")
    ev = compress(str(folder), Recipe(method="rtn"), tmp_path / "q", eval_tokens=512, eval_seq_len=128)
    assert ev["corpora"]["evaluation"]["bos"] is True
    ev = compress(str(tiny_model_dir), Recipe(method="rtn"), tmp_path / "q2", eval_tokens=512, eval_seq_len=128)
    assert ev["corpora"]["evaluation"]["bos"] is False
