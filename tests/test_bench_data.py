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
        assert r["bw_util"] == pytest.approx(r["bytes_per_token"] * r["decode_tps"] / 1e9 / 100.0)
    # lower bits read fewer bytes per token and store fewer bytes
    assert rows[16]["bytes_per_token"] > rows[8]["bytes_per_token"] > rows[4]["bytes_per_token"]
    assert rows[16]["model_bytes"] > rows[8]["model_bytes"] > rows[4]["model_bytes"]


def test_chip_table_and_probe():
    assert hardware.chip_peak_gbps("Apple M3 Max") == 400
    assert hardware.chip_peak_gbps("Apple M2") == 100
    assert hardware.chip_peak_gbps("Intel Xeon") is None
    assert hardware.copy_bandwidth_gbps(mb=16, repeats=2) > 0.1


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
