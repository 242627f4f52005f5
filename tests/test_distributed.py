"""Distributed calibration: ranks over MLX's ring backend on 127.0.0.1 give one process's output (codes bit for bit,
floats and metrics within float tolerance); a rank that dies stops the others with an error and no output folder;
what cannot be shared is refused before any work."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_holo.distributed import World, from_wire, share_bounds, to_wire


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(args: list[str], n: int, tmp: Path) -> list[subprocess.Popen]:
    """n ranks of `python -m mlx_holo.compress ARGS` joined by the ring backend (what `mlx.launch -n n --backend
    ring` sets up: a host file and each rank's MLX_RANK)."""
    hostfile = tmp / f"hosts-{time.monotonic_ns()}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    procs = []
    for r in range(n):
        env = dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile))
        procs.append(subprocess.Popen([sys.executable, "-m", "mlx_holo.compress", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def run_ranks(args, n, tmp, timeout=900):
    procs = launch(args, n, tmp)
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], outs


def run_one(args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    return subprocess.run([sys.executable, "-m", "mlx_holo.compress", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def assert_same_output(one: Path, two: Path, metric_rtol=1e-4, codes_differ=0.0):
    """codes_differ: the fraction of packed code words allowed to differ (0: bit for bit)."""
    a, b = tensors(one), tensors(two)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].dtype in (mx.uint32, mx.uint8, mx.int32):
            assert (a[k] != b[k]).astype(mx.float32).mean().item() <= codes_differ, f"codes differ: {k}"
        elif not codes_differ:
            np.testing.assert_allclose(np.array(a[k].astype(mx.float32)), np.array(b[k].astype(mx.float32)),
                                       rtol=1e-3, atol=1e-4, err_msg=k)
    ea, eb = (json.loads((d / "evidence.json").read_text()) for d in (one, two))
    assert ea.get("group_fallback") == eb.get("group_fallback")
    assert [(r["name"], r["bits"], r["group_size"]) for r in ea["layers"]] == \
        [(r["name"], r["bits"], r["group_size"]) for r in eb["layers"]]
    for m in ("ppl", "base_ppl", "kl", "top1", "cos_min"):
        assert ea["metrics"][m] == pytest.approx(eb["metrics"][m], rel=metric_rtol, abs=1e-6), m
    assert "distributed" not in ea
    return eb


def test_shares_cover_the_windows_in_rank_order():
    for n in (1, 2, 5, 16, 17):
        for size in (1, 2, 3):
            bounds = [share_bounds(n, size, r) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(size - 1))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_assign_balances_and_single_process_owns_everything():
    assert World().assign([5, 1, 3]) == [0, 0, 0]
    w = World(group=None, rank=0, size=2)
    owners = w.assign([100, 10, 10, 100])
    assert sorted(owners) == [0, 0, 1, 1] and owners[0] != owners[3]
    assert w.load == [110, 110]
    assert w.assign([50]) == [0]  # the load carries over between calls


def test_processes_sharing_a_host_share_its_cores(monkeypatch):
    """Our own thread pools take a share of the cores; BLAS keeps its threads (its results depend on their number,
    and two ranks must compute what one process does: the two-rank tests check that bit for bit)."""
    from mlx_holo import hardware

    monkeypatch.delenv("MLX_HOLO_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    try:
        assert hardware.share_cores(1) == cores and hardware.cpu_threads() == cores
        n = hardware.share_cores(2)
        assert n == max(1, cores // 2) and hardware.cpu_threads() == n
        monkeypatch.setenv("MLX_HOLO_THREADS", "3")  # the user's count is kept
        assert hardware.cpu_threads() == 3
    finally:
        hardware.share_cores(1)


def test_wire_round_trip_keeps_dtypes_and_bits():
    obj = {"a": (mx.arange(6, dtype=mx.uint32).reshape(2, 3), None),
           "b": [mx.array([1.5, -2.25], dtype=mx.bfloat16), 3, "x"], "c": mx.array([0.1], dtype=mx.float32)}
    back = from_wire(to_wire(obj))
    assert back["a"][1] is None and back["b"][1:] == [3, "x"]
    for x, y in ((obj["a"][0], back["a"][0]), (obj["b"][0], back["b"][0]), (obj["c"], back["c"])):
        assert x.dtype == y.dtype and x.shape == y.shape and mx.array_equal(x, y).item()
    from mlx_holo.quant.formats import QuantizedWeight
    q = QuantizedWeight(None, mx.array([[0.5]], dtype=mx.float16), None, 4, 32,
                        wq=mx.arange(4, dtype=mx.uint32).reshape(1, 4), experts=2)
    q2 = from_wire(to_wire({"q": (q, 1.0)}))["q"][0]  # a dataclass travels as its class and fields
    assert type(q2) is QuantizedWeight and (q2.bits, q2.group_size, q2.experts, q2.codes, q2.biases) == (4, 32, 2,
                                                                                                        None, None)
    assert q2.scales.dtype == mx.float16 and mx.array_equal(q2.wq, q.wq).item()


COMMON = ["--calib-tokens", "512", "--calib-seq-len", "64", "--eval-tokens", "256", "--eval-seq-len", "64"]


@pytest.mark.parametrize("method", [
    ["--method", "gptq", "--bits", "4", "--group-size", "32"],   # true-sequential stages, QEP's float stream
    ["--method", "awq", "--bits", "3", "--group-size", "32"],    # the scale search on every window
    ["--method", "sparsegpt", "--sparsity", "0.5", "--recover", "admm"],
    ["--method", "mixed", "--bits", "3", "--bits-per-weight", "4.5", "--group-size", "32"],
    ["--method", "wanda", "--nm", "2:4", "--bits", "4", "--group-size", "32"],
    ["--method", "rtn", "--bits", "4", "--group-size", "32"],     # data-free: only the layers are shared
    ["--method", "gptq", "--bits", "4", "--group-size", "-1", "--no-quantize-embeddings"],  # per-row groups
])
def test_two_ranks_give_one_process_output(tmp_path, tiny_model_dir, text_file, method):
    args = ["--model", str(tiny_model_dir), "--calib-corpus", str(text_file), "--eval-corpus", str(text_file),
            *COMMON, *method]
    r = run_one([*args, "--out", str(tmp_path / "one")])
    assert r.returncode in (0, 1), r.stderr
    codes, outs = run_ranks([*args, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert codes == [r.returncode, 0], outs
    ev = assert_same_output(tmp_path / "one", tmp_path / "two")
    d = ev["distributed"]
    assert d["world_size"] == 2 and [x["rank"] for x in d["ranks"]] == [0, 1]
    assert all(len(x["block_seconds"]) == 2 and min(x["sent_bytes_per_block"]) > 0 for x in d["ranks"])
    assert [x["ranks_on_host"] for x in d["ranks"]] == [2, 2]  # both on 127.0.0.1: they share its cores
    if not os.environ.get("MLX_HOLO_THREADS"):
        assert [x["threads"] for x in d["ranks"]] == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no rank's copy left


def test_two_ranks_with_experts(tmp_path, text_file):
    """MoE: the experts' grouped matmuls (OpenBLAS) give a row a result that depends on how many rows its expert
    got, so from the second block on the ranks' streams differ from one process's in the last bits and a few
    codes with them; the experts' rows themselves are put in one order whatever the batching
    (``model.experts.split_by_expert``), so the first block is bit for bit."""
    from conftest import make_tiny_arch

    model = make_tiny_arch(tmp_path / "moe", "mixtral")
    args = ["--model", str(model), "--calib-corpus", str(text_file), "--eval-corpus", str(text_file), *COMMON,
            "--method", "gptq", "--bits", "4", "--group-size", "32"]
    r = run_one([*args, "--out", str(tmp_path / "one")])
    assert r.returncode in (0, 1), r.stderr
    codes, outs = run_ranks([*args, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert codes == [r.returncode, 0], outs
    assert_same_output(tmp_path / "one", tmp_path / "two", metric_rtol=2e-3, codes_differ=0.05)
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert all(mx.array_equal(a[k], b[k]).item() for k in a if k.startswith("model.layers.0."))


def test_what_cannot_be_shared_is_refused(tmp_path, tiny_model_dir, text_file):
    args = ["--model", str(tiny_model_dir), "--calib-corpus", str(text_file), *COMMON, "--method", "gptq",
            "--e2e-steps", "2", "--out", str(tmp_path / "o")]
    codes, outs = run_ranks(args, 2, tmp_path, timeout=300)
    assert codes == [2, 2]
    assert "cannot share end-to-end tuning" in outs[0][1]
    assert not (tmp_path / "o").exists()


def test_a_rank_that_dies_stops_the_others_without_output(tmp_path, tiny_model_dir, text_file):
    args = ["--model", str(tiny_model_dir), "--calib-corpus", str(text_file), "--eval-corpus", str(text_file),
            "--calib-tokens", "8192", "--calib-seq-len", "64", "--eval-tokens", "256", "--eval-seq-len", "64",
            "--method", "gptq", "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "o")]
    procs = launch(args, 2, tmp_path)
    time.sleep(0.5)
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(".o.") for p in tmp_path.iterdir()):  # the ranks are at work
        assert time.monotonic() < deadline and procs[0].poll() is None
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    out, err = procs[0].communicate(timeout=300)
    procs[1].communicate()
    assert procs[0].returncode == 2, err
    assert "another rank stopped" in err
    assert not (tmp_path / "o").exists()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    assert all(n.startswith(".o.rank-") for n in left)  # only the killed rank's copy, which nothing could remove
    from mlx_holo.model.save import clean_stale

    assert sorted(p.name for p in clean_stale(tmp_path, "o")) == sorted(left)  # ... until the next run


@pytest.mark.slow
def test_two_ranks_on_the_embedded_model(tmp_path):
    """GPTQ 4-bit on SmolLM2-135M: two ranks write the same codes as one process, and the same metrics."""
    args = ["--method", "gptq", "--bits", "4", "--calib-tokens", "1024", "--eval-tokens", "1024",
            "--eval-seq-len", "256"]
    r = run_one([*args, "--out", str(tmp_path / "one")], timeout=1800)
    assert r.returncode in (0, 1), r.stderr
    codes, outs = run_ranks([*args, "--out", str(tmp_path / "two")], 2, tmp_path, timeout=1800)
    assert codes == [r.returncode, 0], outs
    assert_same_output(tmp_path / "one", tmp_path / "two")


class _Captured(Exception):
    pass


class PairWorld(World):
    """Rank ``rank`` of two, whose exchange returns the given parts (or, with none given, hands back its own)."""

    def __init__(self, rank: int, parts: list | None = None):
        super().__init__(None, rank, 2)
        self.parts = parts

    def exchange_objects(self, obj):
        if self.parts is None:
            raise _Captured(obj)
        return [from_wire(to_wire(p)) for p in self.parts]


def test_a_tables_slices_are_split_between_ranks(tiny_model_dir, text_file, monkeypatch):
    """The head's GPTQ in slices: each of two ranks works on its contiguous share of the slices, and after the
    exchange both hold the one-process table (codes bit for bit) and its error."""
    from mlx_holo import data, model as models
    from mlx_holo.pipeline import capture, head
    from mlx_holo.recipe import Recipe

    tok = models.open_model(str(tiny_model_dir))[1]
    calib = data.calibration_windows(tok, data.load_corpus(str(text_file)), 256, 128, seed=0)
    H = capture.hessian(head.forward_head_inputs(models.open_model(str(tiny_model_dir), lazy=True)[0], calib))
    recipe = Recipe(method="gptq", bits=3)

    def table():
        return models.open_model(str(tiny_model_dir), lazy=True)[0].model.embed_tokens

    monkeypatch.setattr(head, "HEAD_GPTQ_ELEMENTS", table().weight.size // 5)
    one, err_one = head.quantize_table(table(), 3, 64, recipe, H)
    parts = []
    for r in (0, 1):
        with pytest.raises(_Captured) as got:
            head.quantize_table(table(), 3, 64, recipe, H, world=PairWorld(r))
        parts.append(got.value.args[0])
    a, b = sorted(parts[0]), sorted(parts[1])
    assert len(a + b) >= 5 and a + b == list(range(len(a + b))) and a and b  # contiguous shares of the slices
    for r in (0, 1):
        two, err_two = head.quantize_table(table(), 3, 64, recipe, H, world=PairWorld(r, parts))
        assert mx.array_equal(two.wq, one.wq).item() and mx.array_equal(two.scales, one.scales).item()
        assert mx.array_equal(two.biases, one.biases).item() and err_two == err_one
