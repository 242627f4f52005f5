#!/usr/bin/env bash
# GPU check and benchmark of the quantized mat-vec kernels (mlx_holo.kernels) on a lent NVIDIA machine,
# through the session's `device` tool. That machine has python3 3.12 with the CUDA 13 libraries but no MLX and
# no registry, so MLX's CUDA build travels as wheels (see /work/shared/DEVICE.md); a call carries 64 MiB at
# most and mlx-cuda-13 is ~90 MB, so the wheels are split across folders carried by successive calls.
#
# 1. Here, once, in the repo root (needs the registry; /.whl/ is git-ignored):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_35_x86_64 -d .whl mlx==0.32.4 mlx-cuda-13==0.32.4
#      bash benchmarks/kernels_gpu.sh split
#    -> .whl/a, .whl/b (, .whl/c): at most 62 MiB each, plus MANIFEST (names, sizes, sha256).
# 2. On the device, one call per folder, back to back (the machine stays warm ~30 s after a call; the staging
#    folder /tmp/holo_whl lives outside the repo copy and survives while it is warm):
#      run(command="bash benchmarks/kernels_gpu.sh stage", carry=[".whl/a"])
#      run(command="bash benchmarks/kernels_gpu.sh run", carry=[".whl/b"], timeout_s=600)
#    (with a .whl/c: stage .whl/b too, then `run` with .whl/c). `run` stages what it carries, reassembles and
#    checks the wheels, installs them with pip --target /tmp/holo_site, then runs kernels_gpu.py, which prints
#    the tables and writes $OUT/kernels_gpu.json. Extra arguments after `run` go to kernels_gpu.py
#    (e.g. `run --quick`). If the machine went cold in between, start again from `stage`.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/holo_whl
SITE=/tmp/holo_site
CHUNK=${CHUNK:-62914560}  # 60 MiB pieces of mlx-cuda-13

stage() {
  mkdir -p "$STAGE"
  for d in .whl/a .whl/b .whl/c; do
    if [ -d "$d" ]; then cp -f "$d"/* "$STAGE"/; fi
  done
  ls -l "$STAGE"
}

case "${1:-run}" in
  split)
    python3 - "$CHUNK" <<'EOF'
import hashlib, pathlib, sys
chunk = int(sys.argv[1]); limit = 62 * 2**20  # + the repo itself (< 2 MiB) stays under 64 MiB
whl = pathlib.Path(".whl")
cuda = sorted(whl.glob("mlx_cuda_13-*.whl")); base = sorted(whl.glob("mlx-*.whl"))
assert len(cuda) == 1 and len(base) == 1, f"need exactly one mlx and one mlx-cuda-13 wheel in .whl/: {cuda} {base}"
data = cuda[0].read_bytes()
pieces = [(f"part_{i:02d}", data[o:o + chunk]) for i, o in enumerate(range(0, len(data), chunk))]
pieces.append((base[0].name, base[0].read_bytes()))
folders, sizes = [], []
for name, blob in pieces:  # first fit, in order
    for i, s in enumerate(sizes):
        if s + len(blob) <= limit:
            folders[i].append((name, blob)); sizes[i] += len(blob); break
    else:
        folders.append([(name, blob)]); sizes.append(len(blob))
manifest = (f"{cuda[0].name} {len(data)} {hashlib.sha256(data).hexdigest()}\n"
            f"{base[0].name} {base[0].stat().st_size} {hashlib.sha256(base[0].read_bytes()).hexdigest()}\n")
for letter, items in zip("abcdef", folders):
    d = whl / letter; d.mkdir(exist_ok=True)
    for name, blob in items:
        (d / name).write_bytes(blob)
    (d / "MANIFEST").write_text(manifest)
    print(f".whl/{letter}: {sum(len(b) for _, b in items) / 2**20:.1f} MiB: {[n for n, _ in items]}")
EOF
    ;;
  stage)
    stage
    ;;
  run)
    shift || true
    if [ ! -d "$SITE/mlx" ]; then  # not installed on this (warm) machine yet
      stage
      python3 - "$STAGE" <<'EOF'
import hashlib, pathlib, sys
stage = pathlib.Path(sys.argv[1])
lines = (stage / "MANIFEST").read_text().split("\n")
cuda_name, size, sha = lines[0].split()
parts = sorted(stage.glob("part_*"))
data = b"".join(p.read_bytes() for p in parts)
if len(data) != int(size) or hashlib.sha256(data).hexdigest() != sha:
    sys.exit(f"mlx-cuda-13 wheel incomplete: {len(data)} of {size} bytes from {[p.name for p in parts]}; "
             "stage the other folders first")
(stage / cuda_name).write_bytes(data)
EOF
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$STAGE"/mlx-*.whl "$STAGE"/mlx_cuda_13-*.whl
    fi
    PURELIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    LIBS=$(ls -d "$PURELIB"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
    export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
    export PYTHONPATH="$SITE:$PWD"
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
    mkdir -p "${OUT:-/tmp/holo_out}"
    python3 benchmarks/kernels_gpu.py --out "${OUT:-/tmp/holo_out}" "$@" 2>&1 | tee "${OUT:-/tmp/holo_out}/kernels_gpu.log"
    ;;
  *)
    echo "usage: $0 split|stage|run [kernels_gpu.py args]" >&2
    exit 2
    ;;
esac
