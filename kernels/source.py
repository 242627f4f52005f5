"""Kernel source text of the quantized mat-vec faces, and the translation units built from it.

The Metal and CUDA faces are stored as text files beside this module (``quant_matvec.{metal,cu}`` hold the
helpers passed as ``header``, ``quant_matvec_body.{metal,cu}`` the ``source`` body). Besides handing them to
``mx.fast.{metal,cuda}_kernel``, this module rebuilds what MLX's CUDA custom-kernel builder emits
(``mlx/backend/cuda/custom_kernel.cpp``: default header, our header, ``namespace mlx::core::cu``, one
``__global__`` with ``const X* name`` inputs, ``X* name`` outputs, ``constexpr int`` / ``using`` template lines,
then the body), so the CUDA twin can be compiled with ``nvcc`` where there is no GPU, and writes host harnesses
that run the per-lane logic of either face on the CPU.
"""
from __future__ import annotations

import hashlib
from importlib import resources

import mlx.core as mx


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


CUDA_HEADER = _read("quant_matvec.cu")
CUDA_BODY = _read("quant_matvec_body.cu")
METAL_HEADER = _read("quant_matvec.metal")
METAL_BODY = _read("quant_matvec_body.metal")
INPUT_NAMES = ("x", "w", "scales", "biases")
OUTPUT_NAMES = ("y",)
TEMPLATE_ORDER = ("T", "S", "BITS", "GS", "IN", "OUT", "M", "K", "R", "WARPS", "U")

CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint32: "uint32_t"}
DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def kernel_name(face: str) -> str:
    """Name with a hash of the source: MLX caches compiled CUDA modules (also on disk) by name."""
    text = CUDA_HEADER + CUDA_BODY if face == "cuda" else METAL_HEADER + METAL_BODY
    return f"holo_qmv_{face}_{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def template_args(t, s, bits, group_size, n_in, n_out, m, k, rows_per_warp, warps, unit) -> list[tuple]:
    """The template list passed to the kernel call (dtypes and ints), in TEMPLATE_ORDER."""
    vals = (t, s, bits, group_size, n_in, n_out, m, k, rows_per_warp, warps, unit)
    return list(zip(TEMPLATE_ORDER, vals))


# A stand-in for mlx/backend/cuda/device/utils.cuh: the same CUDA headers, none of MLX's helpers (unused here).
UTILS_STUB = """#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cuda/std/tuple>
"""
UTILS_STUB_PATH = "mlx/backend/cuda/device/utils.cuh"


def cuda_wrapper(name: str, template: list[tuple]) -> str:
    """One ``__global__`` function as MLX generates it for our inputs (x: T, w: uint32, scales/biases: S)."""
    tmpl = dict(template)
    in_types = {"x": tmpl["T"], "w": mx.uint32, "scales": tmpl["S"], "biases": tmpl["S"]}
    lines = [f"__global__ void custom_kernel_{name}("]
    lines += [f"    const {CUDA_TYPES[in_types[n]]}* {n}," for n in INPUT_NAMES]
    lines += [f"    {CUDA_TYPES[tmpl['T']]}* y) {{"]
    for key, val in template:
        if isinstance(val, mx.Dtype):
            lines.append(f"  using {key} = {CUDA_TYPES[val]};")
        else:
            lines.append(f"  constexpr int {key} = {int(val)};")
    return "\n".join(lines) + "\n\n" + CUDA_BODY + "\n}\n"


def cuda_translation_unit(instances: dict[str, list[tuple]]) -> str:
    """Source text MLX would compile, one ``__global__`` per (name -> template) instance."""
    parts = ['#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
             "#define inf cuda::std::numeric_limits<float>::infinity()\n\n",
             CUDA_HEADER, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"]
    parts += [cuda_wrapper(name, tmpl) for name, tmpl in instances.items()]
    parts.append("} // namespace mlx::core::cu\n")
    return "".join(parts)


_HARNESS_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static std::vector<uint4> holo_read(const std::string& path) {
  std::vector<uint4> buf;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) { std::perror(path.c_str()); std::exit(2); }
  std::fseek(f, 0, SEEK_END);
  long n = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  buf.resize((n + 15) / 16 + 1);
  if (std::fread(buf.data(), 1, n, f) != (size_t)n) { std::exit(3); }
  std::fclose(f);
  return buf;
}

template <typename T, typename S, int BITS, int GS, int IN, int OUT, int M, int K, int R, int WARPS, int U>
int holo_run(const std::string& dir) {
  std::vector<uint4> xb = holo_read(dir + "/x.bin"), wb = holo_read(dir + "/w.bin");
  std::vector<uint4> sb = holo_read(dir + "/scales.bin"), bb = holo_read(dir + "/biases.bin");
  const T* x = reinterpret_cast<const T*>(xb.data());
  const uint32_t* w = reinterpret_cast<const uint32_t*>(wb.data());
  const S* scales = reinterpret_cast<const S*>(sb.data());
  const S* biases = reinterpret_cast<const S*>(bb.data());
  std::vector<float> y((size_t)K * M * OUT, 0.0f);
  const int blocks = (OUT + WARPS * R - 1) / (WARPS * R);
  for (int blk = 0; blk < blocks; ++blk)
    for (int warp = 0; warp < WARPS; ++warp) {
      const int row0 = (blk * WARPS + warp) * R;  // as in the body
      if (row0 >= OUT) continue;
      for (int lane = 0; lane < 32; ++lane) {
        HOLO_ACC_DECL;
        HOLO_LANE_CALL;
        for (int k = 0; k < K; ++k)
          for (int r = 0; r < R; ++r)
            for (int m = 0; m < M; ++m)
              if (row0 + r < OUT) y[((size_t)k * M + m) * OUT + row0 + r] += HOLO_ACC_AT(k, r, m);
      }
    }
  FILE* f = std::fopen((dir + "/y.bin").c_str(), "wb");
  std::fwrite(y.data(), sizeof(float), y.size(), f);
  std::fclose(f);
  return 0;
}
"""


def _harness(prefix: str, instances: list[list[tuple]], types: dict) -> str:
    cases = []
    for i, tmpl in enumerate(instances):
        args = ", ".join(types[v] if isinstance(v, mx.Dtype) else str(int(v)) for _, v in tmpl)
        cases.append(f"    case {i}: return holo_run<{args}>(dir);")
    main = ("int main(int argc, char** argv) {\n  if (argc < 3) return 1;\n  const std::string dir = argv[2];\n"
            "  switch (std::atoi(argv[1])) {\n" + "\n".join(cases) + "\n  }\n  return 1;\n}\n")
    return prefix + _HARNESS_MAIN + main


def cuda_host_harness(instances: list[list[tuple]]) -> str:
    """A CUDA file whose host ``main(case, dir)`` runs ``holo_qmv_lane`` (the per-lane logic of the CUDA twin)
    for every warp and lane on the CPU, reading ``dir/{x,w,scales,biases}.bin`` and writing ``dir/y.bin``
    (float32 [K, M, OUT]); the lane sum stands in for the warp shuffle."""
    prefix = (UTILS_STUB.replace("#pragma once\n", "") + CUDA_HEADER
              + "#define HOLO_ACC_DECL float acc[K][R][M]\n"
              "#define HOLO_LANE_CALL holo_qmv_lane<T, S, BITS, GS, IN, OUT, M, K, R, U>"
              "(x, w, scales, biases, row0, lane, acc)\n#define HOLO_ACC_AT(k, r, m) acc[k][r][m]\n")
    return _harness(prefix, instances, CUDA_TYPES)


def metal_host_harness(instances: list[list[tuple]]) -> str:
    """The same harness for the Metal face's ``holo_qmv_lane``, as C++ for g++ (address spaces defined away;
    float32 only, the host has no Metal half/bfloat types)."""
    prefix = ("#include <cstdint>\n#define device\n#define thread\ntypedef unsigned int uint;\n"
              "struct uint4 { uint x, y, z, w; };\n" + METAL_HEADER
              + "#define HOLO_ACC_DECL float acc[K * R * M]\n"
              "#define HOLO_LANE_CALL holo_qmv_lane<T, S, BITS, GS, IN, OUT, M, K, R, U>"
              "(x, w, scales, biases, row0, lane, acc)\n#define HOLO_ACC_AT(k, r, m) acc[((k) * R + (r)) * M + (m)]\n")
    return _harness(prefix, instances, {mx.float32: "float"})
