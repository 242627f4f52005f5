"""python -m mlx_holo.bench: speed, memory and bandwidth utilisation of saved model folders and of a bit-width sweep.

Entries are timed one after another on the current backend, each opened fresh:
- a folder ``compress`` (or ``mlx_lm.convert``) wrote, as stock mlx-lm runs it; a replicated-ensemble folder through
  this project's kernels (``mlx_holo.kernels.replica_matvec``: codes read once for all K replicas);
- ``sweep`` points: one model quantized in memory by MLX's own affine quantizer at each bit-width (16 = float).
Per entry: prefill tokens/s and time to first token (TTFT) for a ``prompt_tokens`` prompt, decode tokens/s over
``gen_tokens`` greedy steps with a KV cache, peak memory (MLX allocator), and the bytes one decode step reads,
computed from the entry's stored tensors (every tensor a token touches: all linears incl. lm_head, norms, one row of
an untied embedding table; of a MoE layer's E experts the k a token is routed to), with the bits per weight those
bytes hold. Bandwidth utilisation = bytes per token (as held in memory) x decode tokens/s over the peak: the better of two
measured probes, an element-wise copy and a large float mat-vec (``hardware.copy_bandwidth_gbps``,
``matvec_bandwidth_gbps``), and, on a Mac, Apple's published figure for the chip.

On a CPU (MLX without a GPU) float entries run in float32, and the figures are real for this machine only: MLX's CPU
quantized matmul dequantizes on the fly and is compute-bound, so low-bit entries do not gain the bandwidth they save,
and the utilisation says nothing about an Apple GPU.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .options import SWEEP_BITS

CPU_NOTE = ("CPU backend: float entries run in float32; MLX's CPU quantized matmul is compute-bound, so these figures "
            "rank entries on this machine only and say nothing about a Mac's GPU bandwidth")
DEFAULT_SWEEP = (16, 8, 6, 4, 3, 2)
EMBED_NAMES = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings")


@dataclass
class Entry:
    """One thing to time: a folder (``path``) or a sweep point of ``model`` at ``bits`` (16 = float)."""

    label: str
    path: str | None = None
    model: str | None = None
    bits: int | None = None


def _module_bits(name: str, qcfg: dict | None, ens: dict | None) -> int | None:
    """Bits of the packed ``name`` (``P.weight``, uint32) from config.json's quantization / ensemble block."""
    mod = name.rsplit(".", 1)[0]
    if ens:
        for path, e in ens.get("modules", {}).items():
            if mod.startswith(path + "."):
                return int(e["bits"])
    if not qcfg:
        return None
    entry = qcfg.get(mod)
    if isinstance(entry, dict):
        return int(entry.get("bits", qcfg.get("bits", 4)))
    return int(qcfg.get("bits", 4))


def read_costs(tensors: dict[str, tuple[tuple[int, ...], int, bool]], config: dict) -> dict:
    """What one decode step reads, from stored tensors: name -> (shape, bytes, packed codes?) and config.json.

    -> {bytes_per_token, weights_per_token, bits_per_weight, model_bytes}. ``weights_per_token`` counts logical
    weights (a packed word holds 32 / bits of them; scales and biases hold none), so bits_per_weight is the
    storage cost of what a token reads, codes, scales and floats together."""
    qcfg = config.get("quantization") or config.get("quantization_config")
    ens = config.get("ensemble")
    k = config.get("num_experts_per_tok") or config.get("num_experts_per_token")
    tied = config.get("tie_word_embeddings", not any(n.startswith("lm_head.") for n in tensors))
    read = weights = total = 0.0
    for name, (shape, nbytes, packed) in tensors.items():
        total += nbytes
        if packed:
            bits = _module_bits(name, qcfg, ens) or 4
            n = math.prod(shape) * 32 // bits
        elif name.endswith((".scales", ".biases", ".mix")) and (qcfg or ens):
            n = 0
        else:
            n = math.prod(shape)
        frac = 1.0
        parts = name.split(".")
        if not tied and any(p in EMBED_NAMES for p in parts) and shape:
            frac = 1.0 / shape[0]  # an untied table: the head has its own matrix, a token reads one row
        elif k and len(shape) >= 3 and any(p in ("switch_mlp", "experts", "block_sparse_moe") for p in parts):
            frac = min(k, shape[0]) / shape[0]  # stacked experts [E, ...]: k of E are read
        read += frac * nbytes
        weights += frac * n
    return {"bytes_per_token": int(read), "weights_per_token": int(weights),
            "bits_per_weight": 8 * read / weights if weights else None, "model_bytes": int(total)}


def folder_costs(folder: str | Path) -> dict:
    """``read_costs`` of a saved folder, from its safetensors headers and config.json."""
    from .model.files import safetensors_header

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, h in safetensors_header(f)[0].items():
            start, end = h["data_offsets"]
            tensors[name] = (tuple(h["shape"]), end - start, h["dtype"] == "U32" and name.endswith(".weight"))
    return read_costs(tensors, config)


def model_costs(model, config: dict) -> dict:
    """``read_costs`` of a model in memory (a sweep point): its parameters in MLX's stored layout."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    tensors = {k: (tuple(v.shape), v.nbytes, v.dtype == mx.uint32 and k.endswith(".weight"))
               for k, v in tree_flatten(model.parameters())}
    return read_costs(tensors, config)


def bytes_per_token(model) -> int:
    """Bytes a decode step of ``model`` (in memory) reads (``read_costs``)."""
    args = getattr(model, "args", None)
    config = {"num_experts_per_tok": getattr(args, "num_experts_per_tok", None),
              "tie_word_embeddings": not hasattr(model, "lm_head")}
    return model_costs(model, config)["bytes_per_token"]


def _cpu_float_experts(model) -> bool:
    """On the CPU backend MLX's gather_mm (float MoE experts) takes float32 only: cast float experts up there.
    -> whether any were cast."""
    import mlx.core as mx

    from .model.experts import is_switch

    if mx.default_device() != mx.cpu:
        return False
    cast = False
    for _, m in model.named_modules():
        if is_switch(m):
            m.update({k: v.astype(mx.float32) for k, v in m.parameters().items()})
            cast = True
    return cast


def time_model(model, prompt_tokens: int, gen_tokens: int, seed: int = 0) -> dict:
    """Prefill a random prompt, then decode greedily with a KV cache -> {prefill_tps, ttft_s, decode_tps,
    peak_mem_bytes}. One short warm-up pass first (kernel compilation, allocator)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    vocab = model.args.vocab_size if hasattr(model, "args") else 32000
    prompt = mx.random.randint(0, vocab, (1, prompt_tokens), key=mx.random.key(seed))
    mx.eval(model(prompt[:, :8], cache=make_prompt_cache(model)))
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache)
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(y)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(gen_tokens):
        logits = model(y[:, None], cache=cache)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y)
    dec = time.perf_counter() - t1
    return {"prefill_tps": prompt_tokens / ttft, "ttft_s": ttft, "decode_tps": gen_tokens / dec,
            "peak_mem_bytes": int(mx.get_peak_memory())}


def float_dtype():
    """Float entries' dtype: float16, or float32 on the CPU backend (MLX's CPU float16 matmul is slow)."""
    import mlx.core as mx

    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def open_entry(e: Entry, group_size: int = 64):
    """-> (model, config, stored costs, costs as held in memory here, how it runs) for one entry, opened fresh.

    Stored costs are those of the folder's files (a sweep point: of what ``mlx_lm.convert`` would write, float16
    floats and scales); in memory, floats are float32 on the CPU backend."""
    import mlx.core as mx
    import mlx.nn as nn

    from .model.open import cast_floats, open_model

    if e.path is not None:
        cfg = json.loads((Path(e.path) / "config.json").read_text())
        if cfg.get("ensemble"):
            from .replicate.io import load_ensemble

            model = load_ensemble(e.path, dtype=float_dtype(), backend="kernel")
            runs = "ensemble through mlx_holo.kernels"
        else:
            model = open_model(e.path, dtype=float_dtype(), dequantize=False)[0]
            runs = "mlx-lm"
        stored = folder_costs(e.path)
    else:
        model, _, cfg, _ = open_model(e.model, dtype=mx.float16, dequantize=False, lazy=True)
        if e.bits != 16:
            nn.quantize(model, group_size=group_size, bits=e.bits,
                        class_predicate=lambda p, mod: hasattr(mod, "to_quantized")
                        and mod.weight.shape[-1] % group_size == 0)
            cfg = {**cfg, "quantization": {"bits": e.bits, "group_size": group_size}}
        stored = model_costs(model, cfg)
        cast_floats(model, float_dtype())
        runs = "mlx-lm (quantized in memory)"
    mx.eval(model.parameters())
    return model, cfg, stored, model_costs(model, cfg), runs


def entries_for(folders: list[str] | None, model: str | None, sweep: list[int] | None) -> list[Entry]:
    """Folders first, then the sweep of ``model`` (default: the embedded model)."""
    out = [Entry(label=Path(f).name or str(f), path=str(f)) for f in folders or []]
    for b in sweep or []:
        out.append(Entry(label="float" if b == 16 else f"q{b}", model=model, bits=b))
    return out


def check_entries(entries: list[Entry]) -> None:
    """Clear errors before any timing: folders must exist with a config.json, sweep bits be storable."""
    from .model.files import ModelError

    if not entries:
        raise ModelError("nothing to bench: give folders (mlx-holo bench DIR ...) and/or --sweep 16,8,4")
    for e in entries:
        if e.path is not None and not (Path(e.path) / "config.json").is_file():
            raise ModelError(f"{e.path}: not a model folder (no config.json)")
        if e.bits is not None and e.bits not in SWEEP_BITS:
            raise ModelError(f"sweep bits {e.bits} unsupported; choose from {','.join(map(str, SWEEP_BITS))}")


def run_bench(model: str | None = None, bits_list: list[int] | None = None, *, folders: list[str] | None = None,
              prompt_tokens: int = 128, gen_tokens: int = 32, group_size: int = 64, peak_gbps: float | None = None,
              on_progress=None) -> dict:
    """Time every entry (``folders``, then ``model`` at each of ``bits_list``) -> {device, copy_gbps, chip_gbps,
    peak_gbps, peak_source, note, rows: [{label, source, bits, bits_per_weight, prefill_tps, decode_tps, ttft_s,
    peak_mem_bytes, model_bytes, bytes_per_token, bytes_per_token_run, bw_gbps, bw_util, bw_util_measured,
    bw_util_chip, runs}]}. ``bytes_per_token`` is what the stored entry holds for a token (what a Mac reads);
    ``bytes_per_token_run`` what this backend's copy in memory holds (float32 floats on a CPU), which the bandwidth
    figures use. ``bw_util`` is against ``peak_gbps`` (given), else the chip's published peak on a Mac, else the
    copy probe."""
    import mlx.core as mx

    from . import hardware

    entries = entries_for(folders, model, bits_list)
    check_entries(entries)
    copy = hardware.copy_bandwidth_gbps()
    matvec = hardware.matvec_bandwidth_gbps()
    measured = max(copy, matvec)
    chip = hardware.chip_peak_gbps()
    peak, source = ((peak_gbps, "argument") if peak_gbps else (chip, "apple chip table") if chip
                    else (measured, "measured probe (best of copy and mat-vec reads)"))
    rows = []
    for i, e in enumerate(entries):
        m, cfg, costs, held, runs = open_entry(e, group_size)
        if _cpu_float_experts(m):
            held = model_costs(m, cfg)
        r = {"label": e.label, "source": e.path or f"{e.model or 'default'} @ {e.bits}", "bits": e.bits,
             **time_model(m, prompt_tokens, gen_tokens), **costs, "bytes_per_token_run": held["bytes_per_token"],
             "runs": runs}
        r["bw_gbps"] = r["bytes_per_token_run"] * r["decode_tps"] / 1e9
        r["bw_util"] = r["bw_gbps"] / peak
        r["bw_util_measured"] = r["bw_gbps"] / measured
        r["bw_util_chip"] = r["bw_gbps"] / chip if chip else None
        rows.append(r)
        del m
        mx.clear_cache()
        if on_progress:
            on_progress("bench", i + 1, len(entries))
    cpu = mx.default_device() == mx.cpu
    return {"device": hardware.device_info(), "copy_gbps": copy, "matvec_gbps": matvec, "chip_gbps": chip,
            "peak_gbps": peak,
            "peak_source": source, "note": CPU_NOTE if cpu else None, "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens, "group_size": group_size, "rows": rows}


def table(res: dict) -> str:
    lines = [f"device {res['device']['device']} ({res['device']['chip']}), peak {res['peak_gbps']:.1f} GB/s "
             f"({res['peak_source']}; copy {res.get('copy_gbps') or 0:.1f}, mat-vec {res.get('matvec_gbps') or 0:.1f} GB/s), "
             f"prompt "
             f"{res['prompt_tokens']}, decode {res['gen_tokens']}",
             f"{'entry':24s} {'bits/w':>6} {'prefill tok/s':>13} {'TTFT s':>7} {'decode tok/s':>12} {'peak MB':>8} "
             f"{'MB/tok':>8} {'GB/s':>6} {'util':>6}"]
    for r in res["rows"]:
        bpw = r.get("bits_per_weight")
        lines.append(f"{r.get('label', r.get('bits')):24.24s} {bpw if bpw is None else f'{bpw:.2f}':>6} "
                     f"{r['prefill_tps']:>13.1f} {r['ttft_s']:>7.3f} {r['decode_tps']:>12.1f} "
                     f"{r['peak_mem_bytes'] / 1e6:>8.1f} {r['bytes_per_token'] / 1e6:>8.1f} {r['bw_gbps']:>6.2f} "
                     f"{100 * r['bw_util']:>5.1f}%")
    if res.get("note"):
        lines.append(f"note: {res['note']}")
    return "\n".join(lines)


def _points(res: dict) -> list[tuple[float, float, float, str]]:
    """(bits/weight, utilisation %, decode tok/s, label) per row with a bits/weight."""
    return [(r["bits_per_weight"], 100 * r["bw_util"], r["decode_tps"], str(r.get("label", r.get("bits"))))
            for r in res["rows"] if r.get("bits_per_weight")]


def chart(res: dict) -> str:
    """Terminal chart: bandwidth utilisation (%) vs bits/weight, one labelled point per entry (plotext)."""
    import plotext as plt

    pts = _points(res)
    plt.clear_figure()
    for x, y, _, label in pts:  # one series a point: the legend names the entries
        plt.scatter([x], [y], marker="O", label=f"{label} ({x:.2f} b/w)")
    plt.title("decode bandwidth utilisation (%) vs bits/weight")
    plt.xlabel("bits/weight")
    plt.plotsize(70, 16)
    return plt.build()


def save_png(res: dict, path: str | Path) -> Path:
    """PNG chart (matplotlib, the ``plot`` extra): utilisation and decode tok/s vs bits/weight, one point per
    entry. Raises ImportError naming the extra when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the PNG chart needs matplotlib: pip install 'mlx-holo[plot]'") from e
    pts = _points(res)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, j, ylabel in ((a1, 1, "bandwidth utilisation (% of peak)"), (a2, 2, "decode tokens/s")):
        ax.scatter([p[0] for p in pts], [p[j] for p in pts])
        for p in pts:
            ax.annotate(p[3], (p[0], p[j]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("bits/weight (what a token reads)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res['device']['device']} ({res['device']['chip']}), peak {res['peak_gbps']:.0f} GB/s "
                 f"({res['peak_source']})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    from .cli.bench import main
    sys.exit(main())
