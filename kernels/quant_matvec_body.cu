// Body of the CUDA twin (mx.fast.cuda_kernel source). Inputs: x, w, scales, biases; output: y.
// Template constants: T (x, y), S (scales, biases), BITS, GS, IN, OUT, M, K, R (rows per warp),
// WARPS (warps per block), U (codes per lane step). Launch: threadgroup (32*WARPS), grid covering
// ceil(OUT / (WARPS*R)) blocks.
const int holo_lane = threadIdx.x & 31;
const int holo_row0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * R;
if (holo_row0 >= OUT) {
  return;  // warp-uniform: every lane of the warp leaves together
}
float holo_acc[K][R][M];
holo_qmv_lane<T, S, BITS, GS, IN, OUT, M, K, R, U>(x, w, scales, biases, holo_row0, holo_lane, holo_acc);
#pragma unroll
for (int k = 0; k < K; ++k)
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = holo_acc[k][r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      holo_acc[k][r][m] = v;
    }
if (holo_lane == 0) {
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (holo_row0 + r < OUT) y[((size_t)k * M + m) * OUT + holo_row0 + r] = holo_from_float<T>(holo_acc[k][r][m]);
}
