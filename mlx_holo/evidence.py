"""Evidence: build the record of a run, validate it against schemas/, apply gates -> GO/NO-GO (fail closed).

A gate is ``metric op threshold`` (e.g. ``cos_min>=0.9``). A gate whose metric is missing or null fails. Gates are
policy, not data: ``apply_gates`` checks the gates it is given (by default ``DEFAULT_GATES``), never the thresholds
recorded in the file under test, so raising a threshold or replacing the recorded gate list in the file changes
nothing. The verdict is GO only when the evidence validates, every figure that can be re-derived from others agrees
with them and is possible (``contradictions``), and every policy gate passes; an edited ``passed`` flag or verdict
cannot turn a failure into a pass. ``file_hashes`` / ``check_folder``: the content hash of every output file,
recorded at the end of a run and checked against a folder.

What this proves, and what it cannot (the threat model): a file that validates is internally consistent and meets
the policy; with ``--folder`` its weights are the ones it describes. It cannot prove that the recorded metrics were
measured on those weights -- a consistent forgery of ppl, base_ppl and delta_ppl_pct together stays consistent --
which only re-measuring does (``validate --rescore``: the folder is scored again against the recorded base).
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


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _close(a: float, b: float, rel: float = 1e-6, abs_: float = 1e-9) -> bool:
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


def contradictions(evidence: dict) -> list[str]:
    """Figures that disagree with the figures they derive from, and impossible values (empty when consistent):
    delta_ppl_pct from ppl and base_ppl, ratio from the bytes, the byte total from its parts, bits/weight from the
    quantized bytes and ``n_quant_params``, cos_min from cos_per_layer; ppl >= 1, kl >= 0, top-1 in [0, 1],
    cosines in [-1, 1], determinism_delta >= 0."""
    out = []
    m = evidence.get("metrics") if isinstance(evidence.get("metrics"), dict) else {}
    ppl, base = m.get("ppl"), m.get("base_ppl")
    if _num(ppl) and _num(base) and base > 0:
        want = 100.0 * (ppl - base) / base
        if not _num(m.get("delta_ppl_pct")) or not _close(m["delta_ppl_pct"], want, 1e-6, 1e-6):
            out.append(f"delta_ppl_pct {m.get('delta_ppl_pct')!r} is not 100 * (ppl - base_ppl) / base_ppl = {want:.6g}")
    b = evidence.get("bytes") if isinstance(evidence.get("bytes"), dict) else {}
    if all(_num(b.get(k)) for k in ("original", "total")) and b["total"] > 0:
        want = b["original"] / b["total"]
        if not _num(evidence.get("ratio")) or not _close(evidence["ratio"], want):
            out.append(f"ratio {evidence.get('ratio')!r} is not bytes.original / bytes.total = {want:.6g}")
    if all(_num(b.get(k)) for k in ("codes", "scales_biases", "other", "total")) \
            and b["total"] != b["codes"] + b["scales_biases"] + b["other"]:
        out.append("bytes.total is not codes + scales_biases + other")
    n_q = evidence.get("n_quant_params")
    if _num(n_q) and n_q > 0 and all(_num(b.get(k)) for k in ("codes", "scales_biases")):
        want = 8.0 * (b["codes"] + b["scales_biases"]) / n_q
        if not _num(evidence.get("bits_per_weight")) or not _close(evidence["bits_per_weight"], want):
            out.append(f"bits_per_weight {evidence.get('bits_per_weight')!r} is not 8 * (codes + scales_biases) / "
                       f"n_quant_params = {want:.6g}")
    cos = m.get("cos_per_layer")
    if isinstance(cos, list) and cos and all(_num(c) for c in cos):
        if not _num(m.get("cos_min")) or not _close(m["cos_min"], min(cos)):
            out.append(f"cos_min {m.get('cos_min')!r} is not min(cos_per_layer) = {min(cos):.6g}")
        if any(not -1.0 - 1e-6 <= c <= 1.0 + 1e-6 for c in cos):
            out.append("a per-layer cosine is outside [-1, 1]")
    bounds = {"ppl": (1.0, None), "base_ppl": (1.0, None), "kl": (-1e-6, None), "top1": (0.0, 1.0),
              "cos_min": (-1.0 - 1e-6, 1.0 + 1e-6), "determinism_delta": (0.0, None), "delta_ppl_pct": (-100.0, None)}
    for k, (lo, hi) in bounds.items():
        v = m.get(k)
        if _num(v) and (v < lo or (hi is not None and v > hi)):
            out.append(f"{k} = {v!r} is impossible (must be >= {lo:g}{'' if hi is None else f' and <= {hi:g}'})")
    for k, lo in (("ratio", 0.0), ("bits_per_weight", 0.0)):
        v = evidence.get(k)
        if _num(v) and not v > lo:
            out.append(f"{k} = {v!r} is impossible (must be > {lo:g})")
    return out


def apply_gates(evidence: dict, gates=None) -> tuple[str, list[str]]:
    """-> (verdict, failures) under the policy ``gates`` (default DEFAULT_GATES; the gates recorded in the file are
    never read): schema errors, contradictions (``contradictions``) and failed gates are failures."""
    if not isinstance(evidence, dict):
        return "NO-GO", [f"evidence must be a JSON object, got {type(evidence).__name__}"]
    failures = [f"schema: {e}" for e in validate(evidence)] + [f"inconsistent: {c}" for c in contradictions(evidence)]
    gates = DEFAULT_GATES if gates is None else list(gates)
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


COMPARED_METRICS = ("ppl", "base_ppl", "delta_ppl_pct", "kl", "top1", "cos_min", "determinism_delta")


def compare(a: dict, b: dict, gates=None) -> dict:
    """Two evidence dicts side by side -> {recipe: {field: (a, b)} where they differ, metrics: {name: (a, b)},
    size: {name: (a, b)}, gates: [{gate, a, b, a_passed, b_passed}], verdicts: (a, b), comparable: [reasons they
    are not]} under the policy ``gates`` (default DEFAULT_GATES; never the files' own). Runs are comparable when
    they scored the same base model on the same text, tokens and window length."""
    from dataclasses import MISSING, fields

    from .recipe import Recipe

    # a field one file does not record (older evidence) is taken at its default, so only real differences show
    defaults = {f.name: f.default for f in fields(Recipe) if f.default is not MISSING}
    ra, rb = (e.get("recipe") if isinstance(e.get("recipe"), dict) else {} for e in (a, b))

    def value(r, k):
        v = r.get(k, defaults.get(k))
        return None if v in ({}, [], "") else v

    recipe = {k: (value(ra, k), value(rb, k)) for k in sorted(set(ra) | set(rb)) if value(ra, k) != value(rb, k)}
    ma, mb = (e.get("metrics") if isinstance(e.get("metrics"), dict) else {} for e in (a, b))
    metrics = {k: (ma.get(k), mb.get(k)) for k in COMPARED_METRICS}
    ba, bb = (e.get("bytes") if isinstance(e.get("bytes"), dict) else {} for e in (a, b))
    size = {"bytes": (ba.get("total"), bb.get("total")), "bits_per_weight": (a.get("bits_per_weight"),
                                                                             b.get("bits_per_weight")),
            "ratio": (a.get("ratio"), b.get("ratio"))}
    gates = DEFAULT_GATES if gates is None else list(gates)
    rows = []
    for g, x, y in zip(gates, gate_results(a, gates), gate_results(b, gates)):
        rows.append({"gate": g, "a": x["value"], "b": y["value"], "a_passed": x["passed"], "b_passed": y["passed"]})
    reasons = []
    ha, hb = ((e.get("model") or {}).get("hash") if isinstance(e.get("model"), dict) else None for e in (a, b))
    if ha != hb:
        reasons.append("they were compressed from different base models (model hashes differ)")
    ca, cb = ((e.get("corpora") or {}).get("evaluation") or {} if isinstance(e.get("corpora"), dict) else {}
              for e in (a, b))
    for k in ("name", "sha256", "tokens"):
        if ca.get(k) != cb.get(k):
            reasons.append(f"they were scored on different evaluation text ({k}: {ca.get(k)!r} vs {cb.get(k)!r})")
    if ma.get("seq_len") != mb.get("seq_len"):
        reasons.append(f"their windows differ ({ma.get('seq_len')!r} vs {mb.get('seq_len')!r} tokens)")
    return {"recipe": recipe, "metrics": metrics, "size": size, "gates": rows,
            "verdicts": (apply_gates(a, gates)[0], apply_gates(b, gates)[0]), "comparable": reasons}


def format_compare(c: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """``compare``'s result as a text table (the CLI's ``validate --compare``)."""
    def f(v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return str(v)
        return f"{v:.6g}" if isinstance(v, (int, float)) else json.dumps(v)

    w = max(10, *(len(n) for n in names))
    lines = [f"{'':<22} {names[0]:>{w}} {names[1]:>{w}}", f"{'verdict':<22} {c['verdicts'][0]:>{w}} "
             f"{c['verdicts'][1]:>{w}}"]
    for title, rows in (("size", c["size"]), ("metrics", c["metrics"])):
        lines.append(f"-- {title}")
        lines += [f"{k:<22} {f(x):>{w}} {f(y):>{w}}" for k, (x, y) in rows.items()]
    lines.append("-- gates (policy)")
    lines += [f"{g['gate']:<22} {f(g['a']) + (' ok' if g['a_passed'] else ' FAIL'):>{w}} "
              f"{f(g['b']) + (' ok' if g['b_passed'] else ' FAIL'):>{w}}" for g in c["gates"]]
    lines.append("-- recipe (fields that differ)")
    lines += [f"{k:<22} {f(x):>{w}} {f(y):>{w}}" for k, (x, y) in c["recipe"].items()] or ["(the same recipe)"]
    lines += [f"not comparable: {r}" for r in c["comparable"]]
    return "\n".join(lines)


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
        "n_quant_params": int(n_quant_params),
        "metrics": metrics, "environment": environment, "timings": timings,
        "peak_memory_bytes": int(peak_memory_bytes), **extra,
    }
    ev["gates"] = gate_results(ev, gates)
    ev["verdict"] = "NO-GO"
    ev["verdict"], _ = apply_gates(ev, gates)
    return ev


def load(path: str | Path) -> dict:
    try:
        ev = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise EvidenceError(f"cannot read evidence {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ev, dict):
        raise EvidenceError(f"{path} is not an evidence object (a JSON {type(ev).__name__})")
    return ev


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's contents, read in 8 MiB pieces (a model's shards are never held)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_stamp(path: str | Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


def file_hashes(folder: str | Path, known: dict | None = None) -> dict[str, str]:
    """{file name: sha256 of its contents} of every file of an output folder but evidence.json.

    known: {file name: (size, mtime_ns, sha256)} taken when a file was written (``FolderWriter`` hashes each shard
    while it is still in the page cache); a file whose size and mtime still match is not read again."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and f.name != "evidence.json":
            k = (known or {}).get(f.name)
            out[f.name] = k[2] if k and tuple(k[:2]) == file_stamp(f) else sha256_file(f)
    return out


def check_folder(evidence: dict, folder: str | Path) -> list[str]:
    """Differences between the output files recorded in ``evidence["files"]`` and the files of ``folder``."""
    recorded = evidence.get("files")
    if not isinstance(recorded, dict) or not recorded:
        return ["the evidence records no file hashes (written before they were recorded): nothing to check"]
    actual = file_hashes(folder)
    out = [f"{name}: missing from {folder}" for name in sorted(set(recorded) - set(actual))]
    out += [f"{name}: not described by the evidence" for name in sorted(set(actual) - set(recorded))]
    out += [f"{name}: content differs from the recorded hash" for name in sorted(set(recorded) & set(actual))
            if recorded[name] != actual[name]]
    return out


def write(evidence: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(evidence, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
