"""Quality table: method x bits -> PPL, KL, bits per weight, seconds, peak memory, ours beside mlx-lm's own tools.

Run: python benchmarks/quality.py --bits 2,3,4 --eval-tokens 4096 --calib-tokens 2048 --json runs/quality.json

``--work DIR --reuse`` keeps every variant's folder under DIR and, on a later run, scores an existing folder instead of
compressing again (its compression seconds are read back from DIR/<variant>/quality_seconds.txt): a long tool run
(mlx-lm's AWQ takes ~16 CPU-minutes for this 135M model) can be done once, or by ``--methods mlx_lm:awq`` alone.

Ours: rtn, gptq, gptq+e2e (GPTQ, then ``--e2e-steps`` (20) steps at ``--e2e-lr 3e-5``), awq, mixed / mixed-fisher /
mixed-kl (Hessian, Fisher or measured-KL sensitivity, at the same average bits as uniform ``b`` + its group
overhead, bit-widths from ``b`` up, group sizes 32/64/128; with a ``+1`` suffix at mlx_lm:dynamic's budget, b + 1.0),
rot-rtn / rot-gptq (``--rotate hadamard`` first), via ``mlx_holo.compression.compress`` in-process. mlx-lm:
``mlx_lm.convert -q`` (RTN), ``mlx_lm.quant.gptq``, ``mlx_lm.quant.awq`` and ``mlx_lm.quant.dynamic_quant`` (b and
b + 1 bits, target b + 1.0 bits/weight, on our calibration windows' tokens) as subprocesses, offline: the calibration
text (c4) is placed where mlx-lm looks for its calibration file, under a temporary HOME; ``mlx_lm:dwq`` calls
``mlx_lm.quant.dwq.dwq_quantize`` in-process on our calibration windows (``--e2e-steps`` steps of one window, its
learning rate ``--dwq-lr``, default 1e-6; ``run_mlx_lm_dwq``). mlx-lm's tools get a float16 copy of the base (``--mlx-lm-dtype``), so their scales and biases
are 16-bit as on the bf16 models they are made for (rows published before this option used the float32 base and
carry float32 scales). Column ``MB``: the folder's weight files. mlx-lm's GPTQ supports only 2/4/8 bits and quantizes the embedding at its
fallback width (6 bits), its AWQ at 4 bits/group 32: the table prints everyone's real bits per weight, and ours are
run with the same embedding width as the mlx-lm tool they are compared with (column ``emb``). Every variant is
scored with the same evaluator, windows and base model (``mlx_holo.compare``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_holo.hardware import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

MIXED = {"mixed": "hessian", "mixed-fisher": "fisher", "mixed-kl": "kl"}  # method -> --sensitivity


def _bpw(folder: Path) -> float:
    """Bits per weight of a saved folder: (packed codes + scales + biases) / quantized weights."""
    import mlx.core as mx

    w = mx.load(str(folder / "model.safetensors")) if (folder / "model.safetensors").exists() else {}
    if not w:
        for f in folder.glob("model*.safetensors"):
            w.update(mx.load(str(f)))
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.get("quantization", {})
    bits = n = 0
    for k, v in w.items():
        if k.endswith(".scales"):
            mod = k[: -len(".scales")]
            b = (q.get(mod) or q)["bits"] if isinstance(q.get(mod), dict) else q["bits"]
            codes = w[f"{mod}.weight"]
            n_w = codes.size * 32 // b
            bits += codes.nbytes * 8 + v.nbytes * 8 + (w[f"{mod}.biases"].nbytes * 8 if f"{mod}.biases" in w else 0)
            n += n_w
    return bits / n if n else 16.0


def run_mlx_lm(tool: str, src: Path, out: Path, bits: int, group: int, calib_text: str, calib_tokens: int,
               seq_len: int) -> float:
    src, out = Path(src).resolve(), Path(out).resolve()  # the tools run in a temporary folder
    if out.exists():  # mlx-lm refuses an existing output folder
        shutil.rmtree(out)
    home = Path(tempfile.mkdtemp(prefix="mlxlm-home-"))
    (home / ".cache" / "mlx-lm").mkdir(parents=True)
    (home / ".cache" / "mlx-lm" / "calibration_v5.txt").write_text(calib_text)
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1")
    n = max(1, calib_tokens // seq_len)
    if tool == "rtn":
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
               "--q-bits", str(bits), "--q-group-size", str(group)]
    elif tool == "dynamic":  # every calibration token it finds is used: give it calib_tokens of them
        # ``src`` here is the float32 base (float16 gradients crawl on a CPU): its scales come out float32, 2 x 16
        # more bits a group than float16 ones, which the target allows for; they are stored as float16 after
        cmd = [sys.executable, "-c", "import sys; from mlx_lm.quant.dynamic_quant import main; "
               "sys.argv[0] = 'dynamic_quant'; main()", "--model", str(src), "--mlx-path", str(out),
               "--target-bpw", str(bits + 1.0 + 32 / group), "--low-bits", str(bits), "--low-group-size",
               str(group), "--high-bits", str(bits + 1), "--high-group-size", str(group)]
    elif tool == "gptq":  # mlx_lm.quant.awq has no __main__ guard: call both tools' main() explicitly
        cmd = [sys.executable, "-c", "import sys; from mlx_lm.quant.gptq import main; sys.argv[0] = 'gptq'; main()",
               "--model", str(src), "--mlx-path", str(out), "--bits",
               str(bits), "--group-size", str(group), "--num-samples", str(n), "--sequence-length", str(seq_len)]
    else:
        cmd = [sys.executable, "-c", "import sys; from mlx_lm.quant.awq import main; sys.argv[0] = 'awq'; main()",
               "--model", str(src), "--mlx-path", str(out), "--bits",
               str(bits), "--group-size", str(group), "--num-samples", str(n), "--sequence-length", str(seq_len)]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=home)
    if r.returncode != 0 or not (out / "config.json").exists():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    if tool == "dynamic":
        cast_floats(out, "float16")
    return time.perf_counter() - t


def cast_floats(folder: Path, dtype: str) -> None:
    """Store every float tensor of a saved folder (scales, biases, norms) in ``dtype``, in place."""
    import mlx.core as mx

    for f in folder.glob("*.safetensors"):
        w = mx.load(str(f))
        mx.save_safetensors(str(f), {k: v.astype(getattr(mx, dtype)) if mx.issubdtype(v.dtype, mx.floating) else v
                                     for k, v in w.items()}, metadata={"format": "mlx"})


def float16_copy(src: Path, dst: Path) -> Path:
    """The base folder with its float weights stored as float16 (config and tokenizer files copied): what mlx-lm's
    tools are given with ``--mlx-lm-dtype float16``, so that their scales and biases are 16-bit, as on a bf16/fp16
    model, instead of the float32 of the embedded base."""
    import mlx.core as mx

    if (dst / "config.json").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            w = mx.load(str(f))
            mx.save_safetensors(str(tmp / f.name), {k: v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating)
                                                    else v for k, v in w.items()}, metadata={"format": "mlx"})
        elif f.is_file():
            shutil.copy(f, tmp / f.name)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(dst)
    return dst


class FloatQuantized:
    """Within the block, MLX's quantized layers compute with the float weight ``scales * codes + biases`` (codes
    unpacked once per layer and kept): the same arithmetic as ``mx.quantized_matmul``, differentiable in the scales
    and biases, and fast on a CPU, where MLX's quantized matmul is very slow. Used to run mlx-lm's DWQ here."""

    def __init__(self):
        self.codes = {}

    def weight(self, m):
        import mlx.core as mx

        key = id(m)
        if key not in self.codes:
            ones = mx.ones(m.scales.shape, mx.float32)
            self.codes[key] = mx.dequantize(m.weight, ones, mx.zeros_like(ones), group_size=m.group_size,
                                            bits=m.bits)
            mx.eval(self.codes[key])
        c = self.codes[key]
        o, i = c.shape
        g = m.group_size
        return (c.reshape(o, i // g, g) * m.scales[..., None].astype(mx.float32)
                + m.biases[..., None].astype(mx.float32)).reshape(o, i)

    def __enter__(self):
        import mlx.nn as nn

        fq = self
        self.saved = (nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.__call__, nn.QuantizedEmbedding.as_linear)

        def linear(m, x):
            y = x @ fq.weight(m).T.astype(x.dtype)  # the layer's dtype: float32 when trained here
            return y + m.bias if "bias" in m else y

        nn.QuantizedLinear.__call__ = linear
        nn.QuantizedEmbedding.__call__ = lambda m, x: fq.weight(m)[x]
        nn.QuantizedEmbedding.as_linear = lambda m, x: x @ fq.weight(m).T.astype(x.dtype)
        return self

    def __exit__(self, *exc):
        import mlx.nn as nn

        nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.__call__, nn.QuantizedEmbedding.as_linear = self.saved


def run_mlx_lm_dwq(src: Path, teacher: Path, out: Path, bits: int, group: int, calib, steps: int, batch: int,
                   lr: float) -> float:
    """mlx-lm's DWQ (``mlx_lm.quant.dwq.dwq_quantize``: Adam on the scales/biases of an RTN-quantized copy against
    the float model's logits, temperature 2) on our calibration windows calib [N, S]: the last window held out for
    its validation, the others repeated to ``steps`` steps of ``batch`` windows. The student is quantized from
    ``src`` (its scales take src's dtype) and trained in float32 against ``teacher`` (the float32 base): float16
    matmuls crawl on a CPU, and float32 training loses nothing DWQ's bfloat16 default keeps; the tuned scales and
    biases are stored back in src's dtype, saved with ``mlx_lm.utils.save``. The quantized layers compute through
    ``FloatQuantized``. -> seconds."""

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import load, quantize_model, save

    t = time.perf_counter()
    student, tok, config = load(str(src), return_config=True)
    _, config = quantize_model(student, config, group_size=group, bits=bits)
    store = next(v for k, v in tree_flatten(student.parameters()) if k.endswith("scales")).dtype
    student.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                            student.parameters()))
    model = load(str(teacher))[0]
    wins = [(calib[i].tolist(), 0) for i in range(calib.shape[0])]
    train, valid = wins[:-1], wins[-1:]
    train = (train * (steps * batch // len(train) + 1))[: steps * batch]
    with FloatQuantized():
        dwq_quantize(student, lambda b, i, split: model(b), optim.Adam(learning_rate=lr, bias_correction=True),
                     train, valid, batch, calib.shape[1], seed=123, dtype=mx.float32)
    student.update(tree_map(lambda a: a.astype(store) if mx.issubdtype(a.dtype, mx.floating) else a,
                            student.parameters()))
    mx.eval(student.parameters())
    if out.exists():
        shutil.rmtree(out)
    save(str(out), str(src), student, tok, config)
    return time.perf_counter() - t


def main(argv=None) -> int:
    import mlx.core as mx

    from mlx_holo import data, model as models
    from mlx_holo.evaluation import compare
    from mlx_holo.compression import compress
    from mlx_holo.quant.rotate import config_rotation
    from mlx_holo.recipe import Recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="rtn,gptq,awq,mixed,mixed-fisher,mlx_lm:rtn,mlx_lm:gptq,mlx_lm:awq")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-corpus", default="wiki", help="evaluation text: a built-in corpus name or a text file")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--e2e-steps", type=int, default=20, help="gptq+e2e's end-to-end steps, and mlx_lm:dwq's")
    ap.add_argument("--dwq-lr", type=float, default=1e-6, help="mlx_lm:dwq's learning rate (its default)")
    ap.add_argument("--mlx-lm-dtype", default="float16", choices=("float16", "float32"),
                    help="the base's float dtype given to mlx-lm's tools (their scales/biases take it)")
    ap.add_argument("--emb-as-bits", action="store_true",
                    help="every row of ours with its embedding at --bits (as mlx_lm:rtn/dwq/dynamic quantize it)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default=None, help="keep the variant folders here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="score existing variant folders under --work")
    args = ap.parse_args(argv)

    mid, src = models.resolve(args.model)
    base, tok, _, info = models.open_model(args.model)
    wins = data.text_windows(tok, data.load_corpus(args.eval_corpus), args.eval_tokens, args.seq_len)
    calib_text = data.load_corpus("c4").text
    calib = data.calibration_windows(tok, data.load_corpus("c4"), args.calib_tokens, args.seq_len, 0)
    calib_ours = "\n\n".join(tok.decode(w.tolist()) for w in calib)  # for mlx-lm's dynamic quant: these tokens
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    src_mlx = float16_copy(Path(src), work / "base-float16") if args.mlx_lm_dtype == "float16" else Path(src)
    rows = []
    base_ppl = None
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            out = work / f"{method.replace(':', '_')}-{bits}"
            emb = bits if args.emb_as_bits else {"mlx_lm:gptq": 6, "gptq": 6, "gptq+e2e": 6, "mlx_lm:awq": 4,
                                                 "awq": 4}.get(method, bits)
            row = {"method": method, "bits": bits, "emb": emb}
            t0 = time.perf_counter()
            try:
                if args.reuse and (out / "config.json").exists() and (out / "quality_seconds.txt").exists():
                    row["seconds"] = float((out / "quality_seconds.txt").read_text())
                    row["reused"] = True
                elif method.startswith("mlx_lm:"):
                    tool = method.split(":")[1]
                    if tool == "gptq" and bits not in (2, 4, 8):
                        row["error"] = "mlx-lm GPTQ supports 2/4/8 bits only"
                        rows.append(row)
                        print(row, flush=True)
                        continue
                    if tool == "dwq":
                        row["seconds"] = run_mlx_lm_dwq(src_mlx, Path(src), out, bits, args.group_size, calib,
                                                        args.e2e_steps, 1, args.dwq_lr)
                    else:
                        row["seconds"] = run_mlx_lm(tool, Path(src) if tool == "dynamic" else src_mlx, out, bits,
                                                    args.group_size,
                                                    calib_ours if tool == "dynamic" else calib_text,
                                                    args.calib_tokens, args.seq_len)
                else:
                    kw = {}
                    if method.removesuffix("+1") in MIXED:  # "+1": at mlx_lm:dynamic's budget, bits + 1.0
                        kw = dict(method="mixed", bits=bits, bits_per_weight=bits + (
                                      1.0 if method.endswith("+1") else 32 / args.group_size),
                                  candidate_groups=(32, 64, 128),  # room to move: --bits is mixed's floor
                                  sensitivity=MIXED[method.removesuffix("+1")])
                    elif method == "gptq+e2e":  # GPTQ, then end-to-end KL tuning (--e2e-steps, lr 3e-5)
                        kw = dict(method="gptq", bits=bits, e2e_steps=args.e2e_steps, e2e_lr=3e-5)
                    elif method.startswith("rot-"):  # the rotation folded in first (--rotate hadamard)
                        kw = dict(method=method[4:], bits=bits, rotate="hadamard")
                    else:
                        kw = dict(method=method, bits=bits)
                    r = Recipe(group_size=args.group_size, calib_tokens=args.calib_tokens,
                               calib_seq_len=args.seq_len, embed_bits=emb if emb != bits else None, **kw)
                    ev = compress(args.model, r, str(out), eval_tokens=0, overwrite=True, base_model=base)
                    row["seconds"] = ev["timings"]["compress_s"] + ev["timings"]["e2e_tune_s"]
                    row["peak_rss_mb"] = ev["peak_memory_bytes"] / 1e6
                if not row.get("reused"):
                    (out / "quality_seconds.txt").write_text(f"{row['seconds']:.1f}")
                cm, _, cfg, _ = models.open_model(str(out))
                m = compare(cm, base, wins, det_windows=0, rotation=config_rotation(cfg))
                base_ppl = m.base_ppl
                row.update(ppl=m.ppl, kl=m.kl, top1=m.top1, cos_min=m.cos_min, bpw=_bpw(out),
                           mb=sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6)
                del cm
                mx.clear_cache()
            except Exception as e:  # noqa: BLE001 - one failed variant must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nbase PPL {base_ppl:.3f} on {wins.size} {args.eval_corpus} tokens ({wins.shape[0]} x {args.seq_len}); "
          f"calibration c4 {args.calib_tokens} tokens; group {args.group_size}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB (this process)")
    print(f"{'method':<12} {'bits':>4} {'emb':>3} {'bpw':>6} {'MB':>6} {'PPL':>9} {'KL':>7} {'top1':>6} "
          f"{'cos_min':>7} {'sec':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<12} {r['bits']:>4} {r['emb']:>3}  -- {r['error'][:80]}")
            continue
        print(f"{r['method']:<12} {r['bits']:>4} {r['emb']:>3} {r['bpw']:>6.3f} {r['mb']:>6.1f} {r['ppl']:>9.3f} "
              f"{r['kl']:>7.4f} {r['top1']:>6.3f} {r['cos_min']:>7.4f} {r['seconds']:>7.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"base_ppl": base_ppl, "rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
