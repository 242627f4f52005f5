"""mlx-holo validate (python -m mlx_holo.validate) FILE... : check evidence under a policy of gates.

Gates are policy: the ones given here (--gate, repeatable, or --policy FILE), by default the project's defaults --
never the thresholds recorded in the file. Every file must match the schema, every figure that can be re-derived
(delta_ppl_pct, ratio, bits/weight, cos_min, the byte total) must agree, and every value must be possible.
--folder DIR also checks the output files against the hashes the evidence recorded. Exit 0 only when every file is
GO; 1 when any is NO-GO; 2 on bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import evidence


def policy_gates(args) -> list[str]:
    """--gate flags, else the gates of --policy (a JSON list, or a JSON/TOML object with a "gates" list), else the
    defaults; each parsed here so a malformed one is a usage error."""
    gates = list(args.gate or [])
    if args.policy:
        text = Path(args.policy).read_text(encoding="utf-8")
        try:
            d = json.loads(text)
        except ValueError:
            import tomllib
            d = tomllib.loads(text)
        gates += d if isinstance(d, list) else d.get("gates", []) if isinstance(d, dict) else []
    gates = gates or list(evidence.DEFAULT_GATES)
    for g in gates:
        if not isinstance(g, str):
            raise evidence.EvidenceError(f"a gate is a string like cos_min>=0.9, got {g!r}")
        evidence.parse_gate(g)
    return gates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mlx-holo validate", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="evidence JSON files")
    ap.add_argument("--gate", action="append", default=None,
                    help="a policy gate (repeatable), e.g. --gate cos_min>=0.95; default: the project's gates")
    ap.add_argument("--policy", default=None, help="a file of gates: a JSON list, or {\"gates\": [...]} (JSON/TOML)")
    ap.add_argument("--folder", default=None, help="check the output files against the recorded hashes (one "
                    "evidence file; default with a single file: none)")
    args = ap.parse_args(argv)
    try:
        gates = policy_gates(args)
    except (evidence.EvidenceError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.folder and len(args.files) != 1:
        print("error: --folder checks one evidence file", file=sys.stderr)
        return 2
    bad = 0
    for f in args.files:
        try:
            ev = evidence.load(f)
            verdict, failures = evidence.apply_gates(ev, gates)
            if args.folder:
                diffs = evidence.check_folder(ev, args.folder)
                failures += [f"folder: {d}" for d in diffs]
                verdict = "NO-GO" if diffs else verdict
        except evidence.EvidenceError as e:
            verdict, failures = "NO-GO", [str(e)]
        bad += verdict != "GO"
        print(f"{verdict}  {f}")
        for msg in failures:
            print(f"    {msg}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
