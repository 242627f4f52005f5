// Quantized mat-vec, CUDA twin: helpers placed in the `header` of mx.fast.cuda_kernel (global namespace,
// before MLX's generated `__global__` wrapper). The body lives in quant_matvec_body.cu.
//
// Layout (MLX affine): w [OUT, IN*BITS/32] uint32, each row a contiguous LSB-first bitstream of BITS-bit codes
// read as little-endian words; scales/biases [K, OUT, IN/GS]; x [M, IN]; y [K, M, OUT];
// y[k, m, o] = sum_g s[k,o,g] * (q_g . x_g) + b[k,o,g] * sum(x_g).
//
// Mapping: one warp owns R consecutive output rows. Lane l walks units u = l, l+32, ... of U codes
// (U*BITS/32 packed words, loaded with the widest vector that divides them: 16-byte when U*BITS % 128 == 0).
// Each packed word is loaded once and decoded once; per group the lane keeps only the integer dot product
// q.x and sum(x), then folds in the K (scale, bias) pairs -- K replicas cost K*2 loads + 2K FMAs per group.
// Decode without int->float conversion: the masked code is OR-ed into the mantissa of a float whose exponent
// makes its value 2^(23-sh) + q, then 2^(23-sh) is subtracted (exact).
//
// Everything below is __host__ __device__ so tests can run the per-lane logic on the CPU (nvcc host pass).

#ifdef __CUDA_ARCH__
#define HOLO_LDCS(p) __ldcs(p)
#define HOLO_LDG(p) __ldg(p)
#else
#define HOLO_LDCS(p) (*(p))
#define HOLO_LDG(p) (*(p))
#endif

__host__ __device__ __forceinline__ float holo_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// 32 bits starting at bit s of the 64-bit value (hi:lo), 0 <= s < 32.
__host__ __device__ __forceinline__ uint32_t holo_funnel_r(uint32_t lo, uint32_t hi, int s) {
#ifdef __CUDA_ARCH__
  return __funnelshift_r(lo, hi, s);
#else
  return (uint32_t)((((unsigned long long)hi << 32) | lo) >> s);
#endif
}

__host__ __device__ __forceinline__ float holo_to_float(float v) { return v; }
__host__ __device__ __forceinline__ float holo_to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float holo_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__host__ __device__ __forceinline__ T holo_from_float(float v);
template <>
__host__ __device__ __forceinline__ float holo_from_float<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ __half holo_from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 holo_from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N packed words starting at p (p is 4*N-byte aligned): streaming loads, widest vector that divides N.
template <int N>
__host__ __device__ __forceinline__ void holo_load_words(const uint32_t* p, uint32_t (&wd)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 v = HOLO_LDCS(reinterpret_cast<const uint4*>(p) + i);
      wd[4 * i] = v.x;
      wd[4 * i + 1] = v.y;
      wd[4 * i + 2] = v.z;
      wd[4 * i + 3] = v.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const uint2 v = HOLO_LDCS(reinterpret_cast<const uint2*>(p) + i);
      wd[2 * i] = v.x;
      wd[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      wd[i] = HOLO_LDCS(p + i);
    }
  }
}

// 8 consecutive activations (16-byte aligned) as float; read-only path, they stay in L1 for the other rows.
__host__ __device__ __forceinline__ void holo_load_x8(const float* p, float (&v)[8]) {
  const float4 a = HOLO_LDG(reinterpret_cast<const float4*>(p));
  const float4 b = HOLO_LDG(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__host__ __device__ __forceinline__ void holo_load_x8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 raw = HOLO_LDG(reinterpret_cast<const uint4*>(p));
  const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 -> f32 is a 16-bit shift
    v[2 * i] = holo_as_float(u[i] << 16);
    v[2 * i + 1] = holo_as_float(u[i] & 0xffff0000u);
  }
}

__host__ __device__ __forceinline__ void holo_load_x8(const __half* p, float (&v)[8]) {
  const uint4 raw = HOLO_LDG(reinterpret_cast<const uint4*>(p));
  const __half* h = reinterpret_cast<const __half*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    v[i] = __half2float(h[i]);
  }
}

// Code i (0 <= i < 32*NW/BITS) of a unit held in registers, as an exact float. With i a compile-time
// constant after unrolling, every branch and shift below folds away: 1 LOP3 + 1 FADD per code
// (+1 SHF for codes that straddle two words, or sit above bit 23-BITS of their word).
template <int BITS, int NW>
__host__ __device__ __forceinline__ float holo_code(const uint32_t (&wd)[NW], const int i) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int bit = i * BITS;
  const int wi = bit >> 5;
  const int s = bit & 31;
  uint32_t v;
  int sh;
  if (s + BITS > 32) {  // straddles words wi and wi+1 (3, 5, 6 bits)
    v = holo_funnel_r(wd[wi], wd[wi + 1], s);
    sh = 0;
  } else if (s + BITS <= 23) {  // fits in the mantissa where it is
    v = wd[wi];
    sh = s;
  } else {  // high bits of the word: bring them under bit 23
    v = wd[wi] >> 16;
    sh = s - 16;
  }
  const uint32_t expo = uint32_t(150 - sh) << 23;  // float 2^(23-sh)
  return holo_as_float((v & (MASK << sh)) | expo) - holo_as_float(expo);
}

// Per-lane partial sums acc[k][r][m] for rows row0..row0+R-1 (rows past OUT are clamped to OUT-1 for reading
// and must not be stored). Summing acc over the 32 lanes of the warp gives y[k, m, row0 + r].
template <typename T, typename S, int BITS, int GS, int IN, int OUT, int M, int K, int R, int U>
__host__ __device__ __forceinline__ void holo_qmv_lane(
    const T* x, const uint32_t* w, const S* scales, const S* biases, const int row0, const int lane,
    float (&acc)[K][R][M]) {
  constexpr int WPR = IN * BITS / 32;     // packed words per row
  constexpr int NG = IN / GS;             // groups per row
  constexpr int NW = U * BITS / 32;       // packed words per unit
  constexpr int UNITS = IN / U;           // units per row
  constexpr int SUB = U < GS ? U : GS;    // codes between two folds of (scale, bias)
  static_assert(U % 32 == 0 && IN % U == 0 && IN % GS == 0 && SUB % 8 == 0, "unsupported shape");

  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    rows[r] = row0 + r < OUT ? row0 + r : OUT - 1;
  }
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[k][r][m] = 0.0f;

  for (int u = lane; u < UNITS; u += 32) {
    uint32_t wd[R][NW];  // all loads of the unit first: R*NW words in flight per lane
#pragma unroll
    for (int r = 0; r < R; ++r) {
      holo_load_words<NW>(w + (size_t)rows[r] * WPR + (size_t)u * NW, wd[r]);
    }
    const T* xu = x + (size_t)u * U;
#pragma unroll
    for (int sg = 0; sg < U / SUB; ++sg) {
      float qx[R][M];  // q . x over this (sub)group
      float sx[M];     // sum(x) over this (sub)group, shared by the R rows and K replicas
#pragma unroll
      for (int m = 0; m < M; ++m) {
        sx[m] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) qx[r][m] = 0.0f;
      }
#pragma unroll
      for (int c = 0; c < SUB; c += 8) {
        const int i0 = sg * SUB + c;
        float dq[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < 8; ++j) dq[r][j] = holo_code<BITS, NW>(wd[r], i0 + j);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xv[8];
          holo_load_x8(xu + (size_t)m * IN + i0, xv);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            sx[m] += xv[j];
#pragma unroll
            for (int r = 0; r < R; ++r) qx[r][m] = fmaf(dq[r][j], xv[j], qx[r][m]);
          }
        }
      }
      const int g = (u * U + sg * SUB) / GS;
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const size_t p = ((size_t)k * OUT + rows[r]) * NG + g;
          const float s = holo_to_float(HOLO_LDG(scales + p));
          const float b = holo_to_float(HOLO_LDG(biases + p));
#pragma unroll
          for (int m = 0; m < M; ++m) acc[k][r][m] += s * qx[r][m] + b * sx[m];
        }
    }
  }
}
