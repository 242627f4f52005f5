"""Replicated-layer ensembles: K quantization-parameter sets over one shared low-bit code tensor.

``ensembles``: format, initialisation, EnsembleMLP / EnsembleSwitchGLU, selective replication, byte accounting;
``tune``: scale/bias/mixing-only tuning with frozen codes (per block MSE, end-to-end KL); save/load
(``save``/``load``) are ``models.save_ensemble``/``models.load_ensemble``: only ``models`` knows file layouts;
``share``: adjacent-layer code sharing (one code tensor, per-layer scales/biases, alternating least squares).
"""
from .ensembles import (MIXING, EnsembleMLP, EnsembleSwitchGLU, ReplicatedLinear, ReplicatedWeight,
                        default_perturbations, dequantize_replicas, ensemble_from_mlp, ensemble_nbytes, find_mlps,
                        find_switch_glus, fit_affine, init_replicas, mlp_output_error, pack_codes, replicate_mlps,
                        replicate_moe, select_replication)
from ..models import ensemble_modules
from ..models import load_ensemble as load
from ..models import save_ensemble as save
from .share import SharedCodes, share_codes
from .tune import TuneResult, kl_to_base, tune_block, tune_kl

__all__ = ["MIXING", "EnsembleMLP", "EnsembleSwitchGLU", "ReplicatedLinear", "ReplicatedWeight", "SharedCodes",
           "TuneResult", "default_perturbations", "dequantize_replicas", "ensemble_from_mlp", "ensemble_modules",
           "ensemble_nbytes", "find_mlps", "find_switch_glus", "fit_affine", "init_replicas", "kl_to_base", "load",
           "mlp_output_error", "pack_codes", "replicate_mlps", "replicate_moe", "save", "select_replication",
           "share_codes", "tune_block", "tune_kl"]
