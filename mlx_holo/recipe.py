"""Recipe: what to do to a model, as one small dataclass shared by the CLI, TOML files, evidence and the TUI.

Each field carries its command-line metadata (help, choices, stage), from which ``mlx_holo.cli`` generates the
``compress`` parser: a new option is one field here. A recipe reads from a TOML file of field = value lines
(``from_toml``; ``bits = 0`` means "keep float"), from an evidence file's ``recipe`` (``from_evidence``), and writes
back as TOML (``to_toml``). Importing this module pulls in no MLX.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .options import (AFFINE_BITS, ALLOCATIONS, AWQ_OBJECTIVES, FITS, FLOAT_MODES, GGUF_BITS, GROUP_SIZES, METHODS,
                      MODES, PRUNE_METHODS, RECOVERS, ROTATIONS, ROUNDINGS, SENSITIVITIES)

STAGES = ("format", "calibration", "gptq", "awq", "tuning", "mixed precision", "pruning", "modules")
LEGACY_KEYS = {"overrides"}  # fields older evidence files carry that no longer exist (ignored when empty)


class RecipeError(ValueError):
    """A recipe that cannot be carried out (bad bits, group size, sparsity, method...)."""


def _opt(default, help: str, stage: str, *, type=None, choices=None, zero_none: bool = False, metavar=None):
    """A Recipe field with its CLI metadata. type: int, float, str, bool or "ints" (comma-separated integers),
    read off the default unless given; zero_none: 0 on the command line / in TOML means None."""
    kind = type or {bool: bool, int: int, float: float, str: str}[default.__class__]
    return dataclasses.field(default=default, metadata={"help": help, "stage": stage, "type": kind,
                                                        "choices": choices, "zero_none": zero_none,
                                                        "metavar": metavar})


@dataclass
class Recipe:
    method: str = _opt("rtn", "quantizer, or pruner (pruners quantize afterwards when --bits is set)", "format",
                       choices=METHODS)
    bits: int | None = _opt(4, "affine bits 2,3,4,5,6,8 (0 = keep float, e.g. pruning only)", "format",
                            type=int, zero_none=True)
    group_size: int = _opt(64, "32, 64, 128 or -1 (per-channel); fitted per layer where it does not divide the "
                               "width", "format")
    mode: str = _opt("affine", "affine, or one of MLX's float formats (rtn and pruners only)", "format",
                     choices=MODES)
    fit: str = _opt("auto", "group grid: least squares (lsq), least squares with 0 on the grid (zlsq), min/max, or "
                            "mx.quantize's rule; auto: zlsq for plain rounding at <= 3 bits, else lsq", "format",
                    choices=("auto",) + FITS)
    gguf: bool = _opt(False, "grids GGUF stores exactly (mlx-holo export --gguf): group size 32, bits 4/5/8 "
                             "(Q4_1/Q5_1, and Q8_0 with 8-bit layers on the symmetric grid)", "format")
    rotate: str = _opt("none", "rotate the residual stream (and each head's values) by a seeded randomized Hadamard "
                               "matrix folded into the weights before compressing (QuaRot/SpinQuant R1+R2; unties a "
                               "tied head; RMSNorm pre-norm models)", "format", choices=ROTATIONS)
    clip_search: bool = _opt(False, "MSE-optimal clipping per group (RTN/GPTQ)", "format")
    grid_offset: float = _opt(0.0, "shift of the integer grid, in steps", "format")
    rounding: str = _opt("nearest", "rounding of RTN", "format", choices=ROUNDINGS)
    calib_corpus: str = _opt("c4", "calibration text: a built-in corpus name or a UTF-8 text file", "calibration")
    calib_tokens: int = _opt(8192, "calibration tokens", "calibration")
    calib_seq_len: int = _opt(512, "calibration window length", "calibration")
    seed: int = _opt(0, "seed of the calibration windows and of every random choice", "calibration")
    act_order: bool = _opt(True, "GPTQ: quantize columns in order of decreasing Hessian diagonal", "gptq")
    true_sequential: bool = _opt(False, "re-capture a block's inputs after each stage of its linears (q/k/v, o, "
                                        "gate/up, down)", "gptq")
    damp: float = _opt(0.01, "GPTQ/SparseGPT Hessian damping (fraction of the mean diagonal)", "gptq")
    gptq_iters: int = _opt(1, "GPTQ passes alternated with the least-squares grid refit, kept while the layer error "
                              "drops", "gptq")
    gptq_head: bool = _opt(True, "GPTQ/mixed/SparseGPT also GPTQ the output head (lm_head or tied embedding); "
                                 "--no-gptq-head rounds it", "gptq")
    head_damp: float = _opt(0.1, "GPTQ damping of the output head (a tied table is also read as the input "
                                 "embedding)", "gptq")
    embed_first: bool = _opt(False, "gptq/mixed: quantize a tied embedding table first (on the float model's head "
                                    "inputs), so the blocks calibrate on the quantized input embedding", "gptq")
    qep_alpha: float = _opt(0.5, "gptq/mixed: quantization error propagation, 0 (off) .. 1 (full correction toward "
                                 "the float model's outputs)", "gptq")
    qep_damp: float = _opt(1.0, "damping of QEP's correction (fraction of mean diag H)", "gptq")
    awq_scales: bool = _opt(False, "gptq/mixed: fold AWQ's per-channel scales into each block before GPTQ "
                                   "(AWQ+GPTQ)", "awq")
    awq_objective: str = _opt("layer", "awq (and --awq-scales): score alpha on each linear's output error, or on the "
                                       "output of the attention / MLP that reads a norm (the AWQ reference code's "
                                       "loss)", "awq", choices=AWQ_OBJECTIVES)
    tune_steps: int = _opt(0, "block-wise Adam steps on each block's scales/biases, codes frozen (0 = off)", "tuning")
    tune_lr: float = _opt(1e-3, "block-wise tuning's learning rate, relative to each tensor's RMS", "tuning")
    e2e_steps: int = _opt(0, "after compression: Adam steps on every quantized layer's scales/biases against the KL "
                             "to the float model, codes frozen, kept only if held-out windows improve (0 = off; "
                             "holds the whole model)", "tuning")
    e2e_lr: float = _opt(3e-5, "end-to-end tuning's learning rate, relative to each tensor's RMS", "tuning")
    e2e_batch: int = _opt(1, "end-to-end tuning's calibration windows per step", "tuning")
    bits_per_weight: float | None = _opt(None, "mixed: average bits/weight budget (codes + scales + biases)",
                                         "mixed precision", type=float)
    target_mb: float | None = _opt(None, "mixed: model size budget in MB", "mixed precision", type=float)
    candidate_bits: tuple[int, ...] = _opt((), "mixed: the bit-widths a layer may get, comma-separated (default: "
                                               "every bit-width >= --bits)", "mixed precision", type="ints",
                                           metavar="B,B,...")
    candidate_groups: tuple[int, ...] = _opt((), "mixed: also choose each layer's group size among these (e.g. "
                                                 "32,64,128); default: --group-size only", "mixed precision",
                                             type="ints", metavar="G,G,...")
    sensitivity: str = _opt("hessian", "mixed: per-layer output error (streamed), diagonal Fisher of the LM loss "
                                       "(embeddings join the budget), or each layer's measured KL",
                            "mixed precision", choices=SENSITIVITIES)
    fisher_windows: int = _opt(8, "mixed, fisher: calibration windows differentiated", "mixed precision")
    kl_tokens: int = _opt(256, "mixed, kl: calibration tokens each measurement scores", "mixed precision")
    allow_float: bool = _opt(False, "mixed: a layer may also stay float16 (written as a False override mlx_lm.load "
                                    "reads)", "mixed precision")
    sparsity: float = _opt(0.0, "fraction of weights pruned (pruners)", "pruning")
    nm: str | None = _opt(None, "N:M structured sparsity, e.g. 2:4", "pruning", type=str)
    allocation: str = _opt("uniform", "per-block sparsity: uniform, OWL, or OWL refined by a zero-order search",
                           "pruning", choices=ALLOCATIONS)
    recover: str | None = _opt(None, "weight recovery after the mask is fixed", "pruning", type=str, choices=RECOVERS)
    d2_lambda1: float = _opt(1.0, "d2prune: weight of the first-order activation term y|w|x (D2Prune's lambda1)",
                             "pruning")
    d2_lambda2: float = _opt(0.0, "d2prune: weight of the second-order activation term w^2 x^2 (lambda2)", "pruning")
    d2_s: float = _opt(1500.0, "d2prune: activation scale s the magnitudes are divided by", "pruning")
    d2_targets: str = _opt("v_proj", "d2prune: comma-separated layer names pruned by the activation-aware Wanda "
                                     "score without weight update ('' = none), or auto: which of q/k/v is chosen "
                                     "per block on the attention output error + rho * attention KL", "pruning")
    d2_beta: float = _opt(1.0, "--recover d2admm: the activation pre-scaling's factor beta", "pruning")
    d2_rho: float = _opt(1.0, "d2prune, --d2-targets auto: weight rho of the attention KL", "pruning")
    quantize_embeddings: bool = _opt(True, "quantize embeddings / lm_head like mlx_lm.convert (--no-quantize-"
                                           "embeddings keeps them float16)", "modules")
    embed_bits: int | None = _opt(None, "bits for embeddings / lm_head (default: --bits)", "modules", type=int)


    def validate(self) -> "Recipe":
        for f in dataclasses.fields(self):  # NaN and inf pass every comparison below: refuse them first
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise RecipeError(f"{f.name} must be a finite number, got {v}")
        if self.method not in METHODS:
            raise RecipeError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.mode != "affine":
            if self.mode not in FLOAT_MODES:
                raise RecipeError(f"unknown mode {self.mode!r}; choose affine or one of {tuple(FLOAT_MODES)}")
            if self.method not in ("rtn",) + PRUNE_METHODS:
                raise RecipeError(f"mode {self.mode} is only available with rtn (MLX computes its scales)")
        elif self.bits is not None and self.bits not in AFFINE_BITS:
            raise RecipeError(f"bits={self.bits} is not supported; choose one of {AFFINE_BITS}")
        if self.gguf:
            bad = {b for b in (self.bits, self.embed_bits, *self.candidate_bits) if b is not None} - set(GGUF_BITS)
            if self.group_size != 32 or self.mode != "affine" or bad or set(self.candidate_groups) - {32}:
                raise RecipeError("gguf grids need --group-size 32, affine mode and bits among "
                                  f"{GGUF_BITS} (bits, embed_bits, candidate_bits); got group size "
                                  f"{self.group_size}, mode {self.mode}, bits {sorted(bad) or 'ok'}")
        if self.embed_bits is not None and self.embed_bits not in AFFINE_BITS:
            raise RecipeError(f"embed_bits={self.embed_bits} is not supported; choose one of {AFFINE_BITS}")
        if self.group_size not in GROUP_SIZES + (-1,):
            raise RecipeError(f"group_size={self.group_size} is not supported; choose one of {GROUP_SIZES} or -1")
        if not 0.0 <= self.sparsity < 1.0:
            raise RecipeError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.method not in PRUNE_METHODS and (self.sparsity or self.nm or self.recover
                                                 or self.allocation != "uniform"):
            raise RecipeError(f"sparsity, nm, recover and allocation are for the pruners {PRUNE_METHODS}; method "
                              f"{self.method} would ignore them (use e.g. --method sparsegpt --bits 4)")
        if self.method in PRUNE_METHODS and self.sparsity == 0.0 and not self.nm:
            raise RecipeError(f"method {self.method} needs --sparsity or --nm")
        if self.nm:
            try:
                n, m = (int(x) for x in self.nm.split(":"))
            except ValueError:
                raise RecipeError(f"nm must look like '2:4', got {self.nm!r}") from None
            if not 0 < n < m:
                raise RecipeError(f"nm must satisfy 0 < N < M, got {self.nm!r}")
        if self.d2_beta <= 0:
            raise RecipeError(f"d2_beta must be > 0, got {self.d2_beta}")
        if self.d2_s <= 0 or self.d2_lambda1 < 0 or self.d2_lambda2 < 0 or self.d2_rho < 0:
            raise RecipeError(f"d2_s must be > 0 and d2_lambda1/d2_lambda2/d2_rho >= 0, got {self.d2_s}, "
                              f"{self.d2_lambda1}, {self.d2_lambda2}, {self.d2_rho}")
        if self.allocation not in ALLOCATIONS:
            raise RecipeError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.recover is not None and self.recover not in RECOVERS:
            raise RecipeError(f"recover must be one of {RECOVERS} or unset, got {self.recover!r}")
        if self.fit not in ("auto",) + FITS:
            raise RecipeError(f"fit must be auto or one of {FITS}, got {self.fit!r}")
        if self.rounding not in ROUNDINGS:
            raise RecipeError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.method == "mixed" and (self.bits_per_weight is None) == (self.target_mb is None):
            raise RecipeError("method mixed needs exactly one of --bits-per-weight or --target-mb")
        if any(b not in AFFINE_BITS for b in self.candidate_bits):
            raise RecipeError(f"candidate_bits must be a subset of {AFFINE_BITS}, got {self.candidate_bits}")
        if self.method == "mixed" and self.bits_per_weight is not None:
            g = max(128 if x == -1 else x for x in (self.candidate_groups or (self.group_size,)))
            floor = min(self.mixed_bits()) + 32 / g  # the cheapest choice: fewest bits, largest groups
            if self.bits_per_weight < floor:
                raise RecipeError(f"bits_per_weight={self.bits_per_weight} is below the cheapest choice, "
                                  f"{min(self.mixed_bits())} bits at group size {g} = {floor:g} bits/weight; lower "
                                  "--bits (mixed precision's floor), pass --candidate-bits or larger --candidate-groups")
        if self.allow_float and self.method != "mixed":
            raise RecipeError("allow_float is a choice of mixed precision's allocation: use --method mixed")
        if any(g not in GROUP_SIZES + (-1,) for g in self.candidate_groups):
            raise RecipeError(f"candidate_groups must be a subset of {GROUP_SIZES + (-1,)}, got "
                              f"{self.candidate_groups}")
        if self.sensitivity not in SENSITIVITIES:
            raise RecipeError(f"sensitivity must be one of {SENSITIVITIES}, got {self.sensitivity!r}")
        if self.fisher_windows < 1 or self.kl_tokens < 1:
            raise RecipeError(f"fisher_windows and kl_tokens must be >= 1, got {self.fisher_windows}, "
                              f"{self.kl_tokens}")
        if not 0.0 <= self.qep_alpha <= 1.0:
            raise RecipeError(f"qep_alpha must be in [0, 1], got {self.qep_alpha}")
        if self.awq_objective not in AWQ_OBJECTIVES:
            raise RecipeError(f"awq_objective must be one of {AWQ_OBJECTIVES}, got {self.awq_objective!r}")
        if self.awq_objective != "layer" and not (self.method == "awq" or self.awq_scales):
            raise RecipeError("awq_objective module goes with --method awq or --awq-scales")
        if self.awq_scales and self.method not in ("gptq", "mixed"):
            raise RecipeError("awq_scales goes with gptq or mixed (method awq always scales)")
        if self.rotate not in ROTATIONS:
            raise RecipeError(f"rotate must be one of {ROTATIONS}, got {self.rotate!r}")
        if self.rotate != "none" and self.embed_first:
            raise RecipeError("embed_first quantizes a tied table; --rotate unties it: use one or the other")
        if self.embed_first and (self.method not in ("gptq", "mixed") or not self.gptq_head):
            raise RecipeError("embed_first goes with gptq or mixed and the GPTQ'd head (no --no-gptq-head)")
        if self.gptq_iters < 1:
            raise RecipeError(f"gptq_iters must be >= 1, got {self.gptq_iters}")
        for name in ("tune", "e2e"):  # the two scale/bias tuners (block-wise, end-to-end) share their rules
            steps, lr = getattr(self, f"{name}_steps"), getattr(self, f"{name}_lr")
            if steps < 0 or lr <= 0:
                raise RecipeError(f"{name}_steps must be >= 0 and {name}_lr > 0, got {steps}, {lr}")
            if steps and (self.mode != "affine" or self.bits is None or self.method == "none"):
                raise RecipeError(f"{name}_steps tunes affine quantization parameters: it needs --bits and mode affine")
            if steps and self.method in PRUNE_METHODS:
                raise RecipeError(f"{name}_steps would move the stored zeros of a pruned weight; not with pruning")
        if self.e2e_batch < 1:
            raise RecipeError(f"e2e_batch must be >= 1, got {self.e2e_batch}")
        if self.qep_damp <= 0:
            raise RecipeError(f"qep_damp must be > 0, got {self.qep_damp}")
        if self.calib_tokens < 0 or self.calib_seq_len <= 0:
            raise RecipeError("calib_tokens must be >= 0 and calib_seq_len > 0")
        if self.needs_calibration() and self.calib_tokens < self.calib_seq_len:
            raise RecipeError(f"calib_tokens={self.calib_tokens} is less than one {self.calib_seq_len}-token window; "
                              f"method {self.method} calibrates on whole windows: give --calib-tokens >= "
                              f"{self.calib_seq_len} (or a shorter --calib-seq-len)")
        if not isinstance(self.calib_corpus, str) or not self.calib_corpus:
            raise RecipeError("calib_corpus must be a corpus name or a text file")
        return self

    def mixed_bits(self) -> tuple[int, ...]:
        """The bit-widths mixed precision may give a layer: ``candidate_bits``, or by default every MLX bit-width
        from ``bits`` up (``bits`` is the floor: the allocation's loss estimates are second order, and below the
        operating point they miss how fast a layer's error grows; docs/experiments.md, "mixed precision floor")."""
        if self.candidate_bits:
            return tuple(self.candidate_bits)
        return tuple(b for b in AFFINE_BITS if b >= (self.bits or min(AFFINE_BITS)))

    def needs_calibration(self) -> bool:
        """Does carrying out the recipe read calibration text? (Only data-free RTN and magnitude pruning do not.)"""
        return (self.method not in ("rtn", "magnitude") or self.allocation != "uniform" or self.tune_steps > 0
                or self.e2e_steps > 0 or self.recover is not None)  # ADMM recovery fits the inputs' H

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidate_bits"] = list(self.candidate_bits)
        d["candidate_groups"] = list(self.candidate_groups)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A (possibly partial) dict of fields -> validated Recipe; unknown keys are an error. Fields not given keep
        their defaults; a ``zero_none`` field given as 0 is None."""
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe is a table of field = value, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if not (k in LEGACY_KEYS and not v)}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise RecipeError(f"unknown recipe keys: {sorted(unknown)}")
        out = {}
        for k, v in d.items():
            meta = fields[k].metadata
            if meta["type"] == "ints":
                if not isinstance(v, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in v):
                    raise RecipeError(f"{k} must be a list of integers, got {v!r}")
                v = tuple(v)
            elif v is None:
                if fields[k].default is not None:
                    raise RecipeError(f"{k} cannot be null (it has no unset value)")
            else:
                want = meta["type"]
                ok = isinstance(v, want) and (want is bool or not isinstance(v, bool))
                if want is float and isinstance(v, int) and not isinstance(v, bool):
                    v, ok = float(v), True
                if not ok:
                    raise RecipeError(f"{k} must be a {want.__name__}, got {v!r}")
                if meta["zero_none"] and v == 0:
                    v = None
            out[k] = v
        return cls(**out).validate()

    @classmethod
    def from_toml(cls, path: str | Path) -> "Recipe":
        """A TOML file of ``field = value`` lines (optionally under a ``[recipe]`` table) -> Recipe."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            d = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise RecipeError(f"cannot read recipe {path}: {e}") from None
        return cls.from_dict(d.get("recipe", d) if set(d) <= {"recipe"} else d)

    @classmethod
    def from_evidence(cls, path: str | Path) -> "Recipe":
        """The recipe recorded in an evidence JSON file (what produced that run) -> Recipe."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RecipeError(f"cannot read evidence {path}: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("recipe"), dict):
            raise RecipeError(f"{path} has no recipe object")
        return cls.from_dict(d["recipe"])

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """A recipe file: ``.json`` (an evidence file's recipe) or TOML."""
        return cls.from_evidence(path) if str(path).endswith(".json") else cls.from_toml(path)

    def changes(self) -> dict:
        """The fields that differ from the defaults, {name: value}."""
        default = Recipe()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def to_flags(self) -> list[str]:
        """The command-line flags (``compress``'s, generated from the same metadata) that give this recipe: one per
        field that differs from the defaults."""
        out = []
        for name, v in self.changes().items():
            meta, flag = self.__dataclass_fields__[name].metadata, "--" + name.replace("_", "-")
            if meta["type"] is bool:
                out.append(flag if v else "--no-" + name.replace("_", "-"))
            elif v is None:
                out += [flag, "0"] if meta["zero_none"] else []
            else:
                out += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
        return out

    def to_toml(self) -> str:
        """TOML that ``from_toml`` reads back to this recipe (None fields are left out; bits None is 0)."""
        lines = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                if not f.metadata["zero_none"]:
                    continue
                v = 0
            lines.append(f"{f.name} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def to_args(self) -> list[str]:
        """The command-line flags (of ``compress``) that give this recipe, defaults left out."""
        args = []
        for name, v in self.changes().items():
            f = next(f for f in dataclasses.fields(self) if f.name == name)
            flag = "--" + name.replace("_", "-")
            if f.metadata["type"] is bool:
                args.append(flag if v else f"--no-{name.replace('_', '-')}")
            elif v is None:
                args += [flag, "0"] if f.metadata["zero_none"] else []
            else:
                args += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
        return args


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)
