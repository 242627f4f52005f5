#!/usr/bin/env bash
# GPU check and benchmark of the quantized mat-vec kernels (mlx_holo.kernels) on a machine with an NVIDIA GPU.
#
#   bash benchmarks/kernels_gpu.sh install          # once: MLX's CUDA build into the current Python environment
#   bash benchmarks/kernels_gpu.sh run [ARGS...]    # checks + timings; ARGS go to benchmarks/kernels_gpu.py
#
# `install` runs `pip install "mlx[cuda13]==0.32.4"` (CUDA 13 driver; CUDA_EXTRA=cuda12 for a CUDA 12 one) and the
# project without its CPU extras. `run` puts the NVIDIA libraries that pip installed (nvidia/*/lib) on
# LD_LIBRARY_PATH, prints the GPU, runs kernels_gpu.py and writes kernels_gpu.json and kernels_gpu.log into OUT
# (default runs/kernels_gpu). Example: bash benchmarks/kernels_gpu.sh run --quick --bits 4,2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/kernels_gpu}

case "${1:-run}" in
  install)
    $PY -m pip install "mlx[${CUDA_EXTRA:-cuda13}]==0.32.4"
    $PY -m pip install -e ".[test]"
    ;;
  run)
    shift || true
    PURELIB=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    LIBS=$(ls -d "$PURELIB"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
    export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
    mkdir -p "$OUT"
    $PY benchmarks/kernels_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/kernels_gpu.log"
    ;;
  *)
    echo "usage: $0 install|run [kernels_gpu.py args]" >&2
    exit 2
    ;;
esac
