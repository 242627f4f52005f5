"""Recipe: what to do to a model, as one small dataclass shared by the CLI, TOML files and the TUI."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .quant.formats import AFFINE_BITS, FLOAT_MODES, GROUP_SIZES
from .quant.rtn import FITS

QUANT_METHODS = ("none", "rtn", "gptq", "awq", "mixed")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
METHODS = QUANT_METHODS + PRUNE_METHODS


class RecipeError(ValueError):
    """A recipe that cannot be carried out (bad bits, group size, sparsity, method...)."""


@dataclass
class Recipe:
    method: str = "rtn"              # one of METHODS; pruners quantize afterwards when bits is set
    bits: int | None = 4             # affine bits (2-8); None = keep weights in floating point
    group_size: int = 64             # 32/64/128, or -1 per-channel (stored as 128-groups with repeated scales)
    mode: str = "affine"             # affine | mxfp4 | nvfp4 | mxfp8
    # RTN refinements
    clip_search: bool = False
    fit: str = "auto"                # group grid: auto | lsq (least squares) | zlsq (lsq, 0 on the grid) | minmax | mlx
    grid_offset: float = 0.0
    rounding: str = "nearest"        # nearest | stochastic
    # calibrated methods
    calib_tokens: int = 8192
    calib_seq_len: int = 512
    seed: int = 0
    act_order: bool = True           # GPTQ
    gptq_head: bool = True           # GPTQ also quantizes the output head (lm_head, or the tied embedding)
    head_damp: float = 0.1           # its damping: a tied table is also read as the input embedding
    embed_first: bool = False        # GPTQ a tied table on the float model's head inputs before the blocks, so the
                                     # blocks calibrate on (and compensate) the quantized input embedding
                                     # (measured: GPTQ 3-bit 25.53 -> 26.83, KL 0.530 -> 0.547; off by default)
    true_sequential: bool = False    # re-capture a block's inputs after each stage of its linears is compressed
    damp: float = 0.01               # GPTQ/SparseGPT Hessian damping (fraction of mean diagonal)
    gptq_iters: int = 1              # GPTQ passes alternated with the grid refit (quant/gptq.py)
    awq_scales: bool = False         # gptq/mixed: fold AWQ's activation-aware scales into each block first
                                     # (measured: GPTQ 3-bit linears 22.07 -> 23.59 with them; off by default)
    awq_objective: str = "layer"     # AWQ's alpha scored on each linear's output error (layer) or, for the groups
                                     # read from a norm, on the attention's / MLP's output (module, AutoAWQ's)
    qep_alpha: float = 0.5           # QEP (gptq, mixed): GPTQ aims at the weight mapping compressed inputs to float
    qep_damp: float = 1.0            # outputs, shrunk by alpha (0 = off); damping of the correction's H^-1
    tune_steps: int = 0              # block-wise Adam on the quantized linears' scales/biases, codes frozen
                                     # (quant/blockwise.py; 0 = off; measured: GPTQ 3-bit linears 22.07 -> 22.83,
                                     # KL 0.371 -> 0.381)
    tune_lr: float = 1e-3            # its learning rate, relative: lr * RMS(tensor)
    e2e_steps: int = 0               # after compression: Adam on every quantized linear's scales/biases against
                                     # KL(base || model), codes frozen (quant/e2e_qp.py; whole model in memory)
    e2e_lr: float = 3e-5             # its learning rate, relative: lr * RMS(tensor)
    e2e_batch: int = 1               # its calibration windows per step
    # mixed precision
    bits_per_weight: float | None = None
    target_mb: float | None = None
    candidate_bits: tuple[int, ...] = ()  # () = every MLX bit-width >= bits (``mixed_bits``)
    candidate_groups: tuple[int, ...] = ()  # also choose each layer's group size among these (() = group_size only)
    sensitivity: str = "hessian"     # hessian (streamed, per-layer output error) | fisher (end-to-end, incl. embeddings)
                                     # | kl (measured: the KL each layer alone adds, quant/measured.py)
    fisher_windows: int = 8          # calibration windows differentiated for the Fisher
    kl_tokens: int = 256             # calibration tokens each kl measurement scores
    allow_float: bool = False        # mixed: a layer may also stay float16 (16 bits/weight, no error)
    # pruning
    sparsity: float = 0.0
    nm: str | None = None            # "2:4", "4:8"
    allocation: str = "uniform"      # uniform | owl | zero-order
    recover: str | None = None       # admm
    # which modules: embeddings/lm_head are quantized like mlx_lm.convert does unless False
    quantize_embeddings: bool = True
    embed_bits: int | None = None    # bits for embeddings / lm_head (None = same as ``bits``, like mlx_lm.convert)
    overrides: dict = field(default_factory=dict)  # module path -> {"bits":..,"group_size":..} or False

    def validate(self) -> "Recipe":
        if self.method not in METHODS:
            raise RecipeError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.mode != "affine":
            if self.mode not in FLOAT_MODES:
                raise RecipeError(f"unknown mode {self.mode!r}; choose affine or one of {tuple(FLOAT_MODES)}")
            if self.method not in ("rtn",) + PRUNE_METHODS:
                raise RecipeError(f"mode {self.mode} is only available with rtn (MLX computes its scales)")
        elif self.bits is not None and self.bits not in AFFINE_BITS:
            raise RecipeError(f"bits={self.bits} is not supported; choose one of {AFFINE_BITS}")
        if self.embed_bits is not None and self.embed_bits not in AFFINE_BITS:
            raise RecipeError(f"embed_bits={self.embed_bits} is not supported; choose one of {AFFINE_BITS}")
        if self.group_size not in GROUP_SIZES + (-1,):
            raise RecipeError(f"group_size={self.group_size} is not supported; choose one of {GROUP_SIZES} or -1")
        if not 0.0 <= self.sparsity < 1.0:
            raise RecipeError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.method in PRUNE_METHODS and self.sparsity == 0.0 and not self.nm:
            raise RecipeError(f"method {self.method} needs --sparsity or --nm")
        if self.nm:
            try:
                n, m = (int(x) for x in self.nm.split(":"))
            except ValueError:
                raise RecipeError(f"nm must look like '2:4', got {self.nm!r}") from None
            if not 0 < n < m:
                raise RecipeError(f"nm must satisfy 0 < N < M, got {self.nm!r}")
        if self.allocation not in ("uniform", "owl", "zero-order"):
            raise RecipeError(f"allocation must be uniform, owl or zero-order, got {self.allocation!r}")
        if self.recover not in (None, "admm"):
            raise RecipeError(f"recover must be admm or unset, got {self.recover!r}")
        if self.fit not in ("auto",) + FITS:
            raise RecipeError(f"fit must be auto or one of {FITS}, got {self.fit!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise RecipeError(f"rounding must be nearest or stochastic, got {self.rounding!r}")
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
            raise RecipeError(f"candidate_groups must be a subset of {GROUP_SIZES + (-1,)}, got {self.candidate_groups}")
        if self.sensitivity not in ("hessian", "fisher", "kl"):
            raise RecipeError(f"sensitivity must be hessian, fisher or kl, got {self.sensitivity!r}")
        if self.fisher_windows < 1 or self.kl_tokens < 1:
            raise RecipeError(f"fisher_windows and kl_tokens must be >= 1, got {self.fisher_windows}, "
                              f"{self.kl_tokens}")
        if not 0.0 <= self.qep_alpha <= 1.0:
            raise RecipeError(f"qep_alpha must be in [0, 1], got {self.qep_alpha}")
        if self.awq_objective not in ("layer", "module"):
            raise RecipeError(f"awq_objective must be layer or module, got {self.awq_objective!r}")
        if self.awq_objective != "layer" and not (self.method == "awq" or self.awq_scales):
            raise RecipeError("awq_objective module goes with --method awq or --awq-scales")
        if self.awq_scales and self.method not in ("gptq", "mixed"):
            raise RecipeError("awq_scales goes with gptq or mixed (method awq always scales)")
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
        return self

    def mixed_bits(self) -> tuple[int, ...]:
        """The bit-widths mixed precision may give a layer: ``candidate_bits``, or by default every MLX bit-width
        from ``bits`` up (``bits`` is the floor). Why a floor: the allocation's loss estimates are second order,
        and below the operating point they miss how much a layer's error grows -- measured on SmolLM2 at 3.5
        bits/weight (Fisher, groups 32/64/128, 2048 wiki tokens): 29.13 with 2-bit layers allowed (44 linears got
        2 bits) vs 25.48 without, uniform GPTQ 3-bit 25.53; with each layer's 2-bit KL measured instead
        (``sensitivity="kl"``) 31.82."""
        if self.candidate_bits:
            return tuple(self.candidate_bits)
        return tuple(b for b in AFFINE_BITS if b >= (self.bits or min(AFFINE_BITS)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidate_bits"] = list(self.candidate_bits)
        d["candidate_groups"] = list(self.candidate_groups)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RecipeError(f"unknown recipe keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("candidate_bits", "candidate_groups"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d).validate()
