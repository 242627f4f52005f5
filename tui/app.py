"""mlx-holo workbench TUI: compress, evaluate, benchmark, read evidence, plan memory.

All MLX work runs in `@work(thread=True)` workers which import the backend themselves; the UI thread only
gets plain Python values through `call_from_thread`. Cancel sets a threading.Event that the backend's
`on_progress` callback checks, raising `Cancelled` inside the worker.

One file because it is one Textual App: the six tabs share the app's workers, cancel event, status line and CSS
(`app.tcss`); the charts are in `charts.py`, the constants in `mlx_holo.options`, all work in the library.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.suggester import Suggester
from textual.widgets import (Button, Checkbox, DataTable, DirectoryTree, Footer, Header, Input, Label, ProgressBar, RichLog,
                             Select, Static, TabbedContent, TabPane)
from textual_plotext import PlotextPlot

from mlx_holo import options
from mlx_holo import plan as planner
from mlx_holo.preflight import compress_memory

from . import charts

METHODS = tuple(m for m in options.METHODS if m != "none")  # the form's choices (MLX-free: options, not recipe)
PRUNERS = options.PRUNE_METHODS
BITS = tuple(map(str, options.AFFINE_BITS)) + ("none",)
GROUPS = tuple(map(str, options.GROUP_SIZES)) + ("-1",)


class Cancelled(Exception):
    """Raised from on_progress inside a worker when the user pressed Cancel."""


class FormError(ValueError):
    """A form field the UI thread rejects before starting a worker."""


def number(pane, wid: str, kind=int, default=None):
    """The value of the number field #wid of pane as ``kind``; an empty or malformed field is a FormError naming it."""
    text = pane.query_one(f"#{wid}", Input).value.strip()
    if not text and default is not None:
        return default
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise FormError(f"{wid.replace('_', ' ')}: enter {what} (got {text!r})") from None


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e6 else f"{v:.4e}"
    return str(v)


def si(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def backend(module: str, name: str):
    """Look the backend function up at call time (on the worker thread), so tests can monkeypatch it."""
    return getattr(importlib.import_module(module), name)


def clear_mlx_streams() -> None:
    mx = sys.modules.get("mlx.core")
    if mx is not None and hasattr(mx, "clear_streams"):
        mx.clear_streams()


def run_in_own_thread(fn, *args):
    """Run fn(*args) on a fresh thread that ends with mx.clear_streams(); return its result or re-raise.

    Textual runs thread workers on asyncio's reused executor threads, and MLX cannot recreate a thread's
    default stream once clear_streams() destroyed it ("There is no Stream(cpu, 0) in current thread" on the next
    job). A thread of our own per job lets us clear its streams and then let it die.
    """
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the worker thread
            box["error"] = e
        finally:
            clear_mlx_streams()

    t = threading.Thread(target=target, name="mlx-holo-job", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def check_model(value: str) -> str:
    value = value.strip() or "default"
    if value != "default" and not os.path.isdir(os.path.expanduser(value)):
        raise FormError(f"model must be 'default' or an existing folder, got {value!r}")
    return value if value == "default" else os.path.expanduser(value)


class PathSuggester(Suggester):
    """Completes folder paths as the user types (right arrow accepts)."""

    def __init__(self, files: bool = False) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.files = files

    async def get_suggestion(self, value: str) -> str | None:
        if not value or value == "default"[: len(value)]:
            return "default" if value and not self.files else None
        head, tail = os.path.split(os.path.expanduser(value))
        try:
            names = sorted(os.listdir(head or "."))
        except OSError:
            return None
        for name in names:
            full = os.path.join(head, name)
            if name.startswith(tail) and not name.startswith(".") and (self.files or os.path.isdir(full)):
                return value + name[len(tail):] + ("/" if os.path.isdir(full) else "")
        return None


def field(label: str, widget) -> list:
    return [Label(label, classes="flabel"), widget]


class JobPane(Vertical):
    """A form, Run/Cancel, a progress bar and a log; subclasses supply `read_form`, `call` and `show`."""

    TITLE = "job"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.cancel_event = threading.Event()
        self.running = False
        self.worker = None

    def compose_form(self) -> ComposeResult:  # pragma: no cover - overridden
        yield from ()

    def compose_results(self) -> ComposeResult:  # pragma: no cover - overridden
        yield from ()

    def compose(self) -> ComposeResult:
        with Grid(classes="form"):
            yield from self.compose_form()
        with Horizontal(classes="controls"):
            yield Button("Run", id="run", variant="primary", compact=True)
            yield Button("Cancel", id="cancel", variant="error", compact=True, disabled=True)
            yield Label("idle", classes="stage")
            yield ProgressBar(total=100, show_eta=True, classes="progress")
        with Vertical(classes="results"):
            yield from self.compose_results()
        yield RichLog(classes="log", markup=True, wrap=True, min_width=20)

    # ---- UI thread
    def log_line(self, msg: str) -> None:
        self.query_one(RichLog).write(msg)

    def set_running(self, running: bool) -> None:
        self.running = running
        self.query_one("#run", Button).disabled = running
        self.query_one("#cancel", Button).disabled = not running

    def progress(self, stage: str, done: int, total: int) -> None:
        self.query_one(".stage", Label).update(Text(f"{stage} {done}/{total}"))
        self.query_one(ProgressBar).update(total=max(total, 1), progress=done)

    @on(Button.Pressed, "#run")
    def action_run(self) -> None:
        if self.running:
            return
        try:
            args = self.read_form()
        except (FormError, ValueError) as e:
            self.log_line(f"[red]form: {escape(str(e))}[/red]")
            self.app.notify(escape(str(e)), severity="error")
            return
        self.cancel_event.clear()
        self.set_running(True)
        self.query_one(ProgressBar).update(total=None, progress=0)
        self.query_one(".stage", Label).update("starting")
        self.log_line(f"[b]{self.TITLE}[/b] {escape(json.dumps(args, default=str))}")
        self.worker = self.run_job(args)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        if self.running:
            self.cancel_event.set()
            self.log_line("[yellow]cancel requested[/yellow]")

    def finished(self, status: str, payload, seconds: float) -> None:
        self.set_running(False)
        if status == "ok":
            self.query_one(".stage", Label).update(f"done in {seconds:.1f}s")
            self.log_line(f"[green]done[/green] in {seconds:.1f}s")
            self.show(payload)
        elif status == "cancelled":
            self.query_one(".stage", Label).update("cancelled")
            self.query_one(ProgressBar).update(total=100, progress=0)
            self.log_line("[yellow]cancelled[/yellow]")
        else:
            self.query_one(".stage", Label).update("failed")
            self.log_line(f"[red]error:[/red] {escape(str(payload))}")
            self.app.notify(escape(str(payload)[:200]), title=f"{self.TITLE} failed", severity="error")

    # ---- worker thread
    @work(thread=True, exclusive=True)
    def run_job(self, args: dict) -> None:
        call = self.app.call_from_thread
        last = [0.0]

        def on_progress(stage: str, done: int, total: int) -> None:
            if self.cancel_event.is_set():
                raise Cancelled(stage)
            now = time.monotonic()
            if now - last[0] > 0.05 or done >= total:  # keep the UI thread responsive on tight loops
                last[0] = now
                call(self.progress, stage, done, total)

        t0 = time.monotonic()
        try:
            if self.cancel_event.is_set():
                raise Cancelled("start")
            result = run_in_own_thread(self.call, args, on_progress)
            status, payload = "ok", result
        except Cancelled:
            status, payload = "cancelled", None
        except Exception as e:  # noqa: BLE001 - shown to the user, the app keeps running
            status, payload = "error", f"{type(e).__name__}: {e}"
        try:
            call(self.finished, status, payload, time.monotonic() - t0)
        except RuntimeError:  # the app closed while the worker ran
            pass


class CompressPane(JobPane):
    TITLE = "compress"

    def compose_form(self) -> ComposeResult:
        yield from field("Model", Input("default", placeholder="default or /path/to/model", id="model",
                                        suggester=PathSuggester(), compact=True))
        yield from field("Goal", Select([("custom (the fields below)", "custom"), ("fit in N GB", "fit"),
                                         ("best quality at B bits", "best"),
                                         ("fastest that passes the gates", "fastest")],
                                        value="custom", allow_blank=False, id="goal", compact=True))
        yield from field("Goal N/B", Input("", placeholder="GB for fit, bits for best", type="number",
                                           id="goal_target", compact=True))
        yield from field("Method", Select([(m, m) for m in METHODS], value="rtn", allow_blank=False, id="method",
                                          compact=True))
        yield from field("Bits", Select([(b, b) for b in BITS], value="4", allow_blank=False, id="bits",
                                        compact=True))
        yield from field("Group", Select([(g, g) for g in GROUPS], value="64", allow_blank=False, id="group",
                                         compact=True))
        yield from field("Sparsity", Input("0.0", type="number", id="sparsity", compact=True))
        yield from field("Bits/wt", Input("", placeholder="budget for mixed, e.g. 3.5", type="number", id="bpw",
                                          compact=True))
        yield from field("Eval tok", Input("8192", type="integer", id="eval_tokens", compact=True))
        yield from field("Output", Input("out/holo", id="out", suggester=PathSuggester(), compact=True))
        yield from field("Gates", Input("", placeholder="blank = default, e.g. cos_min>=0.95",
                                        id="gates", compact=True))
        yield Label("", classes="flabel")
        yield Checkbox("overwrite output", id="overwrite", compact=True)

    def compose_results(self) -> ComposeResult:
        yield Label("", id="preflight")
        yield Label("", id="command")
        with Horizontal():
            table = DataTable(id="runs", zebra_stripes=True, cursor_type="row")
            table.add_columns("model", "recipe", "ratio", "bpw", "PPL", "dPPL%", "KL", "top1", "verdict")
            yield table
            yield VerdictBox("no run yet", id="verdict")

    def recipe_fields(self, bpw_default: float | None = None) -> dict:
        """The form's recipe fields (method, bits, group size; sparsity for pruners, the budget for mixed, which
        takes ``bpw_default`` when the field is empty)."""
        method = self.query_one("#method", Select).value
        bits = self.query_one("#bits", Select).value
        sparsity = number(self, "sparsity", float, 0.0)
        recipe = {"method": method, "bits": None if bits == "none" else int(bits),
                  "group_size": int(self.query_one("#group", Select).value)}
        if method in PRUNERS or sparsity:
            recipe["sparsity"] = sparsity
        if method == "mixed":
            recipe["bits_per_weight"] = number(self, "bpw", float, bpw_default)
        return {**getattr(self, "goal_extra", {}), **recipe}

    @on(Select.Changed, "#goal")
    @on(Input.Submitted, "#goal_target")
    def apply_goal(self) -> None:
        """A goal -> the form's fields (``mlx_holo.plan.goal_recipe``); what the form cannot show (calibration
        tokens, E2E steps) is kept beside it and shown in the command line."""
        goal = self.query_one("#goal", Select).value
        self.goal_extra = {}
        if goal == "custom":
            self.update_preflight()
            return
        try:
            target = number(self, "goal_target", float, None)
            model = self.query_one("#model", Input).value.strip() or "default"
            config = planner.load_config(os.path.expanduser(model)) if goal == "fit" else None
            rec, why = planner.goal_recipe(goal, config, target)
        except (planner.PlanError, FormError, OSError, ValueError) as e:
            self.app.notify(escape(str(e)), title="goal", severity="warning")
            return
        self.query_one("#method", Select).value = rec.pop("method")
        bits = rec.pop("bits", None)
        self.query_one("#bits", Select).value = "none" if bits is None else str(bits)
        if "group_size" in rec:
            self.query_one("#group", Select).value = str(rec.pop("group_size"))
        self.query_one("#bpw", Input).value = str(rec.pop("bits_per_weight", ""))
        self.goal_extra = rec
        self.log_line(escape(f"goal: {why}"))
        self.update_preflight()

    def read_form(self) -> dict:
        method = self.query_one("#method", Select).value
        bpw_text = self.query_one("#bpw", Input).value.strip()
        out = self.query_one("#out", Input).value.strip()
        if not out:
            raise FormError("output folder is empty")
        out = os.path.expanduser(out)
        overwrite = self.query_one("#overwrite", Checkbox).value
        if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
            raise FormError(f"{out} exists and is not empty: choose another output or tick overwrite")
        gates = [g.strip() for g in self.query_one("#gates", Input).value.split(",") if g.strip()]
        if method == "mixed" and not bpw_text:
            raise FormError("mixed needs a bits-per-weight budget")
        recipe = self.recipe_fields()
        from mlx_holo.recipe import Recipe
        Recipe(**recipe).validate()  # a recipe that cannot run (e.g. a budget below mixed's floor) starts nothing
        args = {"model": check_model(self.query_one("#model", Input).value), "recipe": recipe, "out": out,
                "eval_tokens": number(self, "eval_tokens"), "gates": gates or None}
        if overwrite:
            args["overwrite"] = True
        return args

    def on_mount(self) -> None:
        self.update_preflight()

    @on(Input.Changed, "#model, #sparsity, #bpw, #eval_tokens, #out")
    @on(Select.Changed, "#method, #bits, #group")
    def update_preflight(self) -> None:
        """The run's pre-flight estimate (what compress checks before any work) for the form as it stands."""
        from mlx_holo.preflight import available_bytes, estimate
        from mlx_holo.recipe import Recipe, RecipeError

        label = self.query_one("#preflight", Label)
        command = self.query_one("#command", Label)
        try:
            model = self.query_one("#model", Input).value.strip() or "default"
            recipe = Recipe(**self.recipe_fields(bpw_default=4.0)).validate()
            command.update(Text("mlx-holo compress " + " ".join(
                [*(["--model", model] if model != "default" else []), *recipe.to_flags(),
                 "--out", self.query_one("#out", Input).value.strip() or "OUT"]), style="cyan"))
            est = estimate(planner.load_config(os.path.expanduser(model)), recipe,
                           eval_tokens=number(self, "eval_tokens", int, 8192))
        except (planner.PlanError, RecipeError, FormError, ValueError, OSError, KeyError, TypeError) as e:
            label.update(Text(f"pre-flight: n/a ({e})", style="dim"))
            return
        avail = available_bytes()
        fits = avail is None or est.peak_bytes <= avail
        label.update(Text(f"pre-flight: peak {est.summary()}" + (f" of {avail / 1e9:.1f} GB available" if avail
                                                                  else ""),
                          style="green" if fits else "bold red"))

    def call(self, args: dict, on_progress) -> dict:
        Recipe = backend("mlx_holo.recipe", "Recipe")
        recipe = Recipe(**args["recipe"]).validate()
        compress = backend("mlx_holo.compression", "compress")
        extra = {"overwrite": True} if args.get("overwrite") else {}
        return compress(args["model"], recipe, args["out"], eval_tokens=args["eval_tokens"], gates=args["gates"],
                        on_progress=on_progress, **extra)

    def show(self, ev: dict) -> None:
        m, r = ev.get("metrics") or {}, ev.get("recipe") or {}
        verdict = ev.get("verdict", "NO-GO")
        recipe = f"{r.get('method')} {r.get('bits') or 'fp'}b g{r.get('group_size')}"
        if r.get("sparsity"):
            recipe += f" s{r['sparsity']:g}"
        self.query_one("#runs", DataTable).add_row(
            (ev.get("model") or {}).get("id", "?"), recipe, fmt(ev.get("ratio"), 3), fmt(ev.get("bits_per_weight"), 3),
            fmt(m.get("ppl")), fmt(m.get("delta_ppl_pct"), 3), fmt(m.get("kl"), 3), fmt(m.get("top1"), 3),
            Text(verdict, style="bold green" if verdict == "GO" else "bold red"))
        failures = [f"{g.get('metric')} {g.get('op')} {g.get('threshold')} (got {fmt(g.get('value'))})"
                    for g in ev.get("gates") or [] if not g.get("passed")]
        self.query_one("#verdict", VerdictBox).show(verdict, failures)
        self.log_line(f"evidence written under {escape(self.query_one('#out', Input).value)}")


class VerdictBox(Vertical):
    """A big GO / NO-GO label and, under it, the failed gates (scrollable)."""

    def __init__(self, placeholder: str, **kw) -> None:
        super().__init__(**kw)
        self.placeholder = placeholder
        self.verdict: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.placeholder, classes="verdict")
        yield Static("", classes="failures")

    def show(self, verdict: str, failures: list[str]) -> None:
        self.verdict = verdict
        label = self.query_one(".verdict", Static)
        label.set_class(verdict == "GO", "go")
        label.set_class(verdict != "GO", "nogo")
        label.update(Text(verdict, style="bold"))
        self.query_one(".failures", Static).update(Text("\n".join(f"x {f}" for f in failures)))


class EvaluatePane(JobPane):
    TITLE = "evaluate"

    def compose_form(self) -> ComposeResult:
        yield from field("Model", Input("", placeholder="compressed model folder", id="model",
                                        suggester=PathSuggester(), compact=True))
        yield from field("Base", Input("default", placeholder="base model (optional)", id="base",
                                       suggester=PathSuggester(), compact=True))
        yield from field("Eval tok", Input("8192", type="integer", id="eval_tokens", compact=True))
        yield from field("Seq len", Input("512", type="integer", id="seq_len", compact=True))

    def compose_results(self) -> ComposeResult:
        table = DataTable(id="metrics", zebra_stripes=True, cursor_type="row")
        table.add_columns("metric", "value")
        yield table

    def read_form(self) -> dict:
        model = self.query_one("#model", Input).value.strip()
        if not model:
            raise FormError("choose a model folder to evaluate")
        base = self.query_one("#base", Input).value.strip()
        return {"model": check_model(model), "base": check_model(base) if base else None,
                "eval_tokens": number(self, "eval_tokens"), "seq_len": number(self, "seq_len")}

    def call(self, args: dict, on_progress) -> dict:
        evaluate = backend("mlx_holo.evaluation", "evaluate")
        return evaluate(args["model"], args["base"], eval_tokens=args["eval_tokens"], seq_len=args["seq_len"],
                        on_progress=on_progress)

    def show(self, metrics: dict) -> None:
        table = self.query_one("#metrics", DataTable)
        table.clear()
        for k, v in metrics.items():
            if isinstance(v, list):
                v = f"{len(v)} values, min {fmt(min(v))}" if v else "[]"
            table.add_row(k, fmt(v))


class BenchPane(JobPane):
    TITLE = "bench"

    def compose_form(self) -> ComposeResult:
        yield from field("Folders", Input("", placeholder="saved folders to bench, comma-separated (optional)",
                                          id="folders", suggester=PathSuggester(), compact=True))
        yield from field("Sweep model", Input("default", id="model", suggester=PathSuggester(), compact=True))
        yield from field("Sweep bits", Input("16,8,4,3,2", id="bits_list", compact=True))
        yield from field("Prompt tok", Input("128", type="integer", id="prompt_tokens", compact=True))
        yield from field("Gen tok", Input("32", type="integer", id="gen_tokens", compact=True))
        yield from field("Bench JSON", Input("", placeholder="load a saved bench JSON + Enter", id="bench_json",
                                             suggester=PathSuggester(files=True), compact=True))
        yield from field("Save JSON", Input("", placeholder="optional path to save the rows", id="save_json",
                                            compact=True))

    def compose_results(self) -> ComposeResult:
        table = DataTable(id="bench_rows", zebra_stripes=True, cursor_type="row")
        table.add_columns("entry", "bits/w", "prefill tok/s", "decode tok/s", "TTFT s", "peak MB", "MB/tok", "BW %")
        yield table
        yield PlotextPlot(id="bwplot")

    def on_mount(self) -> None:
        charts.draw_bandwidth(self.query_one("#bwplot", PlotextPlot).plt, [])

    def read_form(self) -> dict:
        try:
            bits = [int(b) for b in self.query_one("#bits_list", Input).value.replace(" ", "").split(",") if b]
        except ValueError:
            raise FormError("sweep bits must be a comma list of integers, e.g. 16,8,4") from None
        folders = [check_model(f.strip()) for f in self.query_one("#folders", Input).value.split(",") if f.strip()]
        if not bits and not folders:
            raise FormError("give folders to bench or sweep bits, e.g. 16,8,4,3,2")
        bad = [b for b in bits if b not in options.SWEEP_BITS]
        if bad:
            raise FormError(f"unsupported sweep bits {bad}: choose from {','.join(map(str, options.SWEEP_BITS))}")
        return {"model": check_model(self.query_one("#model", Input).value), "bits_list": bits, "folders": folders,
                "prompt_tokens": number(self, "prompt_tokens"), "gen_tokens": number(self, "gen_tokens"),
                "save": self.query_one("#save_json", Input).value.strip()}

    def call(self, args: dict, on_progress) -> dict:
        run_bench = backend("mlx_holo.bench", "run_bench")
        res = run_bench(args["model"], args["bits_list"], folders=args["folders"],
                        prompt_tokens=args["prompt_tokens"], gen_tokens=args["gen_tokens"], on_progress=on_progress)
        if args["save"]:
            Path(args["save"]).parent.mkdir(parents=True, exist_ok=True)
            Path(args["save"]).write_text(json.dumps(res, indent=2, default=str))
        return res

    def show(self, res: dict) -> None:
        rows = res.get("rows") or []
        table = self.query_one("#bench_rows", DataTable)
        table.clear()
        mb = lambda b: None if b is None else b / 2**20  # noqa: E731
        for r in rows:
            bw = r.get("bw_util")
            table.add_row(str(r.get("label", r.get("bits"))), fmt(r.get("bits_per_weight"), 3),
                          fmt(r.get("prefill_tps"), 4), fmt(r.get("decode_tps"), 4), fmt(r.get("ttft_s"), 3),
                          fmt(mb(r.get("peak_mem_bytes")), 4), fmt(mb(r.get("bytes_per_token")), 4),
                          fmt(None if bw is None else 100 * bw, 3))
        if res.get("note"):
            self.log_line(escape(res["note"]))
        plot = self.query_one("#bwplot", PlotextPlot)
        charts.draw_bandwidth(plot.plt, rows)
        plot.refresh()

    @on(Input.Submitted, "#bench_json")
    def load_bench(self, event: Input.Submitted) -> None:
        try:
            with open(os.path.expanduser(event.value)) as f:
                res = json.load(f)
            if not isinstance(res, dict) or "rows" not in res:
                raise ValueError("no 'rows' key")
        except (OSError, ValueError) as e:
            self.log_line(f"[red]cannot load bench JSON {escape(repr(event.value))}: {escape(str(e))}[/red]")
            return
        self.log_line(f"loaded {len(res['rows'])} rows from {escape(event.value)}")
        self.show(res)


class JsonTree(DirectoryTree):
    def filter_paths(self, paths):
        return [p for p in paths if p.is_dir() and not p.name.startswith(".") or p.suffix == ".json"]


def load_evidence(path: str) -> tuple[dict, str, list[str], str]:
    """-> (evidence, verdict, failures, note). The project's default gates are applied by mlx_holo.evidence (fail
    closed; the thresholds recorded in the file are not used) and evidence["gates"] shows those gate rows."""
    try:
        ev_mod = importlib.import_module("mlx_holo.evidence")
    except ImportError:
        ev_mod = None
    if ev_mod is not None:
        ev = ev_mod.load(path)
        verdict, failures = ev_mod.apply_gates(ev)  # the project's gates: policy, not the file's thresholds
        ev["gates"] = ev_mod.gate_results(ev, ev_mod.DEFAULT_GATES)
        note = ""
        if ev.get("verdict") not in (None, verdict):
            note = f"recorded verdict {ev.get('verdict')} differs from the gates' {verdict}"
        return ev, verdict, list(failures), note
    with open(path) as f:
        ev = json.load(f)
    failures = [g.get("metric", "?") for g in ev.get("gates") or [] if not g.get("passed")]
    return ev, ev.get("verdict", "NO-GO"), failures, "mlx_holo.evidence missing: showing the recorded verdict"


class EvidencePane(Vertical):
    def compose(self) -> ComposeResult:
        with Horizontal(classes="controls"):
            yield Label("Folder", classes="flabel")
            yield Input(self.app.evidence_dir, id="ev_folder", suggester=PathSuggester(), compact=True)
            yield Button("Open", id="ev_open", compact=True)
            yield Button("Compare", id="ev_compare_btn", compact=True,
                         tooltip="the run shown becomes A; the next one chosen is shown beside it (again: back)")
        with Horizontal(classes="body"):
            folder = self.app.evidence_dir
            yield JsonTree(folder if os.path.isdir(folder) else ".", id="ev_tree")
            with Vertical(classes="results"):
                yield VerdictBox("choose an evidence JSON", id="ev_verdict")
                yield Label("", id="ev_path")
                t = DataTable(id="ev_metrics", zebra_stripes=True, cursor_type="row")
                t.add_columns("field", "value")
                yield t
                c = DataTable(id="ev_compare", zebra_stripes=True, cursor_type="row")
                c.add_columns("field", "A", "B")
                c.display = False
                yield c
                g = DataTable(id="ev_gates", zebra_stripes=True, cursor_type="row")
                g.add_columns("gate", "op", "threshold", "value", "result")
                yield g

    @on(Button.Pressed, "#ev_open")
    @on(Input.Submitted, "#ev_folder")
    def open_folder(self) -> None:
        folder = os.path.expanduser(self.query_one("#ev_folder", Input).value.strip() or ".")
        if os.path.isfile(folder):
            self.show_file(folder)
            return
        if not os.path.isdir(folder):
            self.app.notify(escape(f"no folder {folder!r}"), severity="error")
            return
        self.query_one(JsonTree).path = folder

    @on(DirectoryTree.FileSelected)
    def file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.show_file(str(event.path))

    @on(Button.Pressed, "#ev_compare_btn")
    def toggle_compare(self) -> None:
        """First press: the run shown becomes A; the next run chosen is shown beside it. Again: one run."""
        if getattr(self, "compare_a", None) or not getattr(self, "shown", None):
            self.compare_a = None
            self.query_one("#ev_compare", DataTable).display = False
            self.query_one("#ev_metrics", DataTable).display = True
            self.query_one("#ev_gates", DataTable).display = True
            if not getattr(self, "shown", None):
                self.app.notify("open a run first, then press Compare and choose the second", severity="warning")
            return
        self.compare_a = self.shown
        self.app.notify(escape(f"A = {self.shown}; choose the run to compare with"))

    def show_compare(self, path_a: str, path_b: str) -> None:
        """Two runs side by side (``mlx_holo.evidence.compare``, the project's gates): what ``mlx-holo validate
        --compare A B`` prints."""
        ev_mod = importlib.import_module("mlx_holo.evidence")
        c = ev_mod.compare(ev_mod.load(path_a), ev_mod.load(path_b))
        t = self.query_one("#ev_compare", DataTable)
        t.clear()
        t.add_row("run", Text(os.path.basename(path_a)), Text(os.path.basename(path_b)))
        t.add_row("verdict", *(Text(v, style="bold green" if v == "GO" else "bold red") for v in c["verdicts"]))
        for k, (a, b) in list(c["size"].items()) + list(c["metrics"].items()):
            t.add_row(k, fmt(a), fmt(b))
        for g in c["gates"]:
            t.add_row(g["gate"], *(Text(fmt(v) + (" ok" if ok else " FAIL"), style="green" if ok else "red")
                                   for v, ok in ((g["a"], g["a_passed"]), (g["b"], g["b_passed"]))))
        for k, (a, b) in c["recipe"].items():
            t.add_row(f"recipe {k}", fmt(a), fmt(b))
        for r in c["comparable"]:
            t.add_row(Text("not comparable", style="bold red"), Text(r), "")
        self.query_one("#ev_metrics", DataTable).display = False
        self.query_one("#ev_gates", DataTable).display = False  # the gates are rows of the comparison
        t.display = True

    def show_file(self, path: str) -> None:
        try:
            ev, verdict, failures, note = load_evidence(path)
        except Exception as e:  # noqa: BLE001 - bad files are reported, not fatal
            self.app.notify(escape(f"{path}: {e}"), title="not evidence", severity="error")
            return
        self.shown = path
        if getattr(self, "compare_a", None) and path != self.compare_a:
            self.show_compare(self.compare_a, path)
        self.query_one("#ev_path", Label).update(Text(path + (f"  ({note})" if note else "")))
        self.query_one("#ev_verdict", VerdictBox).show(verdict, failures)
        t = self.query_one("#ev_metrics", DataTable)
        t.clear()
        model, r, b = ev.get("model") or {}, ev.get("recipe") or {}, ev.get("bytes") or {}
        rows = [("model", model.get("id")), ("recipe", " ".join(f"{k}={r[k]}" for k in
                                                                 ("method", "bits", "group_size", "sparsity",
                                                                  "bits_per_weight") if r.get(k) is not None)),
                ("ratio", ev.get("ratio")), ("bits/weight", ev.get("bits_per_weight")),
                ("bytes total", b.get("total")), ("bytes original", b.get("original"))]
        for k, v in (ev.get("metrics") or {}).items():
            if isinstance(v, list):
                v = f"{len(v)} layers, min {fmt(min(v))}" if v else "[]"
            rows.append((k, v))
        rows += [(f"time {k}", v) for k, v in (ev.get("timings") or {}).items()]
        rows.append(("peak memory", ev.get("peak_memory_bytes")))
        for k, v in rows:
            t.add_row(k, fmt(v))
        g = self.query_one("#ev_gates", DataTable)
        g.clear()
        for gate in ev.get("gates") or []:
            ok = bool(gate.get("passed"))
            g.add_row(str(gate.get("metric")), str(gate.get("op")), fmt(gate.get("threshold")), fmt(gate.get("value")),
                      Text("pass", style="bold green") if ok else Text("FAIL", style="bold red"))


class ParetoPane(Vertical):
    """Runs of an evidence folder: size (bits/weight, GB or ratio) against a log quality axis, the Pareto front
    joined, runs beyond the limit drawn as off-scale markers; a row opens its evidence; the chart follows the
    folder (checked every few seconds)."""

    def compose(self) -> ComposeResult:
        with Horizontal(classes="controls"):
            yield Label("Folder", classes="flabel")
            yield Input(self.app.evidence_dir, id="pf_folder", suggester=PathSuggester(), compact=True)
            yield Select([("bits/weight", "bits_per_weight"), ("model GB", "gb"), ("ratio", "ratio")],
                         value="bits_per_weight", allow_blank=False, id="pf_x", compact=True)
            yield Select([("delta PPL %", "delta_ppl_pct"), ("KL", "kl"), ("PPL", "ppl")], value="delta_ppl_pct",
                         allow_blank=False, id="pf_y", compact=True)
            yield Input("", placeholder="limit", type="number", id="pf_limit", compact=True,
                        tooltip="runs above this are drawn as off-scale markers (empty: the metric's default)")
            yield Button("Refresh", id="pf_refresh", compact=True)
        with Horizontal(classes="body"):
            yield PlotextPlot(id="pf_plot")
            t = DataTable(id="pf_table", zebra_stripes=True, cursor_type="row")
            t.add_columns("front", "y", "b/w", "GB", "run")
            yield t

    def on_mount(self) -> None:
        self.signature = None
        self.set_interval(3.0, self.follow_folder)

    def folder(self) -> str:
        return os.path.expanduser(self.query_one("#pf_folder", Input).value.strip() or ".")

    def folder_signature(self) -> tuple:
        sig = []
        for root, _dirs, files in os.walk(self.folder()):
            for name in files:
                if name.endswith(".json"):
                    try:
                        st = os.stat(os.path.join(root, name))
                    except OSError:
                        continue
                    sig.append((root, name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(sig))

    def follow_folder(self) -> None:
        if getattr(self, "points", None) is None:
            return
        sig = self.folder_signature()
        if sig != self.signature:
            self.refresh_chart(quiet=True)

    @on(Select.Changed, "#pf_y")
    @on(Select.Changed, "#pf_x")
    @on(Input.Submitted, "#pf_limit")
    def axes_changed(self) -> None:
        if getattr(self, "points", None) is not None:
            self.refresh_chart(quiet=True)

    @on(Button.Pressed, "#pf_refresh")
    @on(Input.Submitted, "#pf_folder")
    def refresh_pressed(self) -> None:
        self.refresh_chart()

    def limit(self, y_key: str) -> float | None:
        text = self.query_one("#pf_limit", Input).value.strip()
        try:
            return float(text) if text else charts.DEFAULT_LIMITS.get(y_key)
        except ValueError:
            return charts.DEFAULT_LIMITS.get(y_key)

    def refresh_chart(self, quiet: bool = False) -> None:
        folder = self.folder()
        y_key = self.query_one("#pf_y", Select).value
        x_key = self.query_one("#pf_x", Select).value
        self.signature = self.folder_signature()
        self.points = charts.evidence_points(folder)
        plot = self.query_one("#pf_plot", PlotextPlot)
        limit = self.limit(y_key)
        mask = charts.draw_pareto(plot.plt, self.points, y_key, x_key, limit)
        plot.refresh()
        t = self.query_one("#pf_table", DataTable)
        t.clear()
        order = sorted(zip(self.points, mask), key=lambda pm: (not pm[1], pm[0].get(y_key) is None,
                                                                pm[0].get(y_key) or 0))
        self.rows = [p["path"] for p, _ in order]
        for p, m in order:
            y = p.get(y_key)
            mark = Text("*", style="bold green") if m else (
                Text("off", style="red") if limit is not None and isinstance(y, (int, float)) and y > limit else "")
            t.add_row(mark, fmt(y, 3), fmt(p.get("bits_per_weight"), 3), fmt(p.get("gb"), 3), p["label"])
        if not self.points and not quiet:
            self.app.notify(escape(f"no evidence JSON under {folder!r}"), severity="warning")

    @on(DataTable.RowSelected, "#pf_table")
    def open_run(self, event: DataTable.RowSelected) -> None:
        """Enter on a run: its evidence in the Evidence tab."""
        path = self.rows[event.cursor_row]
        self.app.query_one(TabbedContent).active = "evidence"
        self.app.query_one(EvidencePane).show_file(path)


class PlannerPane(Vertical):
    def compose(self) -> ComposeResult:
        with Grid(classes="form"):
            yield from field("Model", Input("default", placeholder="default, config.json or model folder",
                                            id="pl_model", suggester=PathSuggester(files=True), compact=True))
            yield from field("Target GB", Input("8", type="number", id="pl_target", compact=True))
            yield from field("Context", Input("4096", type="integer", id="pl_context", compact=True))
            yield from field("Batch", Input("1", type="integer", id="pl_batch", compact=True))
            yield from field("KV bits", Select([("16", 16), ("8", 8), ("4", 4)], value=16, allow_blank=False,
                                               id="pl_kv", compact=True))
            yield from field("Group", Select([("32", 32), ("64", 64), ("128", 128)], value=64, allow_blank=False,
                                             id="pl_group", compact=True))
            yield from field("Usable", Input(str(planner.DEFAULT_USABLE_FRACTION), type="number", id="pl_usable",
                                             tooltip="share of unified memory the GPU may wire (macOS ~0.75)",
                                             compact=True))
            yield Button("Compute", id="pl_compute", variant="primary", compact=True)
        yield Static("", id="pl_message", classes="verdict")
        yield Label("", id="pl_params")
        t = DataTable(id="pl_table", zebra_stripes=True, cursor_type="row")
        t.add_columns("bits", "bits/wt", "weights GiB", "KV GiB", "act GiB", "total GiB", "fits (GB)")
        yield t

    @on(Button.Pressed, "#pl_compute")
    @on(Input.Submitted, "#pl_model, #pl_target, #pl_context, #pl_batch, #pl_usable")
    def compute(self) -> None:
        msg = self.query_one("#pl_message", Static)
        try:
            model = self.query_one("#pl_model", Input).value.strip() or "default"
            target = self.query_one("#pl_target", Input).value.strip()
            res = planner.plan(planner.load_config(os.path.expanduser(model)),
                               context=number(self, "pl_context"), batch=number(self, "pl_batch"),
                               target_gb=float(target) if target else None,
                               kv_bits=self.query_one("#pl_kv", Select).value,
                               group_size=self.query_one("#pl_group", Select).value,
                               usable_fraction=number(self, "pl_usable", float), model=model)
        except (planner.PlanError, ValueError, OSError) as e:
            msg.set_classes("verdict nogo")
            msg.update(Text(f"error: {e}" if str(e) else "error: fill in every number"))
            return
        self.result = res
        msg.set_class(res.fits is True, "go")
        msg.set_class(res.fits is False, "nogo")
        text = res.message + (f"\nrecipe: {json.dumps(res.recipe)}" if res.recipe else "")
        for name, est in compress_memory(planner.load_config(os.path.expanduser(model))).items():
            text += f"\ncompressing with {name}: about {est['peak_bytes'] / 1e9:.1f} GB at its peak ({est['peak_phase']})"
        msg.update(Text(text))
        p = res.params
        self.query_one("#pl_params", Label).update(Text(
            f"{p.total:,} params = embedding {si(p.embedding)} + attention {si(p.attention)} + mlp {si(p.mlp)}"
            f" + norms {si(p.norms)} + lm_head {si(p.lm_head)}"))
        t = self.query_one("#pl_table", DataTable)
        t.clear()
        gib = planner.GIB
        for r in res.rows:
            t.add_row("fp16" if r.bits >= 16 else str(r.bits), f"{r.bits_per_weight:.2f}", f"{r.weight_bytes / gib:.3f}",
                      f"{r.kv_bytes / gib:.3f}", f"{r.activation_bytes / gib:.3f}", f"{r.total_gb:.3f}",
                      ",".join(map(str, r.fits_gb)) or Text("none", style="red"))


class HoloApp(App):
    """The workbench: one tab per task."""

    CSS_PATH = "app.tcss"
    TITLE = "mlx-holo"
    SUB_TITLE = "compress / evaluate / bench / evidence / plan"
    TABS = ("compress", "evaluate", "bench", "evidence", "pareto", "planner")
    BINDINGS = [
        Binding("ctrl+r", "run", "Run"),
        Binding("ctrl+s", "cancel", "Cancel"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ] + [Binding(f"f{i + 1}", f"tab('{name}')", name.capitalize(), show=False) for i, name in enumerate(TABS)]

    def __init__(self, initial_tab: str = "compress", evidence_dir: str | None = None) -> None:
        super().__init__()
        if initial_tab not in self.TABS:
            raise ValueError(f"unknown tab {initial_tab!r}; choose one of {self.TABS}")
        self.initial_tab = initial_tab
        self.evidence_dir = evidence_dir or "evidence"

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial=self.initial_tab):
            with TabPane("F1 Compress", id="compress"):
                yield CompressPane(id="compress_pane")
            with TabPane("F2 Evaluate", id="evaluate"):
                yield EvaluatePane(id="evaluate_pane")
            with TabPane("F3 Bench", id="bench"):
                yield BenchPane(id="bench_pane")
            with TabPane("F4 Evidence", id="evidence"):
                yield EvidencePane(id="evidence_pane")
            with TabPane("F5 Pareto", id="pareto"):
                yield ParetoPane(id="pareto_pane")
            with TabPane("F6 Planner", id="planner"):
                yield PlannerPane(id="planner_pane")
        yield Footer()

    def action_tab(self, name: str) -> None:
        tabs = self.query_one(TabbedContent)
        tabs.active = name
        first = [w for w in tabs.get_pane(name).query("*") if w.focusable]
        if first:
            self.call_after_refresh(first[0].focus)
        if name == "pareto":
            self.query_one(ParetoPane).refresh_chart()

    async def action_quit(self) -> None:
        """Quit at once: every running job is cancelled first (its worker stops at its next progress step) instead
        of the screen waiting, blank, for a long evaluation to end."""
        for job in self.query(JobPane):
            job.cancel_event.set()
        self.exit()

    def _active_job(self) -> JobPane | None:
        pane = self.query_one(TabbedContent).active_pane
        jobs = list(pane.query(JobPane)) if pane else []
        return jobs[0] if jobs else None

    def action_run(self) -> None:
        job = self._active_job()
        if job is not None:
            job.action_run()
        elif self.query_one(TabbedContent).active == "planner":
            self.query_one(PlannerPane).compute()
        elif self.query_one(TabbedContent).active == "pareto":
            self.query_one(ParetoPane).refresh_chart()
        elif self.query_one(TabbedContent).active == "evidence":
            self.query_one(EvidencePane).open_folder()

    def action_cancel(self) -> None:
        job = self._active_job()
        if job is not None:
            job.action_cancel()

    @on(TabbedContent.TabActivated)
    def tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id == "pareto" and not getattr(self.query_one(ParetoPane), "points", None):
            self.query_one(ParetoPane).refresh_chart()
