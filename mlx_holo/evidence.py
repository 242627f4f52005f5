"""Evidence: build the record of a run, validate it against schemas/, apply gates -> GO/NO-GO (fail closed).

A gate is ``metric op threshold`` (e.g. ``cos_min>=0.9``). A gate whose metric is missing or null fails. The verdict
is GO only when the evidence validates, there is at least one gate, and every gate passes. ``apply_gates``
recomputes every gate from the metrics, so an edited ``passed`` flag or verdict cannot turn a failure into a pass.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import re
from importlib import resources
from pathlib import Path

SCHEMA_VERSION = "1"
DEFAULT_GATES = ("delta_ppl_pct<=10", "cos_min>=0.9", "determinism_delta<=1e-6", "ratio>=1.5")
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
_GATE_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|<|>)\s*([-+0-9.eE]+)\s*$")


class EvidenceError(ValueError):
    """Evidence that does not validate, or a malformed gate."""


def schema() -> dict:
    return json.loads(resources.files("mlx_holo.schemas").joinpath("evidence.schema.json").read_text())


def parse_gate(text: str) -> tuple[str, str, float]:
    m = _GATE_RE.match(text)
    if not m:
        raise EvidenceError(f"bad gate {text!r}: expected METRIC OP NUMBER, e.g. cos_min>=0.9")
    return m.group(1), m.group(2), float(m.group(3))


def _lookup(evidence: dict, metric: str):
    """metric name -> value from metrics, then top level (ratio, bits_per_weight), dotted paths allowed."""
    for root in (evidence.get("metrics", {}), evidence):
        cur = root
        for part in metric.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return None


def gate_results(evidence: dict, gates) -> list[dict]:
    out = []
    for g in gates:
        metric, op, thr = parse_gate(g) if isinstance(g, str) else (g["metric"], g["op"], float(g["threshold"]))
        value = _lookup(evidence, metric)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and _OPS[op](value, thr)
        out.append({"metric": metric, "op": op, "threshold": thr,
                    "value": value if isinstance(value, (int, float)) else None, "passed": bool(ok)})
    return out


def validate(evidence: dict) -> list[str]:
    """Schema errors as readable strings (empty when valid)."""
    import jsonschema

    v = jsonschema.Draft202012Validator(schema())
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in sorted(v.iter_errors(evidence), key=lambda e: list(map(str, e.absolute_path)))]
    return errors + [f"{p}: not a finite number" for p in _non_finite(evidence)]


def _non_finite(x, path="") -> list[str]:
    """Paths of NaN/inf numbers (JSON Schema bounds do not catch NaN: every comparison with it is false)."""
    if isinstance(x, float):
        return [] if math.isfinite(x) else [path or "<root>"]
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _non_finite(v, f"{path}/{k}" if path else str(k))]
    if isinstance(x, list):
        return [p for i, v in enumerate(x) for p in _non_finite(v, f"{path}/{i}")]
    return []


def apply_gates(evidence: dict) -> tuple[str, list[str]]:
    """-> (verdict, failures). Re-derives each gate from the metrics; schema errors are failures too."""
    failures = [f"schema: {e}" for e in validate(evidence)]
    gates = evidence.get("gates") or []
    if not gates:
        failures.append("no gates: nothing was checked")
    try:
        results = gate_results(evidence, gates)
    except (EvidenceError, KeyError, TypeError, ValueError) as e:
        results, failures = [], failures + [f"gates: {e}"]
    for r in results:
        if not r["passed"]:
            v = "missing" if r["value"] is None else f"{r['value']:.6g}"
            failures.append(f"gate {r['metric']} {r['op']} {r['threshold']:g} failed (value {v})")
    if evidence.get("verdict") == "GO" and failures:
        failures.append("recorded verdict GO contradicts the gates")
    return ("GO" if not failures else "NO-GO"), failures


def build(*, model: dict, recipe: dict, corpora: dict, nbytes: dict, n_quant_params: int, metrics: dict,
          environment: dict, timings: dict, peak_memory_bytes: int, gates=DEFAULT_GATES, kind: str = "compress",
          **extra) -> dict:
    """Assemble an evidence dict; gates and verdict are computed here, never passed in."""
    ratio = nbytes["original"] / max(nbytes["total"], 1)
    q_bytes = nbytes["codes"] + nbytes["scales_biases"]
    ev = {
        "schema_version": SCHEMA_VERSION, "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "recipe": recipe, "corpora": corpora, "bytes": nbytes, "ratio": ratio,
        "bits_per_weight": 8.0 * q_bytes / n_quant_params if n_quant_params else 16.0,
        "metrics": metrics, "environment": environment, "timings": timings,
        "peak_memory_bytes": int(peak_memory_bytes), **extra,
    }
    ev["gates"] = gate_results(ev, gates)
    ev["verdict"] = "NO-GO"
    ev["verdict"], _ = apply_gates(ev)
    return ev


def load(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvidenceError(f"cannot read evidence {path}: {e}") from e


def write(evidence: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(evidence, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
