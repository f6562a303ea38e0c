// Device math of the fake-quant kernels that more than one .cu file needs: round-to-nearest
// arithmetic (no FMA contraction), NaN-sticky min/max, 128-bit vectors, the per-element fake
// quant and torch.ao's _calculate_qparams as torch computes it on CUDA.
//
// fake_quant.cu and fake_quant_observe.cu both use it (fake_quant.cu keeps its own fq_elem,
// which also covers float zero points, and its per-tensor qparams finish).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda/convert.cuh"

namespace acq::cuda::dev {

constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float rne(float v) { return rintf(v); }  // round half to even
__device__ __forceinline__ double rne(double v) { return rint(v); }

// NaN-sticky min/max, like torch.aminmax / torch.min / torch.max.
__device__ __forceinline__ float nan_min(float a, float b) { return (b < a || b != b) ? b : a; }
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// 16-byte vector of V elements (V * sizeof(T) == 16), moved as one uint4.
template <typename T, int V>
struct Vec {
  T v[V];
};
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  static_assert(V * sizeof(T) == 16 || V == 1, "vector must be 16 bytes");
  Vec<T, V> r;
  if constexpr (V == 1) {
    r.v[0] = *p;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    memcpy(&r, &raw, sizeof(raw));
  }
  return r;
}
template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& r) {
  if constexpr (V == 1) {
    *p = r.v[0];
  } else {
    uint4 raw;
    memcpy(&raw, &r, sizeof(raw));
    __stwb(reinterpret_cast<uint4*>(p), raw);  // one 128-bit store (plain stores got split)
  }
}

template <typename T, int V>
__device__ __forceinline__ void fold_minmax(const Vec<T, V>& in, float& mn, float& mx) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float v = static_cast<float>(to_acc(in.v[j]));  // x.to(float32) as the observers
    mn = nan_min(mn, v);
    mx = nan_max(mx, v);
  }
}

// Writes mask word wi (bytes 4wi..4wi+3), clipped to the mask's byte length.
__device__ __forceinline__ void store_mask_word(uint8_t* mask, int64_t mask_bytes, int64_t wi,
                                                uint32_t w) {
  const int64_t b = wi * 4;
  if (b + 4 <= mask_bytes) {
    *reinterpret_cast<uint32_t*>(mask + b) = w;
  } else {
    for (int k = 0; k < 4 && b + k < mask_bytes; ++k) mask[b + k] = static_cast<uint8_t>(w >> (8 * k));
  }
}

// Mask word of a warp tile of 32 x V elements: each lane's V in-range bits, OR-combined over
// the 32 / V lanes that hold the same 32 elements (every lane of the group gets the word).
template <int V>
__device__ __forceinline__ uint32_t tile_mask_word(uint32_t bits, int lane) {
  constexpr int kLanesPerWord = 32 / V;
  uint32_t w = bits << (V * (lane % kLanesPerWord));
#pragma unroll
  for (int off = 1; off < kLanesPerWord; off <<= 1) w |= __shfl_xor_sync(0xffffffffu, w, off);
  return w;
}

// Fake quant of one element with an integer-valued zero point: q = rne(x * inv) + zp, clamp by
// compare-and-select (NaN propagates), (qc - zp) * scale; ViaFloat: torch's per-tensor kernel
// rounds a float64 result through fp32.
template <typename A, bool ViaFloat>
__device__ __forceinline__ A fq_elem(A xv, A sc, A inv, A zp, A qmin, A qmax, bool& in_range) {
  const A q = add_rn(rne(mul_rn(xv, inv)), zp);
  in_range = (q >= qmin) && (q <= qmax);
  A qc = q < qmin ? qmin : q;
  qc = qc > qmax ? qmax : qc;
  if constexpr (ViaFloat) {
    return static_cast<A>(static_cast<float>(mul_rn(qc - zp, sc)));
  } else {
    return mul_rn(qc - zp, sc);
  }
}

// torch.ao UniformQuantizationObserverBase._calculate_qparams as torch runs it on CUDA: every
// tensor op rounds on its own (hence the _rn intrinsics), and a tensor divided by a Python
// float is a multiply by the fp32 reciprocal of that float there (BinaryDivTrueKernel's
// CPU-scalar path); min_neg / scale is tensor by tensor, an IEEE division. A range that saw
// nothing (+inf, -inf) gives torch's 1.0 / 0.
__device__ __forceinline__ void calc_qparams(float mn, float mx, int qmin, int qmax,
                                             bool symmetric, int symmetric_zero_point,
                                             float eps, float* scale, int32_t* zero_point) {
  if (mn == kInf && mx == -kInf) {
    *scale = 1.0f;
    *zero_point = 0;
    return;
  }
  const float min_neg = (mn < 0.0f || mn != mn) ? mn : 0.0f;  // torch.min(min_val, 0)
  float max_pos = (mx > 0.0f || mx != mx) ? mx : 0.0f;        // torch.max(max_val, 0)
  float s;
  int zp;
  if (symmetric) {
    const float neg = -min_neg;
    max_pos = (neg > max_pos || neg != neg) ? neg : max_pos;
    const float half_range = static_cast<float>(static_cast<double>(qmax - qmin) / 2);
    s = __fmul_rn(max_pos, __frcp_rn(half_range));
    s = (s < eps) ? eps : s;  // torch.max(scale, eps): NaN stays
    zp = symmetric_zero_point;
  } else {
    s = __fmul_rn(__fsub_rn(max_pos, min_neg), __frcp_rn(static_cast<float>(qmax - qmin)));
    s = (s < eps) ? eps : s;
    const float r = rintf(__fdiv_rn(min_neg, s));
    // torch on CUDA: round(min_neg / scale).to(int32) turns NaN (min_val = -inf) into 0;
    // spelled out since a C++ cast of NaN is undefined. Otherwise |r| <= qmax - qmin + 1.
    zp = qmin - (r == r ? static_cast<int>(r) : 0);
    zp = zp < qmin ? qmin : (zp > qmax ? qmax : zp);
  }
  *scale = s;
  *zero_point = zp;
}

}  // namespace acq::cuda::dev
