"""`python -m mlx_holo.tui` / `mlx-holo tui`: start the workbench TUI."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlx-holo tui", description="mlx-holo workbench TUI")
    ap.add_argument("--tab", default="compress", help="tab to open: compress, evaluate, bench, evidence, pareto, planner")
    ap.add_argument("--evidence", default=None, help="evidence folder for the Evidence and Pareto tabs")
    args = ap.parse_args(argv)
    from .app import HoloApp

    HoloApp(initial_tab=args.tab, evidence_dir=args.evidence).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
