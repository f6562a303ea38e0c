// CPU kernels of the spatial-attention family (raw pointers; tensor-level checks, layout
// resolution and allocation live in csrc/ops/attention.cpp).
//
// Feature addressing (see acq_kernels/attention/layout.py), s = h*W + w:
//   channels_last == false: offset = n*stride_n + c*stride_c + s
//   channels_last == true:  offset = n*stride_n + s*stride_s + c
// Acc is float for float/Half/BFloat16 inputs and double for double.
#pragma once

#include <cstdint>

namespace acq::cpu {

struct AttnLayout {
  bool channels_last = false;
  int64_t stride_n = 0;
  int64_t stride_c = 0;  // channels_last == false
  int64_t stride_s = 0;  // channels_last == true
};

struct AttnShape {
  int64_t N = 0, C = 0, H = 0, W = 0;
};

// One read of f: a32 [N, HW] = mean_c |f|^p; amap [N, HW], anorm [N, HW], center [N, 2] in T;
// stats [N, 4] = (||A||_2, sum A, cx, cy) in Acc.
template <typename T, typename Acc>
void attention_map_fwd(const T* f, AttnShape shape, AttnLayout lay, double p, Acc* a32, T* amap,
                       T* anorm, T* center, Acc* stats);

// df = dA[n, s] * p |f|^(p-1) sign(f) / C (0 at f == 0): one read of f, one write of df.
template <typename T, typename Acc>
void attention_feat_bwd(const T* f, const Acc* dA, T* df, AttnShape shape, AttnLayout in,
                        AttnLayout out, double p);

// dA [N, HW] (Acc) = dL/dA from the grads of the three outputs (any may be null: no grad),
// given the forward's a32 [N, HW] and stats [N, 4]. Grads are contiguous, in Acc:
//   dA = g_amap + (g_anorm - an <an, g_anorm>) / ||A||   (g_anorm / eps where ||A|| < eps)
//      + (gx (u - cx) + gy (v - cy)) / sum A             (0 where sum A == 0)
template <typename Acc>
void attention_map_grad(const Acc* a32, const Acc* stats, const Acc* g_amap, const Acc* g_anorm,
                        const Acc* g_center, AttnShape shape, Acc* dA);

}  // namespace acq::cpu
