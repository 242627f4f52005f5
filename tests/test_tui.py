"""TUI: Pilot-driven flows against faked backends, the Pareto function, the core/Textual boundary, and one
slow end-to-end compress of the embedded model through the UI."""
import asyncio
import html
import importlib
import json
import re
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from mlx_holo.tui import charts

HASH = "0" * 64


# ----------------------------------------------------------------------------------------------- helpers

def make_evidence(ppl: float = 20.0, base_ppl: float = 19.69, ratio: float = 3.55, bits: int = 4,
                  method: str = "rtn", verdict: str | None = None, group_size: int = 64) -> dict:
    """A schema-valid evidence dict built by mlx_holo.evidence (gates and verdict computed there)."""
    from mlx_holo import evidence

    metrics = {"ppl": ppl, "base_ppl": base_ppl, "delta_ppl_pct": 100 * (ppl / base_ppl - 1), "kl": 0.05,
               "top1": 0.9, "cos_min": 0.97, "determinism_delta": 0.0, "cos_per_layer": [0.99, 0.97]}
    original = 269_030_016
    total = int(original / ratio)
    ev = evidence.build(
        model={"id": "SmolLM2-135M", "path": "/x", "hash": HASH}, recipe={"method": method, "bits": bits,
                                                                      "group_size": group_size},
        corpora={"evaluation": {"name": "wiki", "sha256": HASH, "tokens": 1024}},
        nbytes={"original": original, "codes": total // 2, "scales_biases": total // 8,
                "other": total - total // 2 - total // 8, "total": total},
        n_quant_params=134_000_000, metrics=metrics,
        environment={"mlx": "0.32.4", "backend": "cpu", "device": "cpu", "python": "3.11"},
        timings={"compress_s": 1.0, "eval_s": 2.0}, peak_memory_bytes=10**9)
    if verdict is not None:
        ev["verdict"] = verdict
    return ev


def patch_backend(monkeypatch, module: str, name: str, fn) -> None:
    """Replace module.name (creating a stand-in module if the backend has not landed yet)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        mod = types.ModuleType(module)
        monkeypatch.setitem(sys.modules, module, mod)
    monkeypatch.setattr(mod, name, fn, raising=False)


def screen_text(app) -> str:
    """The screenshot's visible text (SVG tags stripped), for key-string checks."""
    svg = app.export_screenshot()
    body = svg[svg.index("</style>"):] if "</style>" in svg else svg
    return html.unescape(re.sub(r"<[^>]+>", "", body)).replace("\xa0", " ")


def cells(table) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def type_into(pilot, widget, text: str) -> None:
    widget.focus()
    widget.value = ""
    await pilot.press(*text)


async def wait_for(pilot, cond, timeout: float = 60.0) -> None:  # generous: a loaded machine is slow
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached; the screen:\n" + screen_text(pilot.app))
        await pilot.pause(0.02)


async def wait_job(pilot, pane) -> None:
    """Wait for the pane's own worker (other widgets, e.g. DirectoryTree, run and cancel workers too)."""
    if pane.worker is not None:
        await asyncio.wait_for(pane.worker.wait(), 600)
    await pilot.pause()


async def click_run(pilot, pane) -> None:
    """Click the pane's Run button once it has finished its press animation: a Button ignores a press while it
    still shows the last one ("-active"), so two quick clicks would be one."""
    from textual.widgets import Button

    button = pane.query_one("#run", Button)
    for _ in range(100):
        if not button.has_class("-active"):
            break
        await pilot.pause(0.05)
    await pilot.click(f"#{pane.id} #run")


def run(coro):
    return asyncio.run(coro)


def new_app(**kw):
    from mlx_holo.tui.app import HoloApp

    return HoloApp(**kw)


# ----------------------------------------------------------------------------------------------- pure parts

def test_pareto_front_cases():
    assert charts.pareto_front([]) == []
    # (ratio, loss): b dominates a (more ratio, less loss); c trades off; d is worse than c on both
    pts = [(2.0, 5.0), (3.0, 4.0), (4.0, 9.0), (3.5, 10.0)]
    assert charts.pareto_front(pts) == [False, True, True, False]
    assert charts.pareto_front([(2.0, 1.0), (2.0, 1.0)]) == [True, True]          # equal points both stay
    assert charts.pareto_front([(2.0, 1.0), (2.0, 2.0)]) == [True, False]         # same ratio, worse loss
    assert charts.pareto_front([(1.0, None), (2.0, float("nan")), (1.0, 3.0)]) == [False, False, True]


def test_pareto_front_properties():
    rng = np.random.default_rng(0)
    pts = [tuple(map(float, p)) for p in rng.uniform(0, 10, size=(200, 2))]
    mask = charts.pareto_front(pts)

    def dominates(a, b):
        return a[0] >= b[0] and a[1] <= b[1] and a != b

    front = [p for p, m in zip(pts, mask) if m]
    assert 0 < len(front) < len(pts)
    assert not any(dominates(q, p) for p in front for q in pts)
    assert all(any(dominates(q, p) for q in front) for p, m in zip(pts, mask) if not m)
    ys = [p[1] for p in sorted(front)]                     # along the front, more ratio costs more loss
    assert ys == sorted(ys)


def test_pareto_front_minimising_size_and_log_placement():
    # (bits/weight, loss): less of both is better
    pts = [(4.5, 5.0), (3.5, 6.0), (4.5, 4.0), (8.5, 4.0), (2.5, None)]
    assert charts.pareto_front(pts, maximize_x=False) == [False, True, True, False, False]
    where = charts.placed([{"kl": 0.2}, {"kl": 40.0}, {"kl": -0.1}, {"kl": None}], "kl", 5.0)
    assert [w["off"] for w in where] == [False, True, False, False]
    assert [w["y"] for w in where] == [0.2, 5.0, charts.LOG_FLOOR["kl"], None]
    assert charts.run_label({"method": "gptq", "bits": 4, "group_size": 64}, 4.5, "out") == "out: gptq4 g64 4.50b/w"
    assert charts.run_label({"method": "sparsegpt", "sparsity": 0.5, "nm": "2:4"}, None, "") == "sparsegpts0.5 2:4"


def test_evidence_points(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text(json.dumps(make_evidence(ppl=21.0, ratio=3.5)))
    (tmp_path / "sub" / "b.json").write_text(json.dumps(make_evidence(ppl=19.7, ratio=1.9, bits=8)))
    (tmp_path / "bench.json").write_text(json.dumps({"rows": [{"bits": 4, "bw_util": 0.5}]}))
    (tmp_path / "broken.json").write_text("{not json")
    pts = charts.evidence_points(str(tmp_path))
    assert sorted(p["kind"] for p in pts) == ["rtn4", "rtn8"]
    assert sorted(p["label"].split(":")[0] for p in pts) == ["a", "b"]  # the run: the evidence file's name
    assert charts.evidence_points(str(tmp_path / "missing")) == []


def test_core_modules_never_import_textual():
    code = """
import importlib, pkgutil, sys, mlx_holo
names = sorted(m.name for m in pkgutil.walk_packages(mlx_holo.__path__, 'mlx_holo.')
               if not m.name.startswith('mlx_holo.tui'))
bad = []
for n in names:
    importlib.import_module(n)
print(len(names), 'mlx_holo.plan' in names, 'textual' in sys.modules,
      sorted(k for k in sys.modules if k.startswith('textual')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 5 and out[1] == "True"
    assert out[2] == "False", out


# ----------------------------------------------------------------------------------------------- compress

def test_compress_flow_go_then_no_go(monkeypatch, tmp_path):
    calls = []

    def fake_compress(model, recipe, out, *, eval_tokens=8192, gates=None, on_progress=None):
        calls.append({"model": model, "recipe": recipe.to_dict(), "out": out, "eval_tokens": eval_tokens,
                      "gates": gates, "thread": threading.current_thread().name})
        for i in range(5):
            on_progress("compress", i + 1, 5)
        for i in range(2):
            on_progress("evaluate", i + 1, 2)
        good = len(calls) == 1
        return make_evidence(ppl=20.5 if good else 30.0, bits=recipe.bits, method=recipe.method,
                             group_size=recipe.group_size)

    patch_backend(monkeypatch, "mlx_holo.compression", "compress", fake_compress)

    async def flow():
        from textual.widgets import Button, DataTable, Input, ProgressBar, Select, Static

        app = new_app()
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one("#compress_pane")
            assert pane.query_one("#model", Input).value == "default"
            # method via the keyboard: open the Select and move down to gptq
            pane.query_one("#method", Select).focus()
            await pilot.press("enter", "down", "enter")
            await pilot.pause()
            assert pane.query_one("#method", Select).value == "gptq"
            pane.query_one("#bits", Select).value = "3"
            pane.query_one("#group", Select).value = "32"
            await type_into(pilot, pane.query_one("#eval_tokens", Input), "1024")
            await type_into(pilot, pane.query_one("#out", Input), str(tmp_path / "o1"))
            await type_into(pilot, pane.query_one("#gates", Input), "delta_ppl_pct<=5, cos_min>=0.9")
            await pilot.click("#compress_pane #run")
            await wait_job(pilot, pane)
            assert calls[0]["recipe"]["method"] == "gptq" and calls[0]["recipe"]["bits"] == 3
            assert calls[0]["recipe"]["group_size"] == 32 and calls[0]["eval_tokens"] == 1024
            assert calls[0]["out"] == str(tmp_path / "o1") and calls[0]["model"] == "default"
            assert calls[0]["gates"] == ["delta_ppl_pct<=5", "cos_min>=0.9"]
            assert calls[0]["thread"] != threading.main_thread().name
            table = pane.query_one("#runs", DataTable)
            row = cells(table)[0]
            assert row[0] == "SmolLM2-135M" and row[1] == "gptq 3b g32" and row[-1] == "GO"
            assert row[4] == "20.5"
            assert str(pane.query_one("#verdict .verdict", Static).render()) == "GO"
            assert pane.query_one(ProgressBar).percentage == 1.0
            assert not pane.query_one("#run", Button).disabled and pane.query_one("#cancel", Button).disabled
            # the screen repaints asynchronously (slow under load): wait for the painted row, not just the table
            await wait_for(pilot, lambda: "GO" in screen_text(app) and "gptq 3b g32" in screen_text(app))

            # a second run (ctrl+r from the keyboard) that fails its gates -> NO-GO with the failure listed
            await type_into(pilot, pane.query_one("#out", Input), str(tmp_path / "o2"))
            await pilot.press("ctrl+r")
            await wait_job(pilot, pane)
            assert len(cells(table)) == 2 and cells(table)[1][-1] == "NO-GO"
            assert str(pane.query_one("#verdict .verdict", Static).render()) == "NO-GO"
            assert "delta_ppl_pct" in str(pane.query_one("#verdict .failures", Static).render())
            # at 100x30 the runs table has room for both rows (the recipe is painted once per row)
            await wait_for(pilot, lambda: screen_text(app).count("gptq 3b g32") == 2)

    run(flow())


def test_compress_cancel(monkeypatch, tmp_path):
    seen = []
    raised = []

    def slow_compress(model, recipe, out, *, eval_tokens=8192, gates=None, on_progress=None):
        try:
            for i in range(2000):
                on_progress("compress", i, 2000)
                seen.append(i)
                time.sleep(0.005)
        except Exception as e:
            raised.append(type(e).__name__)
            raise
        return make_evidence()

    patch_backend(monkeypatch, "mlx_holo.compression", "compress", slow_compress)

    async def flow():
        from textual.widgets import Button, DataTable, Input, Label

        app = new_app()
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one("#compress_pane")
            pane.query_one("#out", Input).value = str(tmp_path / "o")
            await pilot.click("#compress_pane #run")
            await wait_for(pilot, lambda: len(seen) > 5)
            assert pane.query_one("#run", Button).disabled
            await pilot.click("#compress_pane #cancel")
            await wait_job(pilot, pane)
            assert raised == ["Cancelled"] and len(seen) < 2000
            assert str(pane.query_one(".stage", Label).render()) == "cancelled"
            assert pane.query_one("#runs", DataTable).row_count == 0
            assert not pane.query_one("#run", Button).disabled

    run(flow())


def test_compress_form_errors_start_nothing(monkeypatch, tmp_path):
    calls = []
    patch_backend(monkeypatch, "mlx_holo.compression", "compress", lambda *a, **k: calls.append(1))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")

    async def flow():
        from textual.widgets import Input, RichLog, Select

        app = new_app()
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one("#compress_pane")
            pane.query_one("#out", Input).value = str(tmp_path / "o")
            pane.query_one("#method", Select).value = "mixed"          # no bits-per-weight budget
            await click_run(pilot, pane)
            pane.query_one("#bits", Select).value = "4"
            pane.query_one("#bpw", Input).value = "3.5"                # below 4-bit g64, mixed's floor
            await click_run(pilot, pane)
            pane.query_one("#method", Select).value = "rtn"
            pane.query_one("#model", Input).value = str(tmp_path / "nope")
            await click_run(pilot, pane)
            pane.query_one("#model", Input).value = "default"
            pane.query_one("#out", Input).value = str(tmp_path / "full")
            await click_run(pilot, pane)
            await wait_job(pilot, pane)
            log = " ".join(" ".join(line.text for line in pane.query_one(RichLog).lines).split())  # unwrap
            assert "mixed needs a bits-per-weight budget" in log
            assert "form: bits_per_weight=3.5 is below the cheapest choice" in log  # refused by the form itself
            assert "existing folder" in log and "tick overwrite" in log
            assert calls == []

    run(flow())


def test_backend_error_is_reported_and_mlx_workers_can_run_twice(monkeypatch, tmp_path):
    """Each job ends with mx.clear_streams(); a second MLX job must still find its streams."""
    import mlx.core as mx

    results = []

    def mlx_compress(model, recipe, out, *, eval_tokens=8192, gates=None, on_progress=None):
        if out.endswith("bad"):
            raise RuntimeError("boom [not markup]")
        x = mx.arange(6, dtype=mx.float32).reshape(2, 3)
        results.append(float(mx.sum(x @ x.T).item()))
        on_progress("compress", 1, 1)
        return make_evidence()

    patch_backend(monkeypatch, "mlx_holo.compression", "compress", mlx_compress)

    async def flow():
        from textual.widgets import DataTable, Input, Label, RichLog

        app = new_app()
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one("#compress_pane")
            for out in ("o1", "bad", "o2", "o3"):
                pane.query_one("#out", Input).value = str(tmp_path / out)
                await pilot.click("#compress_pane #run")
                await wait_job(pilot, pane)
                if out == "bad":
                    assert str(pane.query_one(".stage", Label).render()) == "failed"
            log = " ".join(" ".join(line.text for line in pane.query_one(RichLog).lines).split())  # unwrap
            assert "RuntimeError: boom [not markup]" in log
            assert "no Stream" not in log
            assert pane.query_one("#runs", DataTable).row_count == 3

    run(flow())
    assert results == [83.0] * 3      # sum of [[0,1,2],[3,4,5]] @ its transpose, once per successful run


# ----------------------------------------------------------------------------------------------- evaluate, bench

def test_evaluate_flow(monkeypatch, tmp_path):
    got = {}

    def fake_evaluate(model, base=None, *, eval_tokens=8192, seq_len=512, on_progress=None):
        got.update(model=model, base=base, eval_tokens=eval_tokens, seq_len=seq_len)
        on_progress("evaluate", 1, 1)
        return {"ppl": 21.5, "base_ppl": 19.69, "delta_ppl_pct": 9.19, "kl": 0.04, "top1": 0.91, "cos_min": None,
                "determinism_delta": 0.0, "cos_per_layer": [0.99, 0.95]}

    patch_backend(monkeypatch, "mlx_holo.evaluation", "evaluate", fake_evaluate)

    async def flow():
        from textual.widgets import DataTable, Input

        app = new_app(initial_tab="evaluate")
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one("#evaluate_pane")
            await pilot.click("#evaluate_pane #run")                  # no model yet: refused
            await pilot.pause()
            assert got == {}
            await type_into(pilot, pane.query_one("#model", Input), str(tmp_path))
            await type_into(pilot, pane.query_one("#seq_len", Input), "256")
            await pilot.press("ctrl+r")
            await wait_job(pilot, pane)
            assert got == {"model": str(tmp_path), "base": "default", "eval_tokens": 8192, "seq_len": 256}
            rows = dict(cells(pane.query_one("#metrics", DataTable)))
            assert rows["ppl"] == "21.5" and rows["cos_min"] == "-"
            assert rows["cos_per_layer"] == "2 values, min 0.95"

    run(flow())


def test_bench_flow_and_chart(monkeypatch, tmp_path):
    seen = {}

    def fake_bench(model, bits_list, *, folders=None, prompt_tokens=128, gen_tokens=32, on_progress=None):
        seen["folders"] = folders
        rows = []
        for i, b in enumerate(bits_list):
            on_progress("bench", i + 1, len(bits_list))
            rows.append({"label": f"q{b}", "bits": b, "bits_per_weight": b + 0.5, "prefill_tps": 900.0 / b,
                         "decode_tps": 40.0 * b, "ttft_s": 0.05, "peak_mem_bytes": 300 * 2**20,
                         "model_bytes": b * 17 * 2**20, "bytes_per_token": b * 17 * 2**20, "bw_util": 0.08 * b})
        return {"rows": rows, "note": "CPU backend: test note"}

    patch_backend(monkeypatch, "mlx_holo.bench", "run_bench", fake_bench)
    saved = tmp_path / "bench.json"

    async def flow():
        from textual.widgets import DataTable, Input, RichLog

        app = new_app(initial_tab="bench")
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one("#bench_pane")
            await type_into(pilot, pane.query_one("#bits_list", Input), "2, 4,8")
            pane.query_one("#save_json", Input).value = str(saved)
            await pilot.press("ctrl+r")
            await wait_job(pilot, pane)
            table = pane.query_one("#bench_rows", DataTable)
            assert [r[0] for r in cells(table)] == ["q2", "q4", "q8"]
            assert cells(table)[1][-1] == "32" and cells(table)[1][6] == "68"     # 4 bits: 32 % BW, 68 MB/token
            assert cells(table)[1][1] == "4.5" and seen["folders"] == []
            assert any("test note" in str(line) for line in pane.query_one(RichLog).lines)
            await wait_for(pilot, lambda: "decode bandwidth utilisation" in screen_text(app))
            table.clear()
            await type_into(pilot, pane.query_one("#bench_json", Input), str(saved))
            await pilot.press("enter")
            await pilot.pause()
            assert [r[0] for r in cells(table)] == ["q2", "q4", "q8"]

    run(flow())
    assert [r["bits"] for r in json.loads(saved.read_text())["rows"]] == [2, 4, 8]


# ----------------------------------------------------------------------------------------------- evidence, pareto

def _write_evidence_folder(tmp_path):
    (tmp_path / "a_go.json").write_text(json.dumps(make_evidence(ppl=20.5, ratio=3.5)))
    (tmp_path / "b_nogo.json").write_text(json.dumps(make_evidence(ppl=30.0, ratio=3.6, bits=3)))
    (tmp_path / "c_forged.json").write_text(json.dumps(make_evidence(ppl=30.0, ratio=4.5, bits=2, verdict="GO")))
    (tmp_path / "d_rtn8.json").write_text(json.dumps(make_evidence(ppl=19.7, ratio=1.9, bits=8)))


def test_evidence_viewer(tmp_path):
    _write_evidence_folder(tmp_path)

    async def flow():
        from textual.widgets import DataTable, DirectoryTree, Static

        app = new_app(evidence_dir=str(tmp_path))
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f4")
            pane = app.query_one("#evidence_pane")
            tree = pane.query_one(DirectoryTree)
            await wait_for(pilot, lambda: tree.last_line >= 4)
            tree.focus()
            await pilot.press("down", "enter")                        # first file: a_go.json
            await pilot.pause()
            verdict = pane.query_one("#ev_verdict .verdict", Static)
            assert str(verdict.render()) == "GO"
            gates = cells(pane.query_one("#ev_gates", DataTable))
            assert {g[0] for g in gates} >= {"delta_ppl_pct", "cos_min", "determinism_delta", "ratio"}
            assert all(g[-1] == "pass" for g in gates)
            metrics = dict(r[:2] for r in cells(pane.query_one("#ev_metrics", DataTable)))
            assert metrics["ppl"] == "20.5" and metrics["model"] == "SmolLM2-135M"
            text = screen_text(app)
            assert "GO" in text and "a_go.json" in text

            await pilot.press("down", "enter")                        # b_nogo.json
            await pilot.pause()
            assert str(verdict.render()) == "NO-GO"
            failed = [g for g in cells(pane.query_one("#ev_gates", DataTable)) if g[-1] == "FAIL"]
            assert [g[0] for g in failed] == ["delta_ppl_pct"]

            await pilot.press("down", "enter")                        # recorded GO, failing metrics
            await pilot.pause()
            assert str(verdict.render()) == "NO-GO"
            assert "contradicts" in str(pane.query_one("#ev_verdict .failures", Static).render())

            # two runs side by side: the one shown becomes A, the next chosen B
            pane.show_file(str(tmp_path / "a_go.json"))
            await pilot.click("#ev_compare_btn")
            await pilot.pause()
            pane.show_file(str(tmp_path / "b_nogo.json"))
            await pilot.pause()
            table = pane.query_one("#ev_compare", DataTable)
            assert table.display and not pane.query_one("#ev_metrics", DataTable).display
            rows = {r[0]: r[1:] for r in cells(table)}
            assert rows["verdict"] == ["GO", "NO-GO"]
            assert rows["ppl"] == ["20.5", "30"]
            assert rows["recipe bits"] == ["4", "3"]
            assert rows["delta_ppl_pct<=10"][0].endswith("ok") and rows["delta_ppl_pct<=10"][1].endswith("FAIL")
            await pilot.click("#ev_compare_btn")                       # back to one run
            await pilot.pause()
            assert not table.display and pane.query_one("#ev_metrics", DataTable).display

    run(flow())


def test_pareto_tab(tmp_path):
    _write_evidence_folder(tmp_path)
    (tmp_path / "e_collapsed.json").write_text(json.dumps(make_evidence(ppl=92_000.0, ratio=5.0, bits=2)))

    async def flow():
        from textual.widgets import DataTable, Input, Select, Static

        app = new_app(evidence_dir=str(tmp_path))
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f5")
            await pilot.pause()
            pane = app.query_one("#pareto_pane")
            rows = cells(pane.query_one("#pf_table", DataTable))
            front = {r[-1].split(":")[0] for r in rows if r[0] == "*"}
            # bits/weight vs delta-PPL: rtn8 (~0%), rtn4 (4.1%), rtn2 (52%) and the collapsed 2-bit run (the
            # smallest) are optimal; rtn3 (52% at more bits than rtn2) is dominated
            assert front == {"d_rtn8", "a_go", "c_forged", "e_collapsed"} and len(rows) == 5
            assert all(re.search(r"rtn\d g64 \d\.\d\db/w", r[-1]) for r in rows)  # method, bits, group, b/w, run
            await wait_for(pilot, lambda: "off-scale (> 1000): 1" in screen_text(app))  # not stretching the axis
            assert "(log)" in screen_text(app)
            pane.query_one("#pf_y", Select).value = "ppl"
            await pilot.pause()
            assert cells(pane.query_one("#pf_table", DataTable))[0][-1].startswith("d_rtn8:")
            limit = pane.query_one("#pf_limit", Input)
            limit.value = "25"
            limit.focus()
            await pilot.press("enter")
            await pilot.pause()
            assert sum(r[0] == "off" for r in cells(pane.query_one("#pf_table", DataTable))) == 1  # rtn3 (30)
            # the chart follows the folder: a new run appears without a refresh
            (tmp_path / "f_new.json").write_text(json.dumps(make_evidence(ppl=19.8, ratio=3.2, bits=5)))
            await wait_for(pilot, lambda: pane.query_one("#pf_table", DataTable).row_count == 6, timeout=30)
            # Enter on a row opens its evidence
            table = pane.query_one("#pf_table", DataTable)
            table.focus()
            table.move_cursor(row=0)
            await pilot.press("enter")
            await pilot.pause()
            assert app.query_one("TabbedContent").active == "evidence"
            ev_pane = app.query_one("#evidence_pane")
            assert str(ev_pane.query_one("#ev_verdict .verdict", Static).render()) in ("GO", "NO-GO")
            assert ev_pane.shown.endswith(".json")

    run(flow())


# ----------------------------------------------------------------------------------------------- planner, layout

def test_planner_tab(tmp_path):
    async def flow():
        from textual.widgets import DataTable, Input, Static

        app = new_app()
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f6")
            pane = app.query_one("#planner_pane")
            await type_into(pilot, pane.query_one("#pl_target", Input), "8")
            await pilot.press("enter")
            await pilot.pause()
            msg = str(pane.query_one("#pl_message", Static).render())
            assert "uniform 8-bit" in msg and '"bits": 8' in msg
            rows = cells(pane.query_one("#pl_table", DataTable))
            assert [r[0] for r in rows] == ["2", "3", "4", "5", "6", "8", "fp16"]
            await wait_for(pilot, lambda: "134,515,008 params" in screen_text(app))
            await type_into(pilot, pane.query_one("#pl_target", Input), "0.1")
            await type_into(pilot, pane.query_one("#pl_context", Input), "100000")
            await pilot.press("enter")
            await pilot.pause()
            assert "does not fit" in str(pane.query_one("#pl_message", Static).render())
            pane.query_one("#pl_model", Input).value = str(tmp_path / "missing")
            await pilot.click("#pl_compute")
            assert "no config.json" in str(pane.query_one("#pl_message", Static).render())

    run(flow())


def test_every_tab_fits_100x30():
    """Key labels of every tab are on screen at 100x30 (a text snapshot of the layout)."""
    expect = {"compress": ["F1 Compress", "F6 Planner", "Model", "default", "Method", "Bits/wt", "Output",
                           "overwrite output", "Run", "Cancel", "no run yet", "^r Run", "^s Cancel"],
              "evaluate": ["Base", "Seq len", "Run", "metric"],
              "bench": ["Bench JSON", "Gen tok", "BW %", "decode bandwidth utilisation"],
              "evidence": ["Folder", "Open", "choose an evidence JSON", "gate", "threshold"],
              "pareto": ["Refresh", "delta PPL %", "front"],
              "planner": ["Target GB", "KV bits", "Usable", "Compute", "total GiB", "fits (GB)"]}

    async def flow():
        app = new_app()
        async with app.run_test(size=(100, 30)) as pilot:
            for i, tab in enumerate(app.TABS):
                await pilot.press(f"f{i + 1}")
                await pilot.pause()
                text = screen_text(app)
                missing = [s for s in expect[tab] if s not in text]
                assert not missing, (tab, missing)

    run(flow())


# ----------------------------------------------------------------------------------------------- real backend

@pytest.mark.slow
def test_real_compress_through_the_ui(tmp_path):
    """RTN 4-bit of the embedded SmolLM2-135M through the Compress tab, real backend, small eval."""
    pytest.importorskip("mlx_holo.compression")
    out = tmp_path / "rtn4"

    async def flow():
        from textual.widgets import DataTable, Input, Label, RichLog, Static

        app = new_app()
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one("#compress_pane")
            await type_into(pilot, pane.query_one("#eval_tokens", Input), "1024")
            await type_into(pilot, pane.query_one("#out", Input), str(out))
            await pilot.click("#compress_pane #run")
            await wait_job(pilot, pane)
            log = " ".join(" ".join(line.text for line in pane.query_one(RichLog).lines).split())  # unwrap
            assert str(pane.query_one(".stage", Label).render()).startswith("done"), log
            row = cells(pane.query_one("#runs", DataTable))[0]
            verdict = str(pane.query_one("#verdict .verdict", Static).render())
            assert row[1] == "rtn 4b g64" and verdict in ("GO", "NO-GO") and row[-1] == verdict
            assert 3.0 < float(row[2]) < 4.5                    # 16-bit -> 4-bit g64 with fp16 norms
            return row

    row = run(flow())
    ev = json.loads((out / "evidence.json").read_text())
    assert ev["recipe"]["bits"] == 4 and abs(ev["ratio"] - float(row[2])) < 0.01
    assert ev["metrics"]["ppl"] > 0


def test_pareto_skips_hostile_json_and_labels_odd_recipes(tmp_path):
    from mlx_holo.tui import charts

    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "odd.json").write_text(json.dumps({"ratio": 3.0, "metrics": {"ppl": 20.0}, "recipe": [1, 2]}))
    (tmp_path / "odd2.json").write_text(json.dumps({"ratio": 3.0, "metrics": {}, "recipe": {"bits": "four",
                                                                                           "sparsity": "half"}}))
    pts = charts.evidence_points(str(tmp_path))
    assert sorted(p["kind"] for p in pts) == ["?", "?"]


def test_empty_number_fields_and_zero_heads_are_named_errors(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 0, "num_hidden_layers": 2, "vocab_size": 9}))

    async def flow():
        from textual.widgets import Input, RichLog, Static

        app = new_app(initial_tab="planner")
        async with app.run_test(size=(100, 30)) as pilot:
            planner = app.query_one("#planner_pane")
            planner.query_one("#pl_model", Input).value = str(cfg)
            planner.compute()
            await pilot.pause()
            assert "error: config has a value" in str(planner.query_one("#pl_message", Static).render())
            planner.query_one("#pl_model", Input).value = "default"
            planner.query_one("#pl_context", Input).value = ""
            planner.compute()
            await pilot.pause()
            assert "pl context: enter a whole number" in str(planner.query_one("#pl_message", Static).render())
            pane = app.query_one("#compress_pane")
            pane.query_one("#out", Input).value = str(tmp_path / "o")
            pane.query_one("#eval_tokens", Input).value = ""
            app.action_tab("compress")
            await pilot.pause()
            await click_run(pilot, pane)
            await pilot.pause()
            log = " ".join(" ".join(line.text for line in pane.query_one(RichLog).lines).split())
            assert "eval tokens: enter a whole number" in log and pane.worker is None

    run(flow())


def test_compress_form_shows_the_preflight_estimate(tiny_model_dir):
    """The Compress form shows the run's pre-flight peak (preflight.estimate, as compress checks it) and follows
    the form: GPTQ's calibration phase raises it above RTN's; an unreadable model says n/a."""
    from mlx_holo import plan, preflight
    from mlx_holo.recipe import Recipe

    async def flow():
        from textual.widgets import Input, Label, Select

        app = new_app(initial_tab="compress")
        async with app.run_test(size=(140, 40)) as pilot:
            pane = app.query_one("#compress_pane")
            label = pane.query_one("#preflight", Label)
            await type_into(pilot, pane.query_one("#model", Input), str(tiny_model_dir))
            await type_into(pilot, pane.query_one("#eval_tokens", Input), "512")  # evaluation's slice is small
            await pilot.pause()
            cfg = plan.load_config(str(tiny_model_dir))
            want = preflight.estimate(cfg, Recipe(method="rtn"), eval_tokens=512)
            assert f"peak {want.summary()}" in str(label.render())
            pane.query_one("#method", Select).value = "gptq"
            await pilot.pause()
            gptq = preflight.estimate(cfg, Recipe(method="gptq"), eval_tokens=512)
            assert f"peak {gptq.summary()}" in str(label.render()) and gptq.peak_bytes != want.peak_bytes
            await type_into(pilot, pane.query_one("#model", Input), "/nonexistent/folder")
            await pilot.pause()
            assert "pre-flight: n/a" in str(label.render())

    run(flow())


def test_compress_goal_presets_fill_the_form_and_show_the_command():
    async def flow():
        from textual.widgets import Input, Label, Select

        app = new_app()
        async with app.run_test(size=(100, 30)) as pilot:
            pane = app.query_one("#compress_pane")
            command = pane.query_one("#command", Label)
            target = pane.query_one("#goal_target", Input)
            target.value = "3"
            pane.query_one("#goal", Select).value = "best"
            await pilot.pause()
            assert pane.query_one("#method", Select).value == "gptq" and pane.query_one("#bits", Select).value == "3"
            await wait_for(pilot, lambda: "--e2e-steps 60" in str(command.render()))
            assert str(command.render()).startswith("mlx-holo compress --method gptq --bits 3")
            target.value = "0.25"
            pane.query_one("#goal", Select).value = "fit"        # only a mixed-precision budget fits 0.25 GB
            await pilot.pause()
            assert pane.query_one("#method", Select).value == "mixed"
            assert float(pane.query_one("#bpw", Input).value) == 4.4
            await wait_for(pilot, lambda: "--bits-per-weight 4.4" in str(command.render())
                           and "--e2e-steps" not in str(command.render()))
            assert "pre-flight: peak" in str(pane.query_one("#preflight", Label).render())
            pane.query_one("#goal", Select).value = "fastest"
            await pilot.pause()
            assert (pane.query_one("#method", Select).value, pane.query_one("#bits", Select).value) == ("rtn", "6")
            target.value = "0.01"
            pane.query_one("#goal", Select).value = "fit"        # nothing fits: said, the form unchanged
            await pilot.pause()
            assert pane.query_one("#method", Select).value == "rtn"

    run(flow())
