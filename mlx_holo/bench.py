"""python -m mlx_holo.bench: speed, memory and bandwidth utilisation of a model across bit-widths.

For each bit-width the model is quantized in memory with MLX's own affine quantizer (group 64; 16 = float16 weights),
then timed on the current backend:
- prefill tokens/s and time to first token (TTFT) for a ``prompt_tokens`` prompt,
- decode tokens/s over ``gen_tokens`` greedy steps with a KV cache,
- peak memory (MLX allocator), model bytes (all tensors) and bytes read per decoded token (every weight a decode
  step touches: all linears incl. lm_head, norms; one embedding row),
- bandwidth utilisation = bytes per token x decode tokens/s / peak bandwidth, with the peak from Apple's chip table
  when the chip is known, else from a measured copy probe (``hardware.copy_bandwidth_gbps``).
On a CPU-only machine the numbers are real but say little about a Mac: MLX's CPU quantized matmul is unoptimised.
"""
from __future__ import annotations

import sys
import time


def bytes_per_token(model) -> int:
    """Bytes a single decode step reads: every parameter except the embedding table (one row of it); of a MoE
    layer's E experts only the k a token is routed to (``num_experts_per_tok``)."""
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    k = getattr(getattr(model, "args", None), "num_experts_per_tok", None)
    for _, m in model.named_modules():
        if "Switch" in type(m).__name__ and "weight" in m and m.weight.ndim == 3 and k:
            n = sum(v.nbytes for _, v in tree_flatten(m.parameters()))
            total -= n - n * min(k, m.weight.shape[0]) // m.weight.shape[0]
    emb = getattr(getattr(model, "model", model), "embed_tokens", None)
    tied = not hasattr(model, "lm_head")
    if emb is not None and not tied:  # the lm_head reads its own matrix; the table is only indexed
        table = sum(v.nbytes for _, v in tree_flatten(emb.parameters()))
        rows = emb.weight.shape[0]
        total -= table - table // rows
    return int(total)


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
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    vocab = model.args.vocab_size if hasattr(model, "args") else 32000
    prompt = mx.random.randint(0, vocab, (1, prompt_tokens), key=mx.random.key(seed))
    # warm-up (kernel compilation, allocator)
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


def run_bench(model: str | None, bits_list: list[int], *, prompt_tokens: int = 128, gen_tokens: int = 32,
              group_size: int = 64, peak_gbps: float | None = None, on_progress=None) -> dict:
    """-> {"device": ..., "peak_gbps": ..., "peak_source": ..., "rows": [{bits, prefill_tps, decode_tps, ttft_s,
    peak_mem_bytes, model_bytes, bytes_per_token, bw_gbps, bw_util}]}"""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from . import hardware
    from .model.open import open_model

    source = "argument"
    if peak_gbps is None:
        peak_gbps = hardware.chip_peak_gbps()
        source = "apple chip table"
    if peak_gbps is None:
        peak_gbps = hardware.copy_bandwidth_gbps()
        source = "measured copy probe"
    rows = []
    for i, bits in enumerate(bits_list):
        m = open_model(model, dtype=mx.float16, dequantize=False)[0]
        if bits != 16:
            nn.quantize(m, group_size=group_size, bits=bits,
                        class_predicate=lambda p, mod: hasattr(mod, "to_quantized")
                        and mod.weight.shape[-1] % group_size == 0)
        experts_f32 = _cpu_float_experts(m)
        mx.eval(m.parameters())
        r = time_model(m, prompt_tokens, gen_tokens)
        r["bits"] = bits
        if experts_f32:
            r["note"] = "MoE experts float32 (MLX's CPU gather_mm runs float32 only)"
        r["model_bytes"] = int(sum(v.nbytes for _, v in tree_flatten(m.parameters())))
        r["bytes_per_token"] = bytes_per_token(m)
        r["bw_gbps"] = r["bytes_per_token"] * r["decode_tps"] / 1e9
        r["bw_util"] = r["bw_gbps"] / peak_gbps
        rows.append(r)
        del m
        mx.clear_cache()
        if on_progress:
            on_progress("bench", i + 1, len(bits_list))
    return {"device": hardware.device_info(), "peak_gbps": peak_gbps, "peak_source": source,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "group_size": group_size, "rows": rows}


def table(res: dict) -> str:
    lines = [f"device {res['device']['device']} ({res['device']['chip']}), peak {res['peak_gbps']:.1f} GB/s "
             f"({res['peak_source']}), prompt {res['prompt_tokens']}, decode {res['gen_tokens']}",
             f"{'bits':>4} {'prefill tok/s':>13} {'TTFT s':>8} {'decode tok/s':>12} {'peak MB':>8} "
             f"{'model MB':>8} {'MB/token':>8} {'GB/s':>7} {'util':>6}"]
    for r in res["rows"]:
        lines.append(f"{r['bits']:>4} {r['prefill_tps']:>13.1f} {r['ttft_s']:>8.3f} {r['decode_tps']:>12.1f} "
                     f"{r['peak_mem_bytes'] / 1e6:>8.1f} {r['model_bytes'] / 1e6:>8.1f} "
                     f"{r['bytes_per_token'] / 1e6:>8.1f} {r['bw_gbps']:>7.2f} {100 * r['bw_util']:>5.1f}%")
    return "\n".join(lines)


def chart(res: dict) -> str:
    """Terminal chart of bandwidth utilisation vs bits (plotext)."""
    import plotext as plt

    plt.clear_figure()
    xs = [r["bits"] for r in res["rows"]]
    plt.bar([str(x) for x in xs], [100 * r["bw_util"] for r in res["rows"]])
    plt.title("bandwidth utilisation (%) vs bits")
    plt.plotsize(60, 15)
    return plt.build()


if __name__ == "__main__":
    from .cli.bench import main
    sys.exit(main())
