"""Chart data for the TUI: the ratio-vs-quality Pareto front and bandwidth utilisation per bit-width.

`pareto_front` is a pure function; `evidence_points` reads evidence JSON files (plain json, no MLX);
the `draw_*` functions only call a plotext-like `plt` object (textual-plotext's `PlotextPlot.plt`).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

Y_KEYS = ("delta_ppl_pct", "ppl", "kl")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """points: [(ratio, loss)] -> mask of Pareto-optimal points (maximise ratio, minimise loss).

    A point is optimal when no other point has ratio >= and loss <= with at least one strict. Points with a
    missing/non-finite coordinate are never optimal and never dominate. Equal points are all optimal.
    """
    ok = [_finite(x) and _finite(y) for x, y in points]
    mask = []
    for i, (x, y) in enumerate(points):
        if not ok[i]:
            mask.append(False)
            continue
        dominated = any(ok[j] and j != i and xj >= x and yj <= y and (xj > x or yj < y)
                        for j, (xj, yj) in enumerate(points))
        mask.append(not dominated)
    return mask


def evidence_points(folder: str) -> list[dict]:
    """Every evidence JSON under folder (recursive) -> [{label, path, ratio, ppl, delta_ppl_pct, kl, verdict}].

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
            label = str(r.get("method", "?"))
            if isinstance(r.get("bits"), int):
                label += f"{r['bits']}"
            if isinstance(r.get("sparsity"), (int, float)) and r["sparsity"]:
                label += f"s{r['sparsity']:g}"
            if r.get("method") == "mixed" and isinstance(r.get("bits_per_weight"), (int, float)):
                label += f"@{r['bits_per_weight']:g}"
            pts.append({"label": label, "path": path, "ratio": ev.get("ratio"), "ppl": m.get("ppl"),
                        "delta_ppl_pct": m.get("delta_ppl_pct"), "kl": m.get("kl"), "verdict": ev.get("verdict")})
    return pts


def draw_pareto(plt, points: list[dict], y_key: str = "delta_ppl_pct") -> list[bool]:
    """Scatter all points, highlight and join the Pareto-optimal ones; returns the optimal mask."""
    mask = pareto_front([(p.get("ratio"), p.get(y_key)) for p in points])
    plt.clear_data()
    plt.clear_figure()
    plt.title(f"compression ratio vs {y_key} (Pareto front highlighted)")
    plt.xlabel("compression ratio (x)")
    plt.ylabel(y_key)
    rest = [p for p, m in zip(points, mask) if not m and _finite(p.get("ratio")) and _finite(p.get(y_key))]
    front = sorted((p for p, m in zip(points, mask) if m), key=lambda p: p["ratio"])
    if rest:
        plt.scatter([p["ratio"] for p in rest], [p[y_key] for p in rest], marker="dot", label="dominated")
    if front:
        plt.plot([p["ratio"] for p in front], [p[y_key] for p in front], marker="braille", color="green",
                 label="Pareto front")
        plt.scatter([p["ratio"] for p in front], [p[y_key] for p in front], marker="O", color="green")
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
