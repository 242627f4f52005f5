"""mlx-holo validate (python -m mlx_holo.validate) FILE... : validate evidence against the schema and re-apply its gates.

Exit status 0 only when every file validates and every gate passes (fail closed: a missing metric fails).
"""
from __future__ import annotations

import argparse
import sys

from .. import evidence


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mlx-holo validate", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="evidence JSON files")
    ap.add_argument("--gate", action="append", default=None,
                    help="replace the recorded gates with these (repeatable), e.g. --gate cos_min>=0.95")
    args = ap.parse_args(argv)
    bad = 0
    for f in args.files:
        try:
            ev = evidence.load(f)
            if args.gate:
                ev["gates"] = evidence.gate_results(ev, args.gate)
                ev.pop("verdict", None)
            verdict, failures = evidence.apply_gates(ev)
        except evidence.EvidenceError as e:
            verdict, failures = "NO-GO", [str(e)]
        bad += verdict != "GO"
        print(f"{verdict}  {f}")
        for msg in failures:
            print(f"    {msg}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
