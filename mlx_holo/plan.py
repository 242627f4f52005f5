"""Memory planner: parameter count, MLX weight bytes per bit-width, KV cache, fit on Apple machines, a recipe.

Pure arithmetic over an HF ``config.json`` dict (llama / qwen / mistral / gemma / mixtral-style keys); it
imports neither MLX nor Textual, so ``python -m mlx_holo.plan`` answers instantly.

Storage follows MLX's affine format as written by ``mlx_lm.convert``: every quantized linear *and* the token
embedding store ``bits`` per weight plus one fp16 scale and one fp16 bias per group of ``group_size`` inputs,
i.e. ``bits + 32 / group_size`` bits per weight; norms, linear biases and any matrix whose input width is not a
multiple of ``group_size`` stay fp16 (mlx_lm skips those). ``bits_per_weight`` everywhere in this module is
that effective figure over the quantizable matrices (codes + scales + biases), the number mlx_lm reports.

GPU working set: Metal exposes ``recommendedMaxWorkingSetSize`` and MLX/mlx_lm wire at most that much
(``mx.set_wired_limit``); it is governed by the sysctl ``iogpu.wired_limit_mb`` (0 = macOS's default heuristic,
raise it with ``sudo sysctl iogpu.wired_limit_mb=N``). By default it is roughly two thirds to three quarters of
unified memory (e.g. ~10.7 GB reported on 16 GB Macs, ~75% on large ones). ``usable_fraction`` (default 0.75)
models it; pass 0.67 to be conservative on 8-24 GB machines.

Memory sizes are in GiB (Apple's "16 GB" is 16 * 2**30 bytes).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

APPLE_MEMORY_GB = (8, 16, 18, 24, 32, 36, 48, 64, 96, 128, 192)
PLAN_BITS = (2, 3, 4, 5, 6, 8, 16)       # 16 = unquantized fp16/bf16
QUANT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_USABLE_FRACTION = 0.75           # macOS default GPU wired limit ~ 3/4 of unified memory (see module doc)
GIB = 2**30
PREFILL_STEP = 2048                      # mlx_lm generate's default prefill_step_size

# The embedded default model (SmolLM2-135M, see DATA.md): lets `--model default` plan without the files.
SMOLLM2_135M_CONFIG = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
}


class PlanError(ValueError):
    """A config the planner cannot read (missing keys, bad numbers)."""


@dataclass
class ParamCount:
    embedding: int       # token embedding [vocab, hidden]
    attention: int       # q/k/v/o weights (+ biases, q/k norms) over all layers
    mlp: int             # dense MLP or all experts + routers (+ shared experts) over all layers
    norms: int           # per-layer norms + final norm
    lm_head: int         # 0 when tied to the embedding
    quantizable: int     # weights of matrices that MLX quantizes at this group size (linears + embedding)
    fp16: int            # everything else (norms, biases, matrices with in % group_size != 0)

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head


@dataclass
class BitsRow:
    bits: int                 # 16 = unquantized
    bits_per_weight: float    # effective over quantizable matrices (codes + scales + biases)
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    total_bytes: int
    fits_gb: list[int]        # Apple memory sizes (GiB) whose usable fraction holds total_bytes

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB


@dataclass
class PlanResult:
    model: str
    params: ParamCount
    context: int
    batch: int
    kv_bits: int
    group_size: int
    usable_fraction: float
    rows: list[BitsRow]
    target_gb: float | None
    budget_bytes: int | None                 # usable bytes of the target
    fits: bool | None                        # None without a target
    recipe: dict | None                      # kwargs for mlx_holo.recipe.Recipe(**recipe); None = does not fit
    message: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"]["total"] = self.params.total
        for r, row in zip(d["rows"], self.rows):
            r["total_gb"] = row.total_gb
        return d


# ----------------------------------------------------------------------------------------------- config

def _text_config(config: dict) -> dict:
    """Multimodal configs (gemma3, llava...) keep the language model under text_config."""
    if "text_config" in config and isinstance(config["text_config"], dict):
        merged = dict(config)
        merged.update(config["text_config"])
        return merged
    return config


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is not None:
        return default
    raise PlanError(f"config has none of {keys}")


@dataclass
class Arch:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attn_bias: bool
    qk_norm: bool
    norms_per_layer: int
    experts: int
    top_k: int
    moe_inter: int
    shared_inter: int


def arch(config: dict) -> Arch:
    """The shape of a model from its config.json (PlanError naming the problem when a value is missing or not a
    positive whole number)."""
    if not isinstance(config, dict):
        raise PlanError(f"a config is a JSON object, got {type(config).__name__}")
    try:
        return _arch(config)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise PlanError(f"config has a value that is not a positive whole number: {type(e).__name__}: {e}") from None


def _arch(config: dict) -> Arch:
    cfg = _text_config(config)
    mt = str(cfg.get("model_type", "")).lower()
    hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
    a = Arch(
        hidden=hidden,
        inter=int(_get(cfg, "intermediate_size", "ffn_dim", default=4 * hidden)),
        layers=int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers")),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        vocab=int(_get(cfg, "vocab_size")),
        tied=bool(cfg.get("tie_word_embeddings", mt.startswith("gemma"))),
        attn_bias=bool(cfg.get("attention_bias", mt in ("qwen2", "qwen2_moe"))),
        qk_norm=mt.startswith(("qwen3", "gemma3")) or bool(cfg.get("qk_norm", False)),
        norms_per_layer=4 if mt.startswith(("gemma2", "gemma3")) else 2,
        experts=experts,
        top_k=int(cfg.get("num_experts_per_tok") or 0),
        moe_inter=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0),
        shared_inter=int(cfg.get("shared_expert_intermediate_size") or 0),
    )
    for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab"):
        if getattr(a, name) <= 0:
            raise PlanError(f"config gives {name}={getattr(a, name)}")
    return a


def load_config(model: str) -> dict:
    """'default' -> the embedded SmolLM2-135M config; a folder -> its config.json; a .json file -> itself."""
    if model in (None, "", "default"):
        return dict(SMOLLM2_135M_CONFIG)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise PlanError(f"no config.json at {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PlanError(f"{path} is not a readable JSON config: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise PlanError(f"{path} holds a JSON {type(config).__name__}, not a config object")
    return config


# ----------------------------------------------------------------------------------------------- counts

def count_params(config: dict, group_size: int = 64) -> ParamCount:
    """Parameter count by component; `quantizable` = matrices MLX quantizes at this group size."""
    a = arch(config)
    quant, fp16 = 0, 0

    def linear(n_in: int, n_out: int, bias: bool = False) -> int:
        nonlocal quant, fp16
        if n_in % group_size == 0:
            quant += n_in * n_out
        else:
            fp16 += n_in * n_out
        fp16 += n_out if bias else 0
        return n_in * n_out + (n_out if bias else 0)

    q_out, kv_out = a.heads * a.head_dim, a.kv_heads * a.head_dim
    embedding = linear(a.hidden, a.vocab)                    # embedding [vocab, hidden] grouped along hidden
    lm_head = 0 if a.tied else linear(a.hidden, a.vocab)
    attention = mlp = 0
    for _ in range(a.layers):
        attention += linear(a.hidden, q_out, a.attn_bias) + sum(linear(a.hidden, kv_out, a.attn_bias) for _kv in 'kv')
        attention += linear(q_out, a.hidden)
        if a.qk_norm:
            attention += 2 * a.head_dim
            fp16 += 2 * a.head_dim
        if a.experts:
            mlp += linear(a.hidden, a.experts)                           # router
            for _e in range(a.experts):
                mlp += linear(a.hidden, a.moe_inter) + linear(a.hidden, a.moe_inter) + linear(a.moe_inter, a.hidden)
            if a.shared_inter:
                mlp += linear(a.hidden, a.shared_inter) + linear(a.hidden, a.shared_inter) + linear(a.shared_inter, a.hidden)
                mlp += linear(a.hidden, 1)                               # shared-expert gate (qwen2-moe)
        else:
            mlp += linear(a.hidden, a.inter) + linear(a.hidden, a.inter) + linear(a.inter, a.hidden)  # gate, up, down
    norms = a.layers * a.norms_per_layer * a.hidden + a.hidden
    fp16 += norms
    return ParamCount(embedding=embedding, attention=attention, mlp=mlp, norms=norms, lm_head=lm_head,
                      quantizable=quant, fp16=fp16)


def weight_bytes(params: ParamCount, bits: float, group_size: int = 64) -> int:
    """MLX affine storage: bits + 32/group_size bits per quantizable weight, fp16 for the rest; 16 = fp16."""
    if bits >= 16:
        return 2 * params.total
    return int(math.ceil(params.quantizable * (bits + 32 / group_size) / 8)) + 2 * params.fp16


def kv_cache_bytes(config: dict, context: int, batch: int = 1, kv_bits: int = 16, kv_group_size: int = 64) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * bytes_per_elem * batch * context.

    kv_bits 16 = fp16 cache; 8 or 4 = mlx_lm's QuantizedKVCache (fp16 scale + bias per kv_group_size values).
    """
    a = arch(config)
    if kv_bits >= 16:
        per_elem = 2.0
    elif kv_bits in (4, 8):
        per_elem = kv_bits / 8 + 4 / kv_group_size
    else:
        raise PlanError(f"kv_bits must be 16, 8 or 4, got {kv_bits}")
    return int(math.ceil(2 * a.layers * a.kv_heads * a.head_dim * per_elem * batch * context))


def activation_bytes(config: dict, context: int, batch: int = 1) -> int:
    """Transient working set of a chunked prefill (fp16): the widest MLP activation (gate + up + product)
    and the residual/attention buffers for one prefill step of min(context, 2048) tokens, plus fp32 logits
    of one position per sequence. An estimate from the shapes, not a measurement."""
    a = arch(config)
    step = min(context, PREFILL_STEP)
    width = max(a.inter if not a.experts else a.moe_inter * max(a.top_k, 1), a.hidden)
    per_token = 3 * width + 4 * a.hidden + a.heads * a.head_dim + 2 * a.kv_heads * a.head_dim
    return int(batch * step * per_token * 2 + batch * a.vocab * 4)


def fits_in(total_bytes: int, usable_fraction: float = DEFAULT_USABLE_FRACTION,
            sizes: tuple[int, ...] = APPLE_MEMORY_GB) -> list[int]:
    return [gb for gb in sizes if total_bytes <= gb * GIB * usable_fraction]


# ----------------------------------------------------------------------------------------------- plan

def plan(config: dict, *, context: int = 4096, batch: int = 1, target_gb: float | None = None,
         kv_bits: int = 16, group_size: int = 64, usable_fraction: float = DEFAULT_USABLE_FRACTION,
         min_uniform_bits: int = 4, method: str = "rtn", model: str = "config") -> PlanResult:
    """Memory per bit-width and, with target_gb, a recipe.

    Recommendation: the highest uniform width in (8, 6, 5, 4...) down to ``min_uniform_bits`` whose total
    fits ``target_gb * usable_fraction``; below that (3 and 2 bits lose too much uniformly, see DATA.md), mixed
    precision at the largest bits_per_weight (rounded down to 0.1) that fits, never below 2 + 32/group_size;
    otherwise the result says "does not fit".
    """
    if context <= 0 or batch <= 0:
        raise PlanError("context and batch must be positive")
    if target_gb is not None and not (math.isfinite(target_gb) and target_gb > 0):
        raise PlanError(f"target_gb must be a positive number of GB, got {target_gb}")
    if not 0 < usable_fraction <= 1:
        raise PlanError(f"usable_fraction must be in (0, 1], got {usable_fraction}")
    if group_size not in (32, 64, 128):
        raise PlanError(f"group_size must be 32, 64 or 128, got {group_size}")
    params = count_params(config, group_size)
    kv = kv_cache_bytes(config, context, batch, kv_bits)
    act = activation_bytes(config, context, batch)
    rows = []
    for bits in PLAN_BITS:
        w = weight_bytes(params, bits, group_size)
        bpw = 16.0 if bits >= 16 else bits + 32 / group_size
        total = w + kv + act
        rows.append(BitsRow(bits, bpw, w, kv, act, total, fits_in(total, usable_fraction)))
    notes = []
    if _text_config(config).get("sliding_window"):
        notes.append("sliding-window layers are counted with a full-context KV cache (upper bound)")
    result = PlanResult(model=model, params=params, context=context, batch=batch, kv_bits=kv_bits,
                        group_size=group_size, usable_fraction=usable_fraction, rows=rows, target_gb=target_gb,
                        budget_bytes=None, fits=None, recipe=None, message="", notes=notes)
    if target_gb is None:
        result.message = f"{params.total / 1e9:.3f}B parameters; give a target size for a recipe"
        return result
    budget = int(target_gb * GIB * usable_fraction)
    result.budget_bytes = budget
    for row in sorted(rows, key=lambda r: -r.bits):
        if row.bits in QUANT_BITS and row.bits >= min_uniform_bits and row.total_bytes <= budget:
            result.fits = True
            result.recipe = {"method": method, "bits": row.bits, "group_size": group_size}
            result.message = (f"uniform {row.bits}-bit g{group_size}: {row.total_gb:.2f} GiB of "
                              f"{budget / GIB:.2f} GiB usable ({target_gb:g} GB x {usable_fraction:g})")
            return result
    room = budget - kv - act - 2 * params.fp16
    bpw = math.floor(room * 8 / params.quantizable * 10) / 10 if params.quantizable and room > 0 else 0.0
    floor_bpw = min(QUANT_BITS) + 32 / group_size
    if bpw >= floor_bpw:
        result.fits = True
        floor_bits = max(b for b in QUANT_BITS if b + 32 / group_size <= bpw)  # mixed precision's lowest bits
        result.recipe = {"method": "mixed", "bits": floor_bits, "bits_per_weight": bpw, "group_size": group_size}
        total = weight_bytes(params, bpw - 32 / group_size, group_size) + kv + act
        result.message = (f"mixed precision at {bpw:.1f} bits/weight: {total / GIB:.2f} GiB of "
                          f"{budget / GIB:.2f} GiB usable ({target_gb:g} GB x {usable_fraction:g})")
        return result
    need = rows[0].total_bytes
    result.fits = False
    result.message = (f"does not fit: even 2-bit needs {need / GIB:.2f} GiB but {target_gb:g} GB x "
                      f"{usable_fraction:g} gives {budget / GIB:.2f} GiB usable (KV cache {kv / GIB:.2f} GiB; "
                      f"try a shorter context, --kv-bits 4 or a bigger machine)")
    return result


GOALS = ("fit", "best", "fastest")
# the recipe measured best at each width on the embedded model (docs/results.md; the README's goal table)
BEST_AT_BITS = {4: {"method": "gptq", "bits": 4},
                3: {"method": "gptq", "bits": 3, "calib_tokens": 16384, "e2e_steps": 60, "e2e_batch": 4,
                    "e2e_lr": 1e-4},
                2: {"method": "gptq", "bits": 2}}
FASTEST_PASSING = {"method": "rtn", "bits": 6}  # data-free; the fewest RTN bits measured to pass the default gates


def goal_recipe(goal: str, config: dict | None = None, target: float | None = None) -> tuple[dict, str]:
    """A goal -> (Recipe fields, why). ``fit``: the planner's recipe for ``target`` GB (GPTQ where a uniform width
    fits, else mixed precision at the budget that fits; ``config`` needed); ``best``: the best recipe measured at
    ``target`` bits (``BEST_AT_BITS``; GPTQ at other widths); ``fastest``: the data-free recipe with the fewest
    bits that passed the default gates when measured (``FASTEST_PASSING``)."""
    if goal == "fit":
        if config is None or target is None:
            raise PlanError("'fit in N GB' needs the model and N")
        res = plan(config, target_gb=target, method="gptq")
        if not res.fits:
            raise PlanError(res.message)
        return dict(res.recipe), res.message
    if goal == "best":
        if target is None or int(target) != target or int(target) not in QUANT_BITS:
            raise PlanError(f"'best at B bits' needs B in {sorted(QUANT_BITS)}")
        b = int(target)
        rec = dict(BEST_AT_BITS.get(b, {"method": "gptq", "bits": b}))
        return rec, (f"the best {b}-bit recipe measured (docs/results.md)" if b in BEST_AT_BITS
                     else f"GPTQ at {b} bits (calibrated rounding; no better {b}-bit recipe measured)")
    if goal == "fastest":
        return dict(FASTEST_PASSING), ("data-free RTN at the fewest bits measured to pass the default gates "
                                       "(6 bits: +2.9% PPL on the embedded model)")
    raise PlanError(f"unknown goal {goal!r}; choose one of {', '.join(GOALS)}")


def format_plan(res: PlanResult) -> str:
    p = res.params
    lines = [f"model {res.model}: {p.total:,} parameters (embedding {p.embedding:,}, attention {p.attention:,}, "
             f"mlp {p.mlp:,}, norms {p.norms:,}, lm_head {p.lm_head:,})",
             f"context {res.context} x batch {res.batch}, KV {res.kv_bits}-bit, group {res.group_size}, "
             f"usable fraction {res.usable_fraction:g}",
             f"{'bits':>4} {'bpw':>6} {'weights GiB':>11} {'KV GiB':>8} {'act GiB':>8} {'total GiB':>9}  fits (GB)"]
    for r in res.rows:
        lines.append(f"{r.bits:>4} {r.bits_per_weight:>6.2f} {r.weight_bytes / GIB:>11.3f} {r.kv_bytes / GIB:>8.3f} "
                     f"{r.activation_bytes / GIB:>8.3f} {r.total_gb:>9.3f}  {','.join(map(str, r.fits_gb)) or '-'}")
    lines.append(res.message)
    if res.recipe:
        lines.append(f"recipe: {json.dumps(res.recipe)}")
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli.plan import main
    sys.exit(main())
