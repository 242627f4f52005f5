"""Regenerate the TUI screenshots the docs show: ``python -m mlx_holo.tui.screenshots [--evidence DIR] [--out DIR]``.

Each tab is driven by Textual's pilot at 120x34 over the evidence folder (default: ``evidence/quality``) and saved
as SVG: the Compress form with a goal preset applied, the Evidence view comparing two runs, the Pareto chart, the
Planner. Nothing is compressed or evaluated (no MLX work runs).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

SIZE = (120, 34)


async def shoot(evidence: str, out: str) -> list[str]:
    from .app import EvidencePane, HoloApp, ParetoPane, PlannerPane

    written = []

    async def save(app, pilot, name):
        await pilot.pause(0.3)
        path = os.path.join(out, f"tui-{name}.svg")
        with open(path, "w", encoding="utf-8") as f:
            f.write(app.export_screenshot())
        written.append(path)

    runs = sorted(os.path.join(r, n) for r, _, fs in os.walk(evidence) for n in fs if n.endswith(".json"))
    app = HoloApp(initial_tab="compress", evidence_dir=evidence)
    async with app.run_test(size=SIZE) as pilot:
        pane = app.query_one("#compress_pane")
        pane.query_one("#goal_target").value = "4"
        pane.query_one("#goal").value = "best"
        await save(app, pilot, "compress-goal")
        await pilot.press("f5")
        app.query_one(ParetoPane).refresh_chart(quiet=True)
        await save(app, pilot, "pareto")
        if len(runs) >= 2:
            await pilot.press("f4")
            ev = app.query_one(EvidencePane)
            ev.show_file(runs[0])
            ev.toggle_compare()
            ev.show_file(runs[1])
            await save(app, pilot, "evidence-compare")
        await pilot.press("f6")
        app.query_one(PlannerPane).compute()
        await save(app, pilot, "planner")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_holo.tui.screenshots", description=__doc__.splitlines()[0])
    ap.add_argument("--evidence", default="evidence/quality", help="evidence folder the Pareto and Evidence tabs read")
    ap.add_argument("--out", default="docs/screenshots", help="folder for the SVG files")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for path in asyncio.run(shoot(args.evidence, args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
