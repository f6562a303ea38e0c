// CUDA launchers of the spatial-attention family: raw pointers, sizes and a stream; no torch
// types, so the .cu builds with CUDA headers only. Same addressing as csrc/cpu/attention.h:
//   channels_last == false: offset = n*stride_n + c*stride_c + s
//   channels_last == true:  offset = n*stride_n + s*stride_s + c
// Each launcher returns cudaGetLastError() after its launches.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace acq::cuda {

enum class AttnDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct AttnGeom {
  int64_t N = 0, C = 0, H = 0, W = 0;
  bool channels_last = false;
  int64_t stride_n = 0, stride_c = 0, stride_s = 0;
};

// One read of f: a32 [N, HW] fp32 map, then per sample amap/anorm [N, HW] and center [N, 2]
// in the input dtype, stats [N, 4] fp32 = (||A||_2, sum A, cx, cy).
cudaError_t attention_map_fwd(const void* f, AttnDtype dtype, const AttnGeom& g, float p,
                              float* a32, void* amap, void* anorm, void* center, float* stats,
                              cudaStream_t stream);

// df = dA[n, s] * p |f|^(p-1) sign(f) / C (0 at f == 0). `out` gives df's addressing (same
// channels_last mode as `in`).
cudaError_t attention_feat_bwd(const void* f, AttnDtype dtype, const float* dA, void* df,
                               const AttnGeom& in, int64_t out_stride_n, int64_t out_stride_c,
                               int64_t out_stride_s, float p, cudaStream_t stream);

// dA [N, HW] fp32 = dL/dA from the output grads (null: no grad; contiguous fp32), given the
// forward's a32 and stats; same formula as csrc/cpu/attention.h's attention_map_grad.
cudaError_t attention_map_grad(const float* a32, const float* stats, const float* g_amap,
                               const float* g_anorm, const float* g_center, int64_t N, int64_t H,
                               int64_t W, float* dA, cudaStream_t stream);

}  // namespace acq::cuda
