"""mlx-holo validate (python -m mlx_holo.validate) FILE... : check evidence under a policy of gates.

Gates are policy: the ones given here (--gate, repeatable, or --policy FILE), by default the project's defaults --
never the thresholds recorded in the file. Every file must match the schema, every figure that can be re-derived
(delta_ppl_pct, ratio, bits/weight, cos_min, the byte total) must agree, and every value must be possible.
--folder DIR also checks the output files against the hashes the evidence recorded; --rescore (with --folder)
measures the folder again against the recorded base on the recorded evaluation text and compares every metric
within RESCORE_TOLERANCE (different machines round differently: about 0.5% in PPL has been seen). --compare A B
prints two files side by side (``evidence.compare``). Exit 0 only when every file is GO; 1 when any is NO-GO; 2 on
bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import evidence
from .common import run_guarded

# metric -> relative tolerance of a re-measurement (another machine's arithmetic, not another model)
RESCORE_TOLERANCE = {"ppl": 0.01, "base_ppl": 0.01, "kl": 0.05, "top1": 0.01, "cos_min": 0.005}


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


def rescore(ev: dict, folder: str) -> list[str]:
    """Measure ``folder`` again against the recorded base on the recorded evaluation corpus and tokens -> the metrics
    that moved beyond RESCORE_TOLERANCE (the base's hash is checked first)."""
    from ..evaluation import evaluate
    from .eval import recorded_base

    base = recorded_base(ev, Path(folder) / "evidence.json")
    corpus = (ev.get("corpora") or {}).get("evaluation") or {}
    m = ev.get("metrics") or {}
    if not base or not corpus.get("name") or not m.get("seq_len"):
        return ["the evidence does not say which base and text it was scored on: cannot rescore"]
    new = evaluate(folder, base, eval_tokens=int(corpus["tokens"]), seq_len=int(m["seq_len"]), corpus=corpus["name"])
    out = []
    for k, tol in RESCORE_TOLERANCE.items():
        a, b = m.get(k), new.get(k)
        if a is None or b is None or abs(a - b) > tol * max(abs(a), abs(b), 1e-12):
            out.append(f"rescore: {k} recorded {a!r}, measured {b!r} (tolerance {tol:.1%})")
    return out


def main(argv=None) -> int:
    return run_guarded(lambda: _main(argv))


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="mlx-holo validate", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="evidence JSON files")
    ap.add_argument("--gate", action="append", default=None,
                    help="a policy gate (repeatable), e.g. --gate cos_min>=0.95; default: the project's gates")
    ap.add_argument("--policy", default=None, help="a file of gates: a JSON list, or {\"gates\": [...]} (JSON/TOML)")
    ap.add_argument("--folder", default=None, help="check the output files against the recorded hashes (one "
                    "evidence file)")
    ap.add_argument("--rescore", action="store_true", help="with --folder: measure the metrics again and compare")
    ap.add_argument("--compare", action="store_true", help="two evidence files side by side: recipe fields that "
                    "differ, metrics, size, the policy's gates (exit as for validate)")
    args = ap.parse_args(argv)
    try:
        gates = policy_gates(args)
    except (evidence.EvidenceError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.folder and len(args.files) != 1) or (args.rescore and not args.folder):
        print("error: --folder checks one evidence file; --rescore needs --folder", file=sys.stderr)
        return 2
    if args.compare:
        if len(args.files) != 2 or args.folder:
            print("error: --compare takes exactly two evidence files (and no --folder)", file=sys.stderr)
            return 2
        a, b = (evidence.load(f) for f in args.files)
        c = evidence.compare(a, b, gates)
        print(evidence.format_compare(c, tuple(Path(f).parent.name or f for f in args.files)
                                      if Path(args.files[0]).name == Path(args.files[1]).name else tuple(args.files)))
        return 0 if c["verdicts"] == ("GO", "GO") else 1
    bad = 0
    for f in args.files:
        try:
            ev = evidence.load(f)
            verdict, failures = evidence.apply_gates(ev, gates)
            if args.folder:
                diffs = evidence.check_folder(ev, args.folder)
                if args.rescore and not diffs:
                    diffs = rescore(ev, args.folder)
                failures += [f"folder: {d}" for d in diffs]
                verdict = "NO-GO" if diffs else verdict
        except (evidence.EvidenceError, OSError) as e:
            verdict, failures = "NO-GO", [str(e)]
        except Exception as e:  # noqa: BLE001 - a model that cannot be opened for --rescore, say
            verdict, failures = "NO-GO", [f"{type(e).__name__}: {e}"]
        bad += verdict != "GO"
        print(f"{verdict}  {f}")
        for msg in failures:
            print(f"    {msg}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
