"""Memory pre-flight: the peak memory a compress run will need, estimated from config.json and the recipe before any
work, against the memory the machine has (or ``max_memory_gb``).

A run goes through phases that do not overlap in time, and its peak is the largest of them:
- allocation: mixed precision's fisher / kl sensitivities and the zero-order sparsity search hold the whole model in
  float32 (with gradients for fisher); the hessian sensitivity and OWL stream like the block loop;
- blocks: the block loop holds one block in float32, a linear's float and compressed copies, its Hessian with the
  float64 inverse GPTQ factors, the calibration activations of every window (the stream entering the block, the
  float model's stream for QEP, each distinct linear input captured, the block's output), and the output shard
  being filled;
- head: the tables outside the blocks as stored (``model.tables``: the input table of an untied model and the head,
  each quantized a slice of rows at a time) with the head's calibration inputs and Hessian;
- rotation (``--rotate``): the stored tables and their rotated copies (a tied table becomes two), made before the
  blocks; the blocks phase then holds the two rotated tables too;
- tuning: end-to-end tuning holds the compressed and the base model in float32 and a step's logits;
- evaluation: one block of each model in float32, both heads as stored, the hidden states of every evaluation
  window and one slice of logits (``evaluation.stream_compare``).
Each phase also counts a fixed runtime overhead (``RUNTIME_BYTES``: Python, MLX, the tokenizer). The formulas are
``plan``'s parameter counts; an estimate, not a bound -- the evidence records it beside the measured peak.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from .plan import arch, count_params

GB = 1e9
RUNTIME_BYTES = int(1.0 * GB)  # Python, MLX, tokenizer and allocator slack (fitted to the scale table, docs/results.md)
RTN_CHUNK = 1 << 24   # quant.rtn.CHUNK_ELEMENTS (kept here: this module stays MLX-free)
GPTQ_CHUNK = 1 << 25  # quant.gptq.CHUNK_ELEMENTS
HEAD_GPTQ_CHUNK = 1 << 22  # pipeline.head.HEAD_GPTQ_ELEMENTS
F32 = 4
# per element of an [in, in] Hessian at GPTQ's peak: H (float32), its float64 copy, the permuted float64 copy that
# quant.gptq.inverse_cholesky factors in place, the float32 factor
HESSIAN_BYTES = F32 + 8 + 8 + F32
LOGIT_SLICE = 1 << 24  # evaluation.LOGIT_ELEMENTS

# what lowers each phase, for the error message
LOWER = {"allocation": "--sensitivity hessian (streamed) instead of fisher/kl, or --allocation owl",
         "blocks": "--calib-tokens (fewer calibration windows)",
         "head": "--no-gptq-head, or --calib-tokens",
         "tuning": "--e2e-steps 0 (end-to-end tuning holds the whole model twice)",
         "evaluation": "--eval-tokens (fewer evaluation windows), or --eval-tokens 0 to skip it"}


class PreflightError(RuntimeError):
    """The run would need more memory than there is (or than --max-memory-gb allows)."""


@dataclass
class MemoryEstimate:
    phases: dict = field(default_factory=dict)   # phase -> {part: bytes}
    peak_bytes: int = 0
    peak_phase: str = ""
    limit_bytes: int | None = None               # what the run may use (available memory or --max-memory-gb)
    limit_source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def fits(self) -> bool:
        return self.limit_bytes is None or self.peak_bytes <= self.limit_bytes

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in sorted(self.phases[self.peak_phase].items(),
                                                                  key=lambda kv: -kv[1]) if v)
        return f"{self.peak_phase} {self.peak_bytes / GB:.2f} GB ({parts})"


def available_bytes() -> int | None:
    """Memory this process can use now: MemAvailable on Linux, physical memory on macOS (unified memory)."""
    try:
        if sys.platform == "linux":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        if sys.platform == "darwin":
            return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                      timeout=5).stdout.strip())
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def estimate(config: dict, recipe, *, eval_tokens: int = 8192, eval_seq_len: int = 512, eval_chunk: int = 4,
             shard_bytes: int = 1 << 30) -> MemoryEstimate:
    """config: the model's config.json; recipe: a Recipe -> MemoryEstimate (limit not set)."""
    a = arch(config)
    p = count_params(config)
    D, L, V = a.hidden, a.layers, a.vocab
    q_out = a.heads * a.head_dim
    inter = a.moe_inter if a.experts else a.inter
    block = (p.attention + p.mlp) // L                       # one block's parameters (all its experts)
    largest_in = max(D, q_out, inter)
    largest = max(D * max(q_out, inter), inter * D)          # the largest dense linear (or one expert)
    total = p.total
    shard = min(shard_bytes, 2 * total)  # a shard holds at most the whole (16-bit) model
    calib = recipe.calib_tokens if recipe.needs_calibration() else 0
    qep = recipe.qep_alpha > 0 and recipe.method in ("gptq", "mixed")
    gptq_like = recipe.method in ("gptq", "mixed", "sparsegpt", "d2prune")
    tokens = max(calib // recipe.calib_seq_len, 1) * recipe.calib_seq_len if calib else 0
    # each distinct linear input (q/k/v, o, gate/up, down) plus the stream entering and leaving the block
    captured = tokens * F32 * (2 * D + q_out + inter * (a.top_k or 1))
    stream = tokens * D * F32
    def work(n: int, gptq: bool) -> int:  # a layer's work arrays: GPTQ holds ~13 [out, in] copies, the grid fit ~8
        return (13 * min(n, GPTQ_CHUNK) if gptq else 8 * min(n, RTN_CHUNK)) * F32

    blocks = {"block_float32": block * F32, "layer_copies": 2 * largest * F32,
              "layer_work": work(largest, gptq_like and recipe.bits is not None),
              "hessian": (largest_in ** 2) * HESSIAN_BYTES if calib else 0,
              "calibration": (stream * 2 + captured) * (2 if qep else 1), "output_shard": shard,
              "runtime": RUNTIME_BYTES}
    stored = F32 if config.get("torch_dtype") == "float32" else 2  # bytes a weight of the tables as read
    rotated = getattr(recipe, "rotate", "none") != "none"
    tables = 1 if a.tied and not rotated else 2  # an untied model (or a rotated one) has two tables, both quantized
    if rotated:  # the rotated tables are made before the blocks (beside the stored ones) and held through them
        blocks["tables_rotated"] = 2 * V * D * stored
    head = {"tables_stored": tables * V * D * stored + V * D,  # and the compressed head (<= 1 byte a weight)
            "layer_work": work(min(V * D, HEAD_GPTQ_CHUNK if gptq_like and recipe.gptq_head else RTN_CHUNK),
                               gptq_like and recipe.gptq_head),
            "head_inputs": tokens * D * F32 * (2 if qep and tables == 2 else 1) if gptq_like and recipe.gptq_head
            else 0,
            "hessian": D * D * HESSIAN_BYTES if gptq_like and recipe.gptq_head else 0, "output_shard": shard,
            "runtime": RUNTIME_BYTES}
    phases = {"blocks": blocks, "head": head}
    if rotated:
        phases["rotation"] = {"tables": (2 + (1 if a.tied else 2)) * V * D * stored, "runtime": RUNTIME_BYTES}
    if recipe.method == "mixed" and recipe.sensitivity in ("fisher", "kl"):
        mult = 3 if recipe.sensitivity == "fisher" else 1    # weights, gradients, the Fisher accumulators
        logits = recipe.calib_seq_len * V * F32 * (recipe.fisher_windows if recipe.sensitivity == "fisher" else 2)
        phases["allocation"] = {"model_float32": total * F32 * mult, "logits": logits, "runtime": RUNTIME_BYTES}
    elif recipe.allocation == "zero-order":
        phases["allocation"] = {"model_float32": total * F32, "wanda_ranks": (p.attention + p.mlp) * 2,
                                "runtime": RUNTIME_BYTES}
    if recipe.e2e_steps > 0:
        logits = recipe.e2e_batch * recipe.calib_seq_len * V * F32
        phases["tuning"] = {"models_float32": 2 * total * F32, "logits": 4 * logits, "runtime": RUNTIME_BYTES}
    if eval_tokens > 0:
        n_eval = max(eval_tokens // eval_seq_len, 1) * eval_seq_len
        phases["evaluation"] = {"blocks_float32": 2 * block * F32, "heads_stored": V * D * (stored + 1),
                                "hidden_states": 3 * n_eval * D * F32,
                                "activations": eval_chunk * eval_seq_len * F32 * (3 * inter + 4 * D),
                                "logits": 6 * min(LOGIT_SLICE, n_eval * V) * F32, "runtime": RUNTIME_BYTES}
    peaks = {k: sum(v.values()) for k, v in phases.items()}
    phase = max(peaks, key=peaks.get)
    return MemoryEstimate(phases={k: {n: int(b) for n, b in v.items()} for k, v in phases.items()},
                          peak_bytes=int(peaks[phase]), peak_phase=phase)


def check(config: dict, recipe, *, max_memory_gb: float | None = None, **kw) -> MemoryEstimate:
    """``estimate`` against ``max_memory_gb`` (or the available memory) -> the estimate, with its limit; raises
    PreflightError naming the phase and the flag that lowers it when the run would not fit."""
    est = estimate(config, recipe, **kw)
    if max_memory_gb is not None:
        if not max_memory_gb > 0:
            raise PreflightError(f"--max-memory-gb must be > 0, got {max_memory_gb}")
        est.limit_bytes, est.limit_source = int(max_memory_gb * GB), "--max-memory-gb"
    else:
        avail = available_bytes()
        est.limit_bytes, est.limit_source = avail, "available memory" if avail is not None else "unknown"
    if not est.fits():
        raise PreflightError(
            f"this run needs about {est.peak_bytes / GB:.1f} GB at its peak ({est.summary()}), more than the "
            f"{est.limit_bytes / GB:.1f} GB of {est.limit_source}; lower it with {LOWER[est.peak_phase]}, or set "
            "--max-memory-gb if more memory is free than reported")
    return est


def compress_memory(config: dict) -> dict:
    """The estimate for compressing this model with the common recipes (what ``plan`` and the TUI's planner show):
    {recipe name: MemoryEstimate.to_dict()}."""
    from .recipe import Recipe

    recipes = {"rtn 4-bit": Recipe(method="rtn"), "gptq 4-bit (8192 calibration tokens)": Recipe(method="gptq")}
    return {name: estimate(config, r).to_dict() for name, r in recipes.items()}
