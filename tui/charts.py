"""Chart data for the TUI: the size-vs-quality Pareto front and bandwidth utilisation per bit-width.

`pareto_front` is a pure function; `evidence_points` reads evidence JSON files (plain json, no MLX);
the `draw_*` functions only call a plotext-like `plt` object (textual-plotext's `PlotextPlot.plt`).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

Y_KEYS = ("delta_ppl_pct", "kl", "ppl")
X_KEYS = ("bits_per_weight", "gb", "ratio")          # bits/weight and model GB: less is better; ratio: more
DEFAULT_LIMITS = {"delta_ppl_pct": 1000.0, "kl": 5.0, "ppl": None}  # beyond: drawn as off-scale markers
LOG_FLOOR = {"delta_ppl_pct": 0.01, "kl": 1e-4, "ppl": 1e-3}        # a log axis needs > 0 (a gain draws here)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: Sequence[tuple[float | None, float | None]], maximize_x: bool = True) -> list[bool]:
    """points: [(x, loss)] -> mask of Pareto-optimal points (x maximised -- a compression ratio -- or, with
    ``maximize_x=False``, minimised -- bits/weight, GB; loss minimised).

    A point is optimal when no other point is at least as good on both with at least one strict. Points with a
    missing/non-finite coordinate are never optimal and never dominate. Equal points are all optimal.
    """
    sign = 1.0 if maximize_x else -1.0
    pts = [(sign * x if _finite(x) else x, y) for x, y in points]
    ok = [_finite(x) and _finite(y) for x, y in pts]
    mask = []
    for i, (x, y) in enumerate(pts):
        if not ok[i]:
            mask.append(False)
            continue
        dominated = any(ok[j] and j != i and xj >= x and yj <= y and (xj > x or yj < y)
                        for j, (xj, yj) in enumerate(pts))
        mask.append(not dominated)
    return mask


def run_label(recipe: dict, bits_per_weight, folder: str) -> str:
    """What tells runs apart: the output folder, method, bits (or sparsity), group size and bits/weight, e.g.
    ``smollm2-gptq4: gptq4 g64 4.50b/w``."""
    label = str(recipe.get("method", "?"))
    if isinstance(recipe.get("bits"), int):
        label += f"{recipe['bits']}"
    if isinstance(recipe.get("sparsity"), (int, float)) and recipe["sparsity"]:
        label += f"s{recipe['sparsity']:g}"
    if isinstance(recipe.get("nm"), str) and recipe["nm"]:
        label += f" {recipe['nm']}"
    if recipe.get("method") == "mixed" and isinstance(recipe.get("bits_per_weight"), (int, float)):
        label += f"@{recipe['bits_per_weight']:g}"
    if isinstance(recipe.get("group_size"), int):
        label += f" g{recipe['group_size']}"
    if _finite(bits_per_weight):
        label += f" {bits_per_weight:.2f}b/w"
    return f"{folder}: {label}" if folder else label  # the run first: what a narrow column still shows


def evidence_points(folder: str) -> list[dict]:
    """Every evidence JSON under folder (recursive) -> [{label, kind, path, bits_per_weight, gb, ratio, ppl,
    delta_ppl_pct, kl, verdict}]; kind is the short method+bits name, label adds what tells runs apart
    (``run_label``: group size, bits/weight, the output folder -- or the evidence file's name).

    Files that are not evidence (no "ratio" or no "metrics") or do not parse are skipped.
    """
    pts = []
    if not os.path.isdir(folder):
        return pts
    for root, _dirs, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if not name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    ev = json.load(f)
            except (OSError, ValueError, RecursionError):  # unreadable, not JSON, too deeply nested
                continue
            if not isinstance(ev, dict) or "ratio" not in ev or not isinstance(ev.get("metrics"), dict):
                continue
            m, r = ev["metrics"], ev.get("recipe") if isinstance(ev.get("recipe"), dict) else {}
            out = ev.get("output") if isinstance(ev.get("output"), dict) else {}
            where = os.path.basename(str(out.get("path", "")).rstrip("/")) if out.get("path") else ""
            if not where or name != "evidence.json":  # a copied evidence file is named for its run
                where = name[:-5] if name != "evidence.json" else os.path.basename(root)
            b = ev.get("bytes") if isinstance(ev.get("bytes"), dict) else {}
            bpw = ev.get("bits_per_weight")
            pts.append({"label": run_label(r, bpw, where), "kind": run_label(r, None, "").split(" ")[0],
                        "path": path, "bits_per_weight": bpw if _finite(bpw) else None,
                        "gb": b["total"] / 1e9 if _finite(b.get("total")) else None, "ratio": ev.get("ratio"),
                        "ppl": m.get("ppl"), "delta_ppl_pct": m.get("delta_ppl_pct"), "kl": m.get("kl"),
                        "verdict": ev.get("verdict")})
    return pts


def placed(points: list[dict], y_key: str, limit: float | None) -> list[dict]:
    """Where each point is drawn on a log axis: {x, y, off} -- y floored at LOG_FLOOR (a run better than its base
    has a negative delta-PPL) and capped at ``limit`` (off = True: an off-scale marker at the top edge)."""
    floor = LOG_FLOOR.get(y_key, 1e-6)
    out = []
    for p in points:
        y = p.get(y_key)
        if not _finite(y):
            out.append({"y": None, "off": False})
            continue
        off = limit is not None and y > limit
        out.append({"y": limit if off else max(y, floor), "off": off})
    return out


def draw_pareto(plt, points: list[dict], y_key: str = "delta_ppl_pct", x_key: str = "bits_per_weight",
                limit: float | None = None) -> list[bool]:
    """Scatter all points on a log quality axis, highlight and join the Pareto-optimal ones, draw runs beyond
    ``limit`` as off-scale markers at the top edge (they would squeeze the rest into one row); returns the
    optimal mask."""
    mask = pareto_front([(p.get(x_key), p.get(y_key)) for p in points], maximize_x=x_key == "ratio")
    where = placed(points, y_key, limit)
    plt.clear_data()
    plt.clear_figure()
    names = {"bits_per_weight": "bits/weight", "gb": "model GB", "ratio": "compression ratio (x)"}
    plt.title(f"{y_key} (log) vs {names[x_key]}; Pareto front highlighted")
    plt.xlabel(names[x_key])
    plt.ylabel(y_key + " (log)")
    plt.yscale("log")
    ok = [_finite(p.get(x_key)) and w["y"] is not None for p, w in zip(points, where)]
    rest = [(p[x_key], w["y"]) for p, w, m, k in zip(points, where, mask, ok) if k and not m and not w["off"]]
    off = [(p[x_key], w["y"]) for p, w, k in zip(points, where, ok) if k and w["off"]]
    front = sorted((p[x_key], w["y"]) for p, w, m, k in zip(points, where, mask, ok) if k and m)
    if rest:
        plt.scatter([x for x, _ in rest], [y for _, y in rest], marker="dot", label="dominated")
    if off:
        plt.scatter([x for x, _ in off], [y for _, y in off], marker="^", color="red",
                    label=f"off-scale (> {limit:g}): {len(off)}")
    if front:
        plt.plot([x for x, _ in front], [y for _, y in front], marker="braille", color="green", label="Pareto front")
        plt.scatter([x for x, _ in front], [y for _, y in front], marker="O", color="green")
    return mask


def draw_bandwidth(plt, rows: list[dict]) -> None:
    """Bandwidth utilisation (%) vs bits/weight from bench rows ({bits_per_weight (or bits), bw_util (fraction),
    label}), one labelled point per entry."""
    def x_of(r):
        return r.get("bits_per_weight") if _finite(r.get("bits_per_weight")) else r.get("bits")

    rows = sorted((r for r in rows if _finite(x_of(r)) and _finite(r.get("bw_util"))), key=x_of)
    plt.clear_data()
    plt.clear_figure()
    plt.title("decode bandwidth utilisation vs bits/weight")
    plt.xlabel("bits/weight")
    plt.ylabel("% of peak")
    if rows:
        for r in rows:  # one series a point: the legend names the entries
            plt.scatter([x_of(r)], [100.0 * r["bw_util"]], marker="O", label=str(r.get("label", r.get("bits"))))
