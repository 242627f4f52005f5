// Body of the Metal face (mx.fast.metal_kernel source). Inputs: x, w, scales, biases; output: y.
// Template constants as in the CUDA twin: T, S, BITS, GS, IN, OUT, M, K, R, WARPS, U.
const int holo_lane = int(thread_index_in_simdgroup);
const int holo_row0 = (int(threadgroup_position_in_grid.x) * WARPS + int(simdgroup_index_in_threadgroup)) * R;
if (holo_row0 >= OUT) {
  return;
}
float holo_acc[K * R * M];
holo_qmv_lane<T, S, BITS, GS, IN, OUT, M, K, R, U>(x, w, scales, biases, holo_row0, holo_lane, holo_acc);
for (int i = 0; i < K * R * M; ++i) {
  holo_acc[i] = metal::simd_sum(holo_acc[i]);
}
if (holo_lane == 0) {
  for (int k = 0; k < K; ++k) {
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        if (holo_row0 + r < OUT) {
          y[(k * M + m) * OUT + holo_row0 + r] = static_cast<T>(holo_acc[(k * R + r) * M + m]);
        }
      }
    }
  }
}
