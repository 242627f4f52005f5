// Quantized mat-vec, Metal face: helpers placed in the `header` of mx.fast.metal_kernel. Same logic as
// quant_matvec.cu (see there for the layout): one simdgroup owns R consecutive output rows, lane l walks
// units u = l, l+32, ... of U codes (U*BITS/32 packed words, each loaded and decoded once); per group only
// q.x and sum(x) are kept, then the K (scale, bias) pairs are folded in. Plain C++14 plus address spaces,
// so tests can compile it on the CPU with `device`/`thread` defined away.

template <int BITS>
inline uint holo_extract(thread const uint* wd, int i) {
  const int bit = i * BITS;
  const int wi = bit >> 5;
  const int s = bit & 31;
  uint v = wd[wi] >> s;
  if (s + BITS > 32) {  // straddles words wi and wi+1 (3, 5, 6 bits); here 1 <= 32 - s < BITS
    v |= wd[wi + 1] << (32 - s);
  }
  return v & ((1u << BITS) - 1u);
}

// Per-lane partial sums acc[(k*R + r)*M + m] for rows row0..row0+R-1 (rows past OUT are clamped to OUT-1
// for reading and must not be stored); summing over the 32 lanes gives y[k, m, row0 + r].
template <typename T, typename S, int BITS, int GS, int IN, int OUT, int M, int K, int R, int U>
inline void holo_qmv_lane(
    const device T* x, const device uint* w, const device S* scales, const device S* biases,
    const int row0, const int lane, thread float* acc) {
  constexpr int WPR = IN * BITS / 32;   // packed words per row
  constexpr int NG = IN / GS;           // groups per row
  constexpr int NW = U * BITS / 32;     // packed words per unit
  constexpr int UNITS = IN / U;         // units per row
  constexpr int SUB = U < GS ? U : GS;  // codes between two folds of (scale, bias)

  int rows[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = row0 + r < OUT ? row0 + r : OUT - 1;
  }
  for (int i = 0; i < K * R * M; ++i) {
    acc[i] = 0.0f;
  }
  for (int u = lane; u < UNITS; u += 32) {
    uint wd[R][NW];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < NW; ++i) {
        wd[r][i] = w[rows[r] * WPR + u * NW + i];
      }
    }
    for (int sg = 0; sg < U / SUB; ++sg) {
      float qx[R * M];
      float sx[M];
      for (int m = 0; m < M; ++m) {
        sx[m] = 0.0f;
      }
      for (int i = 0; i < R * M; ++i) {
        qx[i] = 0.0f;
      }
      for (int c = 0; c < SUB; ++c) {
        const int i0 = sg * SUB + c;
        float dq[R];
        for (int r = 0; r < R; ++r) {
          dq[r] = float(holo_extract<BITS>(wd[r], i0));
        }
        for (int m = 0; m < M; ++m) {
          const float xv = float(x[m * IN + u * U + i0]);
          sx[m] += xv;
          for (int r = 0; r < R; ++r) {
            qx[r * M + m] += dq[r] * xv;
          }
        }
      }
      const int g = (u * U + sg * SUB) / GS;
      for (int k = 0; k < K; ++k) {
        for (int r = 0; r < R; ++r) {
          const int p = (k * OUT + rows[r]) * NG + g;
          const float s = float(scales[p]);
          const float b = float(biases[p]);
          for (int m = 0; m < M; ++m) {
            acc[(k * R + r) * M + m] += s * qx[r * M + m] + b * sx[m];
          }
        }
      }
    }
  }
}
