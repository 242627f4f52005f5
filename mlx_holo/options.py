"""The choices a recipe offers, as plain tuples: importing this module pulls in neither MLX nor Textual (the TUI and
the planner read it), and the quantizers check their own arguments against the same values."""
from __future__ import annotations

QUANT_METHODS = ("none", "rtn", "gptq", "awq", "mixed")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "d2prune")
METHODS = QUANT_METHODS + PRUNE_METHODS
AFFINE_BITS = (2, 3, 4, 5, 6, 8)          # MLX's affine bit-widths
SWEEP_BITS = AFFINE_BITS + (16,)          # bench's sweep points (16 = float weights)
GROUP_SIZES = (32, 64, 128)               # MLX's affine group sizes (-1: per-channel, stored as 128-groups)
FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # MLX's float modes -> (bits, group size)
MODES = ("affine",) + tuple(FLOAT_MODES)
FITS = ("mlx", "minmax", "lsq", "zlsq", "sym")   # how a group's scale/bias are chosen (quant/rtn.py)
ROUNDINGS = ("nearest", "stochastic")
SENSITIVITIES = ("hessian", "fisher", "kl")
ALLOCATIONS = ("uniform", "owl", "zero-order")
RECOVERS = ("admm", "d2admm")
AWQ_OBJECTIVES = ("layer", "module")
CORPORA = ("wiki", "c4", "tiny", "code", "technical", "multilingual")  # built into exllamav2's calibration data
ROTATIONS = ("none", "hadamard")  # --rotate: none, or a randomized-Hadamard rotation folded into the weights
GGUF_BITS = (4, 5, 8)  # affine bit-widths GGUF stores exactly at group size 32 (Q4_1, Q5_1, Q8_0)
