"""Pruning benchmark: method x sparsity setting -> PPL, KL, delta PPL %, seconds on the embedded model (or --model).

Each row is one in-process ``mlx_holo.compress.compress`` run (weights kept in floating point, zeros stored dense),
written to a temp folder and evaluated against the dense base on the first --eval-tokens wiki tokens.
The literature's direction (SparseGPT, Frantar & Alistarh 2023; Wanda, Sun et al. 2023; OWL, Yin et al. 2023;
ADMM, Boza 2024; D2Prune, Xiong et al. 2026): at 50% / 2:4 SparseGPT and Wanda are far better than magnitude; at 70% OWL (and the zero-order
search started from it) beat uniform Wanda; ADMM recovery improves SparseGPT at 60-70%.

    python benchmarks/pruning.py --eval-tokens 4096 --calib-tokens 2048 --json pruning.json
    python benchmarks/pruning.py --methods wanda,wanda+owl --settings 70%

The table goes to stdout, progress to stderr. Settings "2:4" skip the allocation methods (N:M fixes the sparsity).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt+admm": {"method": "sparsegpt", "recover": "admm"},
    "d2prune": {"method": "d2prune"},                                 # D2Prune, v_proj masked only (its default)
    "d2prune+admm": {"method": "d2prune", "recover": "admm"},
    "d2prune+d2admm": {"method": "d2prune", "recover": "d2admm"},     # D2ADMM: the mask re-chosen inside ADMM
    "d2prune-auto": {"method": "d2prune", "d2_targets": "auto"},      # q/k/v choice per block on the attention KL
    "d2prune-all": {"method": "d2prune", "d2_targets": ""},           # every layer with SparseGPT's update
    "wanda+owl": {"method": "wanda", "allocation": "owl"},
    "wanda+zero-order": {"method": "wanda", "allocation": "zero-order"},
}
SETTINGS = {"50%": {"sparsity": 0.5}, "2:4": {"nm": "2:4"}, "60%": {"sparsity": 0.6}, "70%": {"sparsity": 0.7}}
DEFAULT_SETTINGS = ("50%", "2:4", "70%")


def recipe_for(method: str, setting: str, calib_tokens: int, calib_seq_len: int):
    from mlx_holo.recipe import Recipe

    return Recipe(bits=None, calib_tokens=calib_tokens, calib_seq_len=calib_seq_len, **METHODS[method],
                  **SETTINGS[setting]).validate()


def applicable(method: str, setting: str) -> bool:
    return not ("nm" in SETTINGS[setting] and "allocation" in METHODS[method])


def run_row(model, method, setting, args, workdir: Path, on_progress=None) -> dict:
    from mlx_holo.compression import compress

    recipe = recipe_for(method, setting, args.calib_tokens, args.calib_seq_len)
    out = workdir / f"{method}-{setting}".replace("%", "pct").replace(":", "of").replace("+", "_")
    t0 = time.perf_counter()
    ev = compress(model, recipe, str(out), eval_tokens=args.eval_tokens, eval_seq_len=args.eval_seq_len,
                  eval_corpus=args.eval_corpus, overwrite=True, on_progress=on_progress)
    m, sp = ev["metrics"], ev.get("sparsity", {})
    row = {"method": method, "setting": setting, "ppl": m["ppl"], "base_ppl": m["base_ppl"], "kl": m["kl"],
           "delta_ppl_pct": m["delta_ppl_pct"], "top1": m["top1"], "sparsity": sp.get("overall"),
           "claims_hold": sp.get("claims_hold"), "nm_pattern_holds": sp.get("nm_pattern_holds"),
           "compress_s": ev["timings"]["compress_s"], "total_s": time.perf_counter() - t0,
           "eval_tokens": m.get("tokens")}
    for corpus in args.extra_corpora.split(",") if args.extra_corpora else ():
        # the same folder scored on another text against the same base
        from mlx_holo.evaluation import evaluate

        e = evaluate(str(out), args.model, eval_tokens=args.eval_tokens, seq_len=args.eval_seq_len, corpus=corpus,
                     det_windows=0, on_progress=on_progress)
        row.setdefault("texts", {})[corpus] = {k: e.get(k) for k in ("ppl", "base_ppl", "kl", "delta_ppl_pct", "top1",
                                                                     "tokens", "eval_s")}
    if "allocation" in ev:
        a = ev["allocation"]
        row["allocation"] = {k: a.get(k) for k in ("sparsities", "ratios", "loss_uniform", "loss_owl", "loss_best",
                                                   "evaluations", "seconds") if k in a}
    return row


def format_table(rows: list[dict]) -> str:
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    head = f"{'method':<18} {'setting':>7} {'PPL':>9} {'KL':>7} {'dPPL%':>8} {'top1':>6} {'sparsity':>8} " \
           f"{'prune s':>8} {'total s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<18} {r['setting']:>7} {fmt(r.get('ppl'), '9.3f')} {fmt(r.get('kl'), '7.4f')} "
                     f"{fmt(r.get('delta_ppl_pct'), '8.1f')} {fmt(r.get('top1'), '6.3f')} "
                     f"{fmt(r.get('sparsity'), '8.4f')} {fmt(r.get('compress_s'), '8.1f')} "
                     f"{fmt(r.get('total_s'), '8.1f')}")
        for corpus, t in r.get("texts", {}).items():
            lines.append(f"{'  on ' + corpus:<18} {'':>7} {fmt(t.get('ppl'), '9.3f')} {fmt(t.get('kl'), '7.4f')} "
                         f"{fmt(t.get('delta_ppl_pct'), '8.1f')} {fmt(t.get('top1'), '6.3f')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model spec (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-corpus", default="wiki", help="evaluation text: a built-in corpus name or a text file")
    ap.add_argument("--extra-corpora", default="",
                    help="comma list of more texts each row's folder is scored on (e.g. tiny,code)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                    help="comma list of " + ", ".join(SETTINGS).replace("%", "%%"))
    ap.add_argument("--rows", default=None, help="explicit rows 'method@setting,...' (overrides the product)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    return ap


def main(argv=None) -> int:
    from mlx_holo.hardware import ensure_fast_blas

    ensure_fast_blas()
    args = build_parser().parse_args(argv)
    from mlx_holo.cli.common import progress_printer

    if args.rows:
        pairs = [tuple(x.split("@", 1)) for x in args.rows.split(",") if x]
    else:
        pairs = [(m, s) for s in args.settings.split(",") if s for m in args.methods.split(",") if m]
    for m, s in pairs:
        if m not in METHODS or s not in SETTINGS:
            print(f"error: unknown method {m!r} or setting {s!r}", file=sys.stderr)
            return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlx-holo-pruning-") as tmp:
        for m, s in pairs:
            if not applicable(m, s):
                continue
            print(f"[{len(rows) + 1}] {m} @ {s}", file=sys.stderr)
            rows.append(run_row(args.model, m, s, args, Path(tmp), on_progress=progress_printer()))
            print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
            if args.json:  # keep partial results of long runs
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    if rows:
        print(f"base PPL {rows[0]['base_ppl']:.3f} on {rows[0]['eval_tokens']} {args.eval_corpus} tokens; "
              f"calibration {args.calib_tokens} c4 tokens")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
