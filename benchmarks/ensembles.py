"""Quality study of replicated-layer ensembles on the embedded SmolLM2-135M (CPU, fp32).

Only the 30 MLP blocks are quantized (attention, norms and the tied embedding stay float in every variant, so the
differences are the MLPs'). Variants at group size 64:
  rtn4, rtn3        plain min/max RTN (the baselines);   rtn3_clip   RTN with importance-weighted clip search + LS
  ens2_k1           2-bit codes (clip search, E[x^2]-weighted), K=1, least-squares parameters, untuned
  ens2_k{1,2,3}_t   same codes, K replicas, scales/biases/mixing tuned per block (MSE to the float MLP, Adam)
  rtn3_k1_t         3-bit, K=1, tuned the same way (what tuning alone buys at 3 bits)
  share4x2          adjacent-layer code sharing: MLPs of blocks 2i and 2i+1 share one 4-bit code tensor per
                    projection (2 bits of codes per weight), each with its own scales/biases (replicate/share.py)
Calibration: c4 (``--calib-tokens``), evaluation: wiki (``--eval-tokens``), 512-token windows. The block inputs for
tuning come from the float model. Writes one evidence JSON per variant (kind 'ensemble') and summary.json into
``--out`` and prints a table. Bytes read per token = every linear's codes + parameters at batch-1 decode
(MLP codes + fp16 scales/biases + fp32 mixing; attention and the tied lm_head in fp16).

Example: python benchmarks/ensembles.py --variants rtn4,rtn3,ens2_k1,ens2_k1_t,ens2_k2_t,ens2_k3_t
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL = ("rtn4", "rtn3", "rtn3_clip", "ens2_k1", "ens2_k1_t", "ens2_k2_t", "ens2_k3_t", "rtn3_k1_t", "share4x2")


def capture_mlp_io(model, calib):
    """Float model over calib [N, S] -> {mlp path: (x [n, D], importance {proj: [in]})}."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_holo.replicate import find_mlps

    seen = {}
    saved = []
    for path, m in find_mlps(model):
        cls = type(m)

        def call(self, x, _cls=cls, _p=path):
            seen.setdefault(_p, []).append(x.reshape(-1, x.shape[-1]))
            return _cls.__call__(self, x)
        saved.append((m, cls))
        m.__class__ = type("Cap" + cls.__name__, (cls,), {"__call__": call})
    try:
        for i in range(calib.shape[0]):
            model(calib[i:i + 1])
            mx.eval(seen)
    finally:
        for m, cls in saved:
            m.__class__ = cls
    out = {}
    for path, m in find_mlps(model):
        x = mx.concatenate(seen[path])
        h = nn.silu(m.gate_proj(x)) * m.up_proj(x)
        imp = {"gate_proj": (x * x).mean(0), "up_proj": (x * x).mean(0), "down_proj": (h * h).mean(0)}
        mx.eval(x, imp)
        out[path] = (x, imp)
    return out


def bytes_per_token(model, mlp_bytes: dict) -> dict:
    """Bytes of every linear read once per decoded token: MLP (given), attention + lm_head in fp16."""
    import mlx.nn as nn

    attn = sum(m.weight.size * 2 for p, m in model.named_modules() if isinstance(m, nn.Linear) and "self_attn" in p)
    emb = model.model.embed_tokens.weight.size * 2  # tied: the lm_head reads the whole table
    d = dict(mlp_bytes)
    d.update({"attention_fp16": attn, "lm_head_fp16": emb})
    d["total"] = mlp_bytes["codes"] + mlp_bytes["scales_biases"] + attn + emb
    return d


def build_shared(model, io, args, log, bits=4, pair=2):
    """share4x2: blocks (2i, 2i+1) share one code tensor per MLP projection -> (mlp bytes, per-block records)."""
    from mlx_holo.replicate import find_mlps, share_codes

    mlps = find_mlps(model)
    g = args.group_size
    nb, records = {"codes": 0, "scales_biases": 0}, []
    for j in range(0, len(mlps), pair):
        group = mlps[j: j + pair]
        ys = [m(io[p][0]) for p, m in group]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            lins = [getattr(m, proj) for _, m in group]
            imp = sum(io[p][1][proj] for p, _ in group) / len(group)
            sc = share_codes([lin.weight for lin in lins], bits, g, importance=imp)
            for i, lin in enumerate(lins):
                lin.weight = sc.dequantize(i)
            n = lins[0].weight.size
            nb["codes"] += n * bits // 8
            nb["scales_biases"] += len(lins) * 2 * 2 * (n // g)
        for (p, m), y in zip(group, ys):
            d = m(io[p][0]) - y
            rel = float(((d * d).sum() / (y * y).sum()).item())
            records.append({"name": p, "k": 1, "bits": bits, "shared_with": [q for q, _ in group if q != p],
                            "rel_after": rel, "error": rel})
            log(f"  share {p}: rel err {rel:.4f}")
    return nb, records


def build_variant(name, model, io, args, log):
    """Swap MLPs of ``model`` in place for variant ``name`` -> (mlp bytes, per-block records)."""
    import mlx.core as mx

    from mlx_holo.replicate import ensemble_from_mlp, ensemble_nbytes, find_mlps, tune_ensemble_block

    if name == "share4x2":
        return build_shared(model, io, args, log)

    if name.startswith("rtn4") or name.startswith("rtn3"):
        bits, kk = (4 if name.startswith("rtn4") else 3), 1
    else:
        bits, kk = 2, int(name.split("_k")[1][0])
    tuned = name.endswith("_t")
    plain = name in ("rtn4", "rtn3")
    records, nb = [], {"codes": 0, "scales_biases": 0}
    mlps = find_mlps(model)
    for i, (path, mlp) in enumerate(mlps):
        x, imp = io[path]
        y = mlp(x)
        ens = ensemble_from_mlp(mlp, kk, bits, args.group_size, importance=None if plain else imp,
                                refit=not plain, clip_search=not plain, mixing="softmax" if tuned else "mean")
        rec = {"name": path, "k": kk, "bits": bits}
        if tuned:
            r = tune_ensemble_block(ens, x, y, steps=args.steps, lr=args.lr, batch=args.batch, seed=i)
            rec.update(rel_before=r.rel_before, rel_after=r.rel_after)
        else:
            d = ens(x) - y
            rec["rel_after"] = float(((d * d).sum() / (y * y).sum()).item())
        if kk > 1:
            rec["mix"] = [float(v) for v in ens.mix_weights().tolist()]
        b = ensemble_nbytes(ens)
        if kk == 1 and not tuned:
            b["mix"] = 0  # a plain quantized MLP stores no mixing weight
        nb["codes"] += b["codes"]
        nb["scales_biases"] += b["scales_biases"] + b["mix"]
        rec["error"] = rec["rel_after"]
        records.append(rec)
        parent = model.model.layers[int(path.split(".")[2])]
        parent.mlp = ens
        mx.eval(ens.parameters())
        log(f"  {name} {path}: rel err {rec.get('rel_before', float('nan')):.4f} -> {rec['rel_after']:.4f}")
    return nb, records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(ALL))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--save", default=None, help="variant to save + reload through mlx_holo.replicate (round trip)")
    ap.add_argument("--save-dir", default=str(ROOT / "runs" / "ensembles"))
    ap.add_argument("--out", default=str(ROOT / "evidence" / "ensembles"))
    args = ap.parse_args(argv)

    import mlx.core as mx

    from mlx_holo import data, evidence, hardware, model as models
    from mlx_holo.evaluation import compare

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok, config, info = models.open_model(None)
    calib_c, eval_c = data.load_corpus("c4"), data.load_corpus("wiki")
    calib = data.calibration_windows(tok, calib_c, args.calib_tokens, args.seq_len, 0)
    wins = data.text_windows(tok, eval_c, args.eval_tokens, args.seq_len)
    t0 = time.perf_counter()
    io = capture_mlp_io(base, calib)
    log(f"captured MLP inputs on {calib.size} calibration tokens in {time.perf_counter() - t0:.1f}s")
    n_mlp = sum(m.gate_proj.weight.size * 3 for _, m in __import__("mlx_holo.replicate", fromlist=["x"])
                .find_mlps(base))
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.variants.split(","):
        ts = time.perf_counter()
        model = models.open_model(None)[0]
        nb, records = build_variant(name, model, io, args, log)
        build_s = time.perf_counter() - ts
        te = time.perf_counter()
        metrics = compare(model, base, wins).to_dict()
        eval_s = time.perf_counter() - te
        tf = time.perf_counter()
        mx.eval(model(wins[:1]))
        fwd_s = time.perf_counter() - tf
        bpt = bytes_per_token(model, nb)
        n_float = info.n_params - n_mlp
        nbytes = {"original": 2 * info.n_params, "codes": nb["codes"], "scales_biases": nb["scales_biases"],
                  "other": 2 * n_float, "total": nb["codes"] + nb["scales_biases"] + 2 * n_float}
        extra = {}
        if args.save == name:
            from mlx_holo.replicate import load, save
            folder = Path(args.save_dir) / name
            with models.atomic_dir(folder, overwrite=True) as tmp:
                written = save(model, config, tmp, src=info.path, float_dtype=mx.float32)
            re = load(folder)
            d = float(mx.abs(re(wins[:1]) - model(wins[:1])).max().item())
            extra["round_trip"] = {"folder": str(folder), "bytes_written": written, "max_abs_logit_diff": d}
            log(f"  saved {folder}, reload max |logit diff| = {d}")
        ks = [r["k"] for r in records]
        ev = evidence.build(
            model={"id": info.id, "path": info.path, "hash": info.hash, "model_type": info.model_type,
                   "n_params": info.n_params},
            recipe={"method": "ensemble" if name.startswith(("ens", "share")) else "rtn", "bits": records[0]["bits"],
                    "group_size": args.group_size, "variant": name, "scope": "mlp blocks only",
                    "tuned": name.endswith("_t"), "tune": {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                                                           "objective": "block MSE vs float MLP"}},
            corpora={"calibration": calib_c.record(int(calib.size)), "evaluation": eval_c.record(int(wins.size))},
            nbytes=nbytes, n_quant_params=n_mlp, metrics=metrics, environment=hardware.device_info(),
            timings={"build_s": build_s, "eval_s": eval_s, "cpu_forward_512_tokens_s": fwd_s},
            peak_memory_bytes=int(mx.get_peak_memory()), kind="ensemble",
            layers=records, ensemble={"k_per_block": ks, "bytes_read_per_token": bpt,
                                      "mlp_bits_per_weight": 8.0 * (nb["codes"] + nb["scales_biases"]) / n_mlp},
            command=" ".join([os.path.basename(sys.executable)] + sys.argv), **extra)
        errs = evidence.validate(ev)
        if errs:
            raise SystemExit(f"evidence for {name} does not validate: {errs}")
        evidence.write(ev, out / f"{name}.json")
        summary[name] = {"ppl": metrics["ppl"], "base_ppl": metrics["base_ppl"], "kl": metrics["kl"],
                         "top1": metrics["top1"], "mlp_bpw": ev["ensemble"]["mlp_bits_per_weight"],
                         "mlp_bytes": nb["codes"] + nb["scales_biases"], "bytes_per_token": bpt["total"],
                         "mean_block_rel_err": sum(r["rel_after"] for r in records) / len(records),
                         "cpu_forward_512_s": fwd_s, "build_s": build_s}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        s = summary[name]
        print(f"{name:10s} ppl {s['ppl']:9.3f} (base {s['base_ppl']:.3f})  kl {s['kl']:.4f}  top1 {s['top1']:.3f}  "
              f"mlp bpw {s['mlp_bpw']:.3f}  MB/token {s['bytes_per_token'] / 1e6:.2f}  "
              f"block err {s['mean_block_rel_err']:.4f}  fwd {fwd_s:.2f}s  build {build_s:.0f}s", flush=True)
        del model
        mx.clear_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
