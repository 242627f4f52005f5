"""Replicated-layer ensembles: K quantization-parameter sets over one shared low-bit code tensor.

``ensembles``: format, initialisation, EnsembleMLP / EnsembleSwitchGLU, selective replication, byte accounting;
``tune``: scale/bias/mixing-only tuning with frozen codes (per block MSE, end-to-end KL), on ``mlx_holo.tune``'s
optimiser; ``io``: save/load of ensemble folders (``save``/``load``);
``share``: adjacent-layer code sharing (one code tensor, per-layer scales/biases, alternating least squares).
"""
from .ensembles import (MIXING, EnsembleMLP, EnsembleSwitchGLU, ReplicatedLinear, ReplicatedWeight,
                        default_perturbations, dequantize_replicas, ensemble_from_mlp, ensemble_nbytes, find_mlps,
                        find_switch_glus, fit_affine, init_replicas, mlp_output_error, pack_codes, replicate_mlps,
                        replicate_moe, select_replication)
from .io import ensemble_modules
from .io import load_ensemble as load
from .io import save_ensemble as save
from .share import SharedCodes, share_codes
from .tune import TuneResult, tune_ensemble_block, tune_ensemble_kl

__all__ = ["MIXING", "EnsembleMLP", "EnsembleSwitchGLU", "ReplicatedLinear", "ReplicatedWeight", "SharedCodes",
           "TuneResult", "default_perturbations", "dequantize_replicas", "ensemble_from_mlp", "ensemble_modules",
           "ensemble_nbytes", "find_mlps", "find_switch_glus", "fit_affine", "init_replicas", "load",
           "mlp_output_error", "pack_codes", "replicate_mlps", "replicate_moe", "save", "select_replication",
           "share_codes", "tune_ensemble_block", "tune_ensemble_kl"]
