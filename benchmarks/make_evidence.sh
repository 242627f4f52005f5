#!/usr/bin/env bash
# Regenerate evidence/*.json on the embedded model: one python -m mlx_holo.compress run per variant.
# Usage: bash benchmarks/make_evidence.sh [EVAL_TOKENS] [VARIANT...]   (default 8192 tokens, all variants)
# Each run writes runs/evidence/<name>/ (weights + evidence.json); the evidence is copied to evidence/<name>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-8192}; shift || true
declare -A V=(
  [rtn8-g64]="--method rtn --bits 8 --group-size 64"
  [rtn6-g64]="--method rtn --bits 6 --group-size 64"
  [rtn4-g64]="--method rtn --bits 4 --group-size 64"
  [rtn3-g64]="--method rtn --bits 3 --group-size 64"
  [rtn2-g64]="--method rtn --bits 2 --group-size 64"
  [gptq4-g64]="--method gptq --bits 4 --group-size 64 --calib-tokens 8192"
  [gptq3-g64]="--method gptq --bits 3 --group-size 64 --calib-tokens 8192"
  [awq4-g64]="--method awq --bits 4 --group-size 64 --calib-tokens 8192"
  [awq3-g64]="--method awq --bits 3 --group-size 64 --calib-tokens 8192"
  [mixed3.5-g64]="--method mixed --bits-per-weight 3.5 --group-size 64 --calib-tokens 8192"
)
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(rtn8-g64 rtn6-g64 rtn4-g64 rtn3-g64 rtn2-g64)
mkdir -p evidence runs/evidence
for n in "${names[@]}"; do
  python3 -m mlx_holo.compress ${V[$n]} --eval-tokens "$T" --out "runs/evidence/$n" --overwrite || true  # NO-GO exits 1
  cp "runs/evidence/$n/evidence.json" "evidence/$n.json"
done
python3 -m mlx_holo.validate evidence/*.json || true
