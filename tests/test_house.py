"""The house's rules (docs/architecture.md), checked on the source: imports run downward with no cycle, no private
name crosses a file, the quantizers and pruners import neither the pipeline nor a CLI, the MLX-free modules stay
MLX-free, and the public API and the recipe's generated flags work."""
import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"mlx_holo": ROOT / "mlx_holo", "mlx_holo.kernels": ROOT / "kernels", "mlx_holo.tui": ROOT / "tui",
         "mlx_holo.schemas": ROOT / "schemas"}
ENV = {**os.environ, "MLX_HOLO_NO_REEXEC": "1"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in ROOTS.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "mlx_holo" and parts and parts[0] in ("kernels", "tui", "schemas"):
                continue
            out[name] = f
    return out


def _is_main_guard(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and getattr(node.test.left, "id", None) == "__name__")


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import of the file outside an ``if __name__ == "__main__"`` block."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip = {id(n) for node in ast.walk(tree) if _is_main_guard(node) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    g = {m: set() for m in mods}
    for m, path in mods.items():
        for mod, names in imports(m, path):
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods]  # ``from pkg import submodule``
            g[m].update(subs)
            if mod in mods and (not names or len(subs) < len(names)):
                g[m].add(mod)
    return g


def test_every_module_is_found():
    mods = modules()
    for m in ("mlx_holo.compression", "mlx_holo.model.open", "mlx_holo.pipeline.run", "mlx_holo.cli.main",
              "mlx_holo.tune.e2e", "mlx_holo.allocate.mixed", "mlx_holo.kernels.quant_matvec", "mlx_holo.tui.app"):
        assert m in mods, m


def test_no_import_cycle():
    g = graph()
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in sccs if len(c) > 1 or c[0] in g[c[0]]]
    assert not cycles, cycles


def test_cycle_detector_sees_a_cycle(monkeypatch):
    """The cycle test can fail: two modules importing each other (lazily, inside a function) are a cycle."""
    real = graph()
    fake = dict(real)
    fake["mlx_holo.quant.rtn"] = real["mlx_holo.quant.rtn"] | {"mlx_holo.pipeline.layer"}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: fake)
    with pytest.raises(AssertionError):
        test_no_import_cycle()


def test_quantizers_and_pruners_import_no_pipeline_or_cli():
    g = graph()
    for m, deps in g.items():
        if m.startswith(("mlx_holo.quant", "mlx_holo.prune", "mlx_holo.model", "mlx_holo.tune")):
            bad = [d for d in deps if d.startswith(("mlx_holo.pipeline", "mlx_holo.cli", "mlx_holo.compression",
                                                    "mlx_holo.allocate"))]
            assert not bad, (m, bad)


def test_no_private_name_crosses_a_file():
    mods = modules()
    bad = []
    for m, path in mods.items():
        for mod, names in imports(m, path):
            if mod.startswith("mlx_holo"):
                bad += [(m, mod, n) for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_mlx_free_modules():
    """The planner, the recipe, evidence and the TUI's constants load without MLX (the TUI starts fast)."""
    code = ("import sys; import mlx_holo.options, mlx_holo.recipe, mlx_holo.plan, mlx_holo.evidence, "
            "mlx_holo.cli.common, mlx_holo.cli.main; import mlx_holo.tui.app; "
            "bad = [m for m in sys.modules if m.startswith('mlx.') or m == 'mlx']; print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tui_constants_come_from_options():
    from mlx_holo import options
    from mlx_holo.tui import app

    assert set(app.METHODS) == set(options.METHODS) - {"none"}
    assert app.BITS[:-1] == tuple(map(str, options.AFFINE_BITS))


def test_public_api():
    code = ("import mlx_holo; from mlx_holo import compress, evaluate, Recipe; import inspect; "
            "assert inspect.isfunction(compress) and inspect.isfunction(evaluate); "
            "assert mlx_holo.compress is compress and mlx_holo.evaluate is evaluate; "
            "r = Recipe(method='gptq'); assert r.validate() is r; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_every_recipe_field_has_a_flag():
    from mlx_holo.cli.compress import build_parser
    from mlx_holo.recipe import Recipe

    dests = {a.dest for a in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(Recipe)} <= dests


def test_flags_give_the_recipe_and_toml_round_trips(tmp_path):
    from mlx_holo.cli.common import recipe_from_args
    from mlx_holo.cli.compress import parse
    from mlx_holo.recipe import Recipe

    r = Recipe(method="mixed", bits=3, bits_per_weight=3.5, candidate_groups=(32, 128), act_order=False,
               sensitivity="fisher", quantize_embeddings=False, calib_corpus="wiki")
    assert recipe_from_args(parse(["--out", "x", *r.to_args()])) == r
    assert recipe_from_args(parse(["--out", "x"])) == Recipe()
    p = tmp_path / "r.toml"
    p.write_text(r.to_toml())
    assert Recipe.from_toml(p) == r
    # --recipe sets the defaults; a flag given beside it wins
    got = recipe_from_args(parse(["--out", "x", "--recipe", str(p), "--bits", "4"]))
    assert got == dataclasses.replace(r, bits=4)


def test_recipe_from_evidence_repeats_the_recorded_recipe(tmp_path):
    from mlx_holo.recipe import Recipe, RecipeError

    ev = json.loads((ROOT / "evidence" / "quality" / "gptq4-default-rerun.json").read_text())
    p = tmp_path / "ev.json"
    p.write_text(json.dumps(ev))
    r = Recipe.load(p)  # an evidence file written before calib_corpus was a field: defaults fill it in
    assert (r.method, r.bits, r.group_size, r.calib_tokens) == ("gptq", 4, 64, 8192)
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "gptq"\nbits = "four"\n')
    with pytest.raises(RecipeError, match="bits must be a int"):
        Recipe.load(bad)
    bad.write_text('methd = "gptq"\n')
    with pytest.raises(RecipeError, match="unknown recipe keys"):
        Recipe.load(bad)


def test_compress_cli_bad_recipe_file_is_exit_2(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("bits = 7\n")
    r = subprocess.run([sys.executable, "-m", "mlx_holo.compress", "--recipe", str(bad), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "bits=7 is not supported" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
