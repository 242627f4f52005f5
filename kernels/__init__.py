"""GPU kernels of mlx-holo. Each kernel has three faces sharing one logic: a Metal body (mx.fast.metal_kernel),
a CUDA twin (mx.fast.cuda_kernel) and a pure-MLX reference; dispatch picks Metal, else CUDA, else the reference."""
from .quant_matvec import LaunchConfig, active_backend, launch_config, quantized_matvec, replica_matvec
from .reference import (quantized_matvec_reference, replica_matvec_naive, replica_matvec_reference,
                        unpack_codes)

__all__ = ["LaunchConfig", "active_backend", "launch_config", "quantized_matvec", "replica_matvec",
           "quantized_matvec_reference", "replica_matvec_naive", "replica_matvec_reference", "unpack_codes"]
