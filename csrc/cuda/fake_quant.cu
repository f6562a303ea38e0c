// CUDA kernels of the fake-quantization family (see fake_quant.cuh for the contract).
//
// Elementwise kernels: grid-stride over warp tiles. A tile is 32 lanes x V elements, V chosen
// for 128-bit accesses (float4 / 8 x 16-bit / 2 x double) when x and out are 16-byte aligned;
// each tile's in-range bits are OR-combined across lanes into whole 32-bit mask words (with
// V == 1 that is exactly one __ballot_sync per 32 elements). The remainder after the last
// full vector tile runs the scalar path.
// Math: same expressions and order as the CPU kernels, with __f{mul,add}_rn so nvcc cannot
// contract a multiply-add into an FMA (which rounds once and breaks bitwise equality).
#include "cuda/fake_quant.cuh"
#include "cuda/convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace acq::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxPartials = 256;  // blocks of the per-tensor min/max pass (partials per tensor)
constexpr int kLsqTargetBlocks = 2048;
constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float rne(float v) { return rintf(v); }  // round half to even
__device__ __forceinline__ double rne(double v) { return rint(v); }

// NaN-sticky min/max, like torch.aminmax.
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
    *reinterpret_cast<uint4*>(p) = raw;
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

// (o / inner, o % inner) with 32-bit division when everything fits (inlined; the 64-bit
// division is a subroutine call).
__device__ __forceinline__ void divmod(int64_t o, int64_t d, bool small, int64_t& q,
                                       int64_t& r) {
  if (small) {
    const uint32_t q32 = static_cast<uint32_t>(o) / static_cast<uint32_t>(d);
    q = q32;
    r = static_cast<uint32_t>(o) - q32 * static_cast<uint32_t>(d);
  } else {
    q = o / d;
    r = o - q * d;
  }
}

template <typename A, bool ZpBefore, bool ViaFloat = false>
__device__ __forceinline__ A fq_elem(A xv, A sc, A inv, A zp, A qmin, A qmax, bool& in_range) {
  const A v = mul_rn(xv, inv);
  const A q = ZpBefore ? rne(add_rn(v, zp)) : add_rn(rne(v), zp);
  in_range = (q >= qmin) && (q <= qmax);
  A qc = q < qmin ? qmin : q;  // compare-and-select: NaN propagates
  qc = qc > qmax ? qmax : qc;
  if constexpr (ZpBefore) {
    // As torch (and the CPU kernel): (qc - zp) * scale in double for a float zero point.
    return static_cast<A>(__dmul_rn(__dsub_rn(static_cast<double>(qc), static_cast<double>(zp)),
                                    static_cast<double>(sc)));
  } else if constexpr (ViaFloat) {
    // torch's per-tensor kernel rounds a float64 result through fp32 (per-channel does not).
    return static_cast<A>(static_cast<float>(mul_rn(qc - zp, sc)));
  } else {
    return mul_rn(qc - zp, sc);
  }
}

// Block-wide NaN-sticky min and max; every thread gets the result.
__device__ __forceinline__ void block_minmax(float& mn, float& mx) {
  __shared__ float s_min[32], s_max[32];
  for (int off = 16; off > 0; off >>= 1) {
    mn = nan_min(mn, __shfl_xor_sync(0xffffffffu, mn, off));
    mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // s_min/s_max may still be read from a previous call
  if (lane == 0) {
    s_min[warp] = mn;
    s_max[warp] = mx;
  }
  __syncthreads();
  mn = kInf;
  mx = -kInf;
  for (int w = 0; w < nwarps; ++w) {  // fixed order; min/max are exact anyway
    mn = nan_min(mn, s_min[w]);
    mx = nan_max(mx, s_max[w]);
  }
}

// Block-wide sum in a fixed tree order (deterministic); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float s_part[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) s_part[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < nwarps; ++w) s += s_part[w];
  return s;
}

// torch.ao UniformQuantizationObserverBase._calculate_qparams as torch runs it on CUDA:
// dividing a tensor by a Python scalar there is a multiply by the fp32 reciprocal.
__device__ __forceinline__ void calc_qparams(float mn, float mx, int qmin, int qmax,
                                             bool symmetric, float eps, float* scale,
                                             int32_t* zero_point) {
  if (mn == kInf && mx == -kInf) {  // nothing observed
    *scale = 1.0f;
    *zero_point = 0;
    return;
  }
  const float min_neg = (mn < 0.0f || mn != mn) ? mn : 0.0f;
  float max_pos = (mx > 0.0f || mx != mx) ? mx : 0.0f;
  float s;
  int zp;
  if (symmetric) {
    const float neg = -min_neg;
    max_pos = (neg > max_pos || neg != neg) ? neg : max_pos;
    const float half_range = static_cast<float>(static_cast<double>(qmax - qmin) / 2);
    s = __fmul_rn(max_pos, 1.0f / half_range);
    s = (s < eps) ? eps : s;
    zp = qmin < 0 ? 0 : (qmin + qmax) / 2;
  } else {
    s = __fmul_rn(__fsub_rn(max_pos, min_neg), 1.0f / static_cast<float>(qmax - qmin));
    s = (s < eps) ? eps : s;
    const float r = rintf(__fdiv_rn(min_neg, s));
    // torch on CUDA: round(min_neg / scale).to(int32) turns NaN (min_val = -inf) into 0;
    // spelled out since a C++ cast of NaN is undefined. Otherwise |r| <= qmax - qmin.
    zp = qmin - (r == r ? static_cast<int>(r) : 0);
    zp = zp < qmin ? qmin : (zp > qmax ? qmax : zp);
  }
  *scale = s;
  *zero_point = zp;
}

// Per-tensor qparams computed in every block from the min/max partials (optionally after the
// moving-average update); block 0 writes them (and the updated buffers) out.
struct MinMaxFinish {
  const float* partials = nullptr;  // [nparts mins][nparts maxs][old min, old max]
  int nparts = 0;
  bool moving_average = false;
  float averaging_constant = 0.0f;
  float* min_val = nullptr;
  float* max_val = nullptr;
  float* scale_out = nullptr;
  int32_t* zero_point_out = nullptr;
  bool symmetric = false;
  float eps = 0.0f;
};

// The per-tensor qparams finish of a min/max pass over `nparts` partials in `workspace`.
MinMaxFinish qparams_finish(float* workspace, int nparts, float* scale, int32_t* zero_point,
                            bool symmetric, float eps) {
  MinMaxFinish fin;
  fin.partials = workspace;
  fin.nparts = nparts;
  fin.scale_out = scale;
  fin.zero_point_out = zero_point;
  fin.symmetric = symmetric;
  fin.eps = eps;
  return fin;
}

__device__ void finish_minmax(const MinMaxFinish& f, int qmin, int qmax, float* s_qp) {
  float mn = kInf, mx = -kInf;
  for (int i = threadIdx.x; i < f.nparts; i += blockDim.x) {
    mn = nan_min(mn, f.partials[i]);
    mx = nan_max(mx, f.partials[f.nparts + i]);
  }
  block_minmax(mn, mx);
  if (threadIdx.x == 0) {
    if (f.moving_average) {
      // MovingAverageMinMaxObserver.forward, on the buffers as they were before this call
      // (snapshotted by the partials pass, since block 0 overwrites them below).
      const float old_min = f.partials[2 * f.nparts];
      const float old_max = f.partials[2 * f.nparts + 1];
      if (!(old_min == kInf && old_max == -kInf)) {
        const float c = f.averaging_constant;
        mn = __fadd_rn(old_min, __fmul_rn(c, __fsub_rn(mn, old_min)));
        mx = __fadd_rn(old_max, __fmul_rn(c, __fsub_rn(mx, old_max)));
      }
      if (blockIdx.x == 0) {
        *f.min_val = mn;
        *f.max_val = mx;
      }
    }
    float s;
    int32_t zp;
    calc_qparams(mn, mx, qmin, qmax, f.symmetric, f.eps, &s, &zp);
    if (blockIdx.x == 0) {
      *f.scale_out = s;
      *f.zero_point_out = zp;
    }
    s_qp[0] = s;
    s_qp[1] = static_cast<float>(zp);
  }
  __syncthreads();
}

// The fake-quant kernel. PerChannel: qparams per element from scale[c] / zero_point[c];
// ZpBefore: float zero point added before rounding; FromMinMax: per-tensor qparams from
// min/max partials (fused observer).
template <typename T, int V, bool PerChannel, bool ZpBefore, bool FromMinMax>
__global__ void __launch_bounds__(kThreads)
    fq_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ mask,
              FqLayout l, const float* __restrict__ scale, const void* __restrict__ zero_point,
              bool zp_is_float, int quant_min, int quant_max, MinMaxFinish fin) {
  using A = acc_t<T>;
  const A qmin = static_cast<A>(quant_min);
  const A qmax = static_cast<A>(quant_max);
  const int64_t n = l.n;
  const int64_t mask_bytes = (n + 7) / 8;
  const bool small = n <= 0xffffffffLL;  // 32-bit channel arithmetic

  A t_sc = 0, t_inv = 0, t_zp = 0;  // per-tensor qparams
  if constexpr (!PerChannel) {
    float s, z;
    if constexpr (FromMinMax) {
      __shared__ float s_qp[2];
      finish_minmax(fin, quant_min, quant_max, s_qp);
      s = s_qp[0];
      z = s_qp[1];
    } else {
      s = scale[0];
      if (zp_is_float) {  // torch's per-tensor float zero point: clamp(rne(zp))
        z = rintf(static_cast<const float*>(zero_point)[0]);
        z = fminf(fmaxf(z, static_cast<float>(quant_min)), static_cast<float>(quant_max));
      } else {
        z = static_cast<float>(static_cast<const int32_t*>(zero_point)[0]);
      }
    }
    t_sc = s;
    t_inv = static_cast<A>(__frcp_rn(s));  // correctly rounded, == 1.0f / s
    t_zp = z;
  }
  auto params = [&](int64_t c, A& sc, A& inv, A& zp) {
    if constexpr (PerChannel) {
      const float s = scale[c];
      sc = s;
      inv = static_cast<A>(__frcp_rn(s));
      if constexpr (ZpBefore) {
        zp = static_cast<A>(static_cast<const float*>(zero_point)[c]);
      } else {
        zp = static_cast<A>(static_cast<const int32_t*>(zero_point)[c]);
      }
    } else {
      sc = t_sc;
      inv = t_inv;
      zp = t_zp;
    }
  };

  constexpr int kLanesPerWord = 32 / V;
  const int lane = threadIdx.x & 31;
  const int64_t gwarp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;

  // Full vector tiles (loop bounds are warp-uniform, so the shuffles are safe).
  const int64_t ntiles = V > 1 ? n / (32 * V) : 0;
  for (int64_t t = gwarp; t < ntiles; t += nwarps) {
    const int64_t base = t * (32 * V) + static_cast<int64_t>(lane) * V;
    const Vec<T, V> in = load_vec<T, V>(x + base);
    Vec<T, V> res;
    uint32_t bits = 0;
    // Per-channel: the host only picks V > 1 when inner >= V, so a vector spans at most two
    // channels; both qparam sets are loaded up front (no calls inside the unrolled loop).
    A sc0, inv0, zp0, sc1 = 0, inv1 = 0, zp1 = 0;
    int64_t first_len = V;  // elements of the vector in the first channel
    if constexpr (PerChannel) {
      int64_t q, pos, c0, unused;
      divmod(base, l.inner, small, q, pos);
      divmod(q, l.channels, small, unused, c0);
      params(c0, sc0, inv0, zp0);
      params(c0 + 1 == l.channels ? 0 : c0 + 1, sc1, inv1, zp1);
      first_len = l.inner - pos;
    } else {
      params(0, sc0, inv0, zp0);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const bool second = PerChannel && j >= first_len;
      const A sc = second ? sc1 : sc0, inv = second ? inv1 : inv0, zp = second ? zp1 : zp0;
      bool ok;
      res.v[j] = from_acc<T>(fq_elem<A, ZpBefore, !PerChannel>(to_acc(in.v[j]), sc, inv, zp, qmin, qmax, ok));
      bits |= static_cast<uint32_t>(ok) << j;
    }
    store_vec<T, V>(out + base, res);
    if (mask != nullptr) {
      // Lanes [k * kLanesPerWord, (k + 1) * kLanesPerWord) hold the 32 elements of word k.
      uint32_t w = bits << (V * (lane % kLanesPerWord));
#pragma unroll
      for (int off = 1; off < kLanesPerWord; off <<= 1) w |= __shfl_xor_sync(0xffffffffu, w, off);
      if (lane % kLanesPerWord == 0) store_mask_word(mask, mask_bytes, t * V + lane / kLanesPerWord, w);
    }
  }

  // Scalar remainder: 32 consecutive elements per warp -> one ballot word.
  const int64_t start = ntiles * (32 * V);
  const int64_t ntail = (n - start + 31) / 32;
  for (int64_t t = gwarp; t < ntail; t += nwarps) {
    const int64_t i = start + t * 32 + lane;
    bool ok = false;
    if (i < n) {
      int64_t c = 0;
      if constexpr (PerChannel) {
        int64_t q, r, unused;
        divmod(i, l.inner, small, q, r);
        divmod(q, l.channels, small, unused, c);
      }
      A sc, inv, zp;
      params(c, sc, inv, zp);
      out[i] = from_acc<T>(fq_elem<A, ZpBefore, !PerChannel>(to_acc(x[i]), sc, inv, zp, qmin, qmax, ok));
    }
    const uint32_t w = __ballot_sync(0xffffffffu, ok);
    if (mask != nullptr && lane == 0) store_mask_word(mask, mask_bytes, start / 32 + t, w);
  }
}

// out = grad * bit: one thread per mask byte (8 elements), 128-bit accesses when aligned.
template <typename T, bool Aligned>
__global__ void __launch_bounds__(kThreads)
    mask_backward_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ mask,
                         T* __restrict__ out, int64_t n) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  const int64_t nbytes = (n + 7) / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes;
       b += stride) {
    const unsigned m = mask[b];
    const int64_t i0 = b * 8;
    if (Aligned && i0 + 8 <= n) {
#pragma unroll
      for (int h = 0; h < 8 / V; ++h) {
        Vec<T, V> g = load_vec<T, V>(grad + i0 + h * V);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          g.v[j] = from_acc<T>(to_acc(g.v[j]) * static_cast<A>((m >> (h * V + j)) & 1u));
        }
        store_vec<T, V>(out + i0 + h * V, g);
      }
    } else {
      for (int k = 0; k < 8 && i0 + k < n; ++k) {
        out[i0 + k] = from_acc<T>(to_acc(grad[i0 + k]) * static_cast<A>((m >> k) & 1u));
      }
    }
  }
}

// LSQ backward, pass 1: grid (blocks_per_channel, channels). Each block walks its share of one
// channel's elements, writes dx and one fp32 partial of dscale / dzero_point.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lsq_partial_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx,
                       const float* __restrict__ scale, const float* __restrict__ zero_point,
                       FqLayout l, int quant_min, int quant_max, float grad_factor,
                       float* __restrict__ partials) {
  using A = acc_t<T>;
  const int64_t C = l.channels;
  const int64_t count = l.n / C;
  const int nbx = gridDim.x;
  const A qmin = static_cast<A>(quant_min), qmax = static_cast<A>(quant_max);
  const A gf = static_cast<A>(grad_factor);
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {  // block-uniform
    const float s = scale[c];
    const float zraw = zero_point[c];
    float z;
    if (!l.per_channel) {  // torch per-tensor: int64(clamp(zp + 0.5))
      z = fminf(fmaxf(__fadd_rn(zraw, 0.5f), static_cast<float>(quant_min)),
                static_cast<float>(quant_max));
      z = truncf(z);
    } else {  // torch per-channel: clamp(round(zp))
      z = fminf(fmaxf(rintf(zraw), static_cast<float>(quant_min)), static_cast<float>(quant_max));
    }
    const A sc = s, inv = static_cast<A>(__frcp_rn(s)), zp = z;
    const A dsmall = qmin - zp, dbig = qmax - zp;
    A s_ds = 0, s_dz = 0;
    auto body = [&](int64_t o) {
      const A g = to_acc(grad[o]);
      const A xi = to_acc(x[o]);
      const A xq = rne(add_rn(zp, mul_rn(xi, inv)));
      const bool lo = xq < qmin, hi = xq > qmax;
      dx[o] = from_acc<T>(g * static_cast<A>((xq >= qmin) && (xq <= qmax)));
      const A xc = lo ? qmin : (hi ? qmax : xq);
      const A xfq = mul_rn(xc - zp, sc);
      const A ds_in = mul_rn(mul_rn(g * (xfq - xi), inv), gf);
      const A ds_out = mul_rn(g * (lo ? dsmall : dbig), gf);
      const A dz_out = mul_rn(mul_rn(-g, sc), gf);
      s_ds = add_rn(s_ds, (lo || hi) ? ds_out : ds_in);
      s_dz = add_rn(s_dz, (lo || hi) ? dz_out : A(0));
    };
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t step = static_cast<int64_t>(nbx) * blockDim.x;
    if (C == 1) {  // per-tensor: offsets are the element index, no division
      for (int64_t j = first; j < count; j += step) body(j);
    } else if (count <= 0xffffffffLL && l.inner <= 0xffffffffLL) {
      // 32-bit division is inlined; the 64-bit one is a call that costs registers.
      const uint32_t inner = static_cast<uint32_t>(l.inner);
      for (int64_t j = first; j < count; j += step) {
        const uint32_t p = static_cast<uint32_t>(j) / inner;
        body((static_cast<int64_t>(p) * C + c) * l.inner + (static_cast<uint32_t>(j) - p * inner));
      }
    } else {
      for (int64_t j = first; j < count; j += step) {
        const int64_t p = j / l.inner;
        body((p * C + c) * l.inner + (j - p * l.inner));
      }
    }
    const float b_ds = block_sum(static_cast<float>(s_ds));
    const float b_dz = block_sum(static_cast<float>(s_dz));
    if (threadIdx.x == 0) {
      partials[(c * nbx + blockIdx.x) * 2] = b_ds;
      partials[(c * nbx + blockIdx.x) * 2 + 1] = b_dz;
    }
  }
}

// LSQ backward, pass 2: one block per channel sums its partials in a fixed order.
__global__ void __launch_bounds__(kThreads)
    lsq_finish_kernel(const float* __restrict__ partials, int nbx, int64_t channels,
                      float* __restrict__ dscale, float* __restrict__ dzero_point) {
  for (int64_t c = blockIdx.x; c < channels; c += gridDim.x) {
    float s_ds = 0.0f, s_dz = 0.0f;
    for (int b = threadIdx.x; b < nbx; b += blockDim.x) {
      s_ds += partials[(c * nbx + b) * 2];
      s_dz += partials[(c * nbx + b) * 2 + 1];
    }
    const float t_ds = block_sum(s_ds);
    const float t_dz = block_sum(s_dz);
    if (threadIdx.x == 0) {
      dscale[c] = t_ds;
      dzero_point[c] = t_dz;
    }
  }
}

// Per-tensor min/max, pass 1: one NaN-sticky partial per block. Block 0 also snapshots the
// moving-average buffers (if given) for pass 2, which overwrites them.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    minmax_partial_kernel(const T* __restrict__ x, int64_t n, float* __restrict__ partials,
                          const float* __restrict__ min_val, const float* __restrict__ max_val) {
  float mn = kInf, mx = -kInf;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = V > 1 ? n / V : 0;
  for (int64_t i = tid; i < nvec; i += nthreads) {
    const Vec<T, V> in = load_vec<T, V>(x + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float v = static_cast<float>(to_acc(in.v[j]));
      mn = nan_min(mn, v);
      mx = nan_max(mx, v);
    }
  }
  for (int64_t i = nvec * V + tid; i < n; i += nthreads) {
    const float v = static_cast<float>(to_acc(x[i]));
    mn = nan_min(mn, v);
    mx = nan_max(mx, v);
  }
  block_minmax(mn, mx);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = mn;
    partials[gridDim.x + blockIdx.x] = mx;
    if (blockIdx.x == 0 && min_val != nullptr) {
      partials[2 * gridDim.x] = *min_val;
      partials[2 * gridDim.x + 1] = *max_val;
    }
  }
}

// Per-channel observer for channels that are contiguous segments of length L (axis 0 of a
// contiguous weight): one block per channel finds min/max, computes the qparams and fake
// quantizes the segment (second read from L2). Needs L % 8 == 0 when the mask is saved, so
// that no mask byte is shared by two blocks.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    minmax_fq_segment_kernel(const T* __restrict__ x, T* __restrict__ out,
                             uint8_t* __restrict__ mask, int64_t L, int64_t C, int quant_min,
                             int quant_max, bool symmetric, float eps, float* __restrict__ scale,
                             int32_t* __restrict__ zero_point) {
  using A = acc_t<T>;
  __shared__ float s_qp[2];
  const A qmin = static_cast<A>(quant_min), qmax = static_cast<A>(quant_max);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {  // block-uniform
    const T* xs = x + c * L;
    T* os = out + c * L;
    float mn = kInf, mx = -kInf;
    for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
      const float v = static_cast<float>(to_acc(xs[j]));
      mn = nan_min(mn, v);
      mx = nan_max(mx, v);
    }
    block_minmax(mn, mx);
    if (threadIdx.x == 0) {
      float s;
      int32_t zp;
      calc_qparams(mn, mx, quant_min, quant_max, symmetric, eps, &s, &zp);
      scale[c] = s;
      zero_point[c] = zp;
      s_qp[0] = s;
      s_qp[1] = static_cast<float>(zp);
    }
    __syncthreads();
    const A sc = s_qp[0], inv = static_cast<A>(__frcp_rn(s_qp[0])), zp = s_qp[1];
    for (int64_t j0 = static_cast<int64_t>(warp) * 32; j0 < L; j0 += nwarps * 32) {  // warp-uniform
      const int64_t j = j0 + lane;
      bool ok = false;
      if (j < L) os[j] = from_acc<T>(fq_elem<A, false>(to_acc(xs[j]), sc, inv, zp, qmin, qmax, ok));
      const uint32_t w = __ballot_sync(0xffffffffu, ok);
      // The segment starts on a byte boundary, so the ballot is 4 whole mask bytes.
      if (mask != nullptr && lane < 4 && j0 + 8 * lane < L) {
        mask[(c * L + j0) / 8 + lane] = static_cast<uint8_t>(w >> (8 * lane));
      }
    }
    __syncthreads();  // s_qp is reused by the next channel
  }
}

// Per-channel observer for any dense layout: one block per channel, elements of channel c at
// offsets ((p * C + c) * inner + i); writes scale[c] / zero_point[c].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    minmax_channel_kernel(const T* __restrict__ x, FqLayout l, int quant_min, int quant_max,
                          bool symmetric, float eps, float* __restrict__ scale,
                          int32_t* __restrict__ zero_point) {
  const int64_t C = l.channels;
  const int64_t count = l.n / C;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    float mn = kInf, mx = -kInf;
    for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
      const int64_t p = j / l.inner;
      const float v = static_cast<float>(to_acc(x[(p * C + c) * l.inner + (j - p * l.inner)]));
      mn = nan_min(mn, v);
      mx = nan_max(mx, v);
    }
    block_minmax(mn, mx);
    if (threadIdx.x == 0) {
      calc_qparams(mn, mx, quant_min, quant_max, symmetric, eps, scale + c, zero_point + c);
    }
  }
}

int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return 108;
  if (cached[dev] == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = sms > 0 ? sms : 108;
  }
  return cached[dev];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int elementwise_blocks(int64_t work_items) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8;  // 2048 threads per SM
  int64_t b = ceil_div(work_items, kThreads);
  if (b > cap) b = cap;
  return static_cast<int>(b < 1 ? 1 : b);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int minmax_parts(int64_t n, int V) {
  int64_t b = ceil_div(n, static_cast<int64_t>(kThreads) * V * 4);
  if (b > kMaxPartials) b = kMaxPartials;
  return static_cast<int>(b < 1 ? 1 : b);
}

template <typename T>
struct DevType {
  using type = T;
};

// Calls f(T{}) with the device element type of dt.
template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

template <typename T, int V, bool PerChannel, bool ZpBefore, bool FromMinMax>
void launch_fq(const T* x, T* out, uint8_t* mask, const FqLayout& l, const float* scale,
               const void* zp, bool zp_is_float, int qmin, int qmax, const MinMaxFinish& fin,
               cudaStream_t stream) {
  const int blocks = elementwise_blocks(ceil_div(l.n, V));
  fq_kernel<T, V, PerChannel, ZpBefore, FromMinMax><<<blocks, kThreads, 0, stream>>>(
      x, out, mask, l, scale, zp, zp_is_float, qmin, qmax, fin);
}

// Picks the vector width from the pointers' alignment.
template <typename T, bool PerChannel, bool ZpBefore, bool FromMinMax>
void launch_fq_any(const void* x, void* out, uint8_t* mask, const FqLayout& l,
                   const float* scale, const void* zp, bool zp_is_float, int qmin, int qmax,
                   const MinMaxFinish& fin, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  T* ot = static_cast<T*>(out);
  // Per-channel vectors need inner >= V (at most two channels per vector); float64
  // per-channel stays scalar (its vector variant spills around the fp64 rint/div calls).
  if constexpr (!PerChannel || sizeof(T) < 8) {
    if (aligned16(x) && aligned16(out) && (!PerChannel || l.inner >= V)) {
      launch_fq<T, V, PerChannel, ZpBefore, FromMinMax>(xt, ot, mask, l, scale, zp, zp_is_float,
                                                        qmin, qmax, fin, stream);
      return;
    }
  }
  launch_fq<T, 1, PerChannel, ZpBefore, FromMinMax>(xt, ot, mask, l, scale, zp, zp_is_float,
                                                    qmin, qmax, fin, stream);
}

// Pass 1 of the per-tensor observer: partial min/max into ws; returns the partial count.
template <typename T>
int launch_minmax_partials(const void* x, int64_t n, float* ws, const float* min_val,
                           const float* max_val, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  if (aligned16(x)) {
    const int parts = minmax_parts(n, V);
    minmax_partial_kernel<T, V><<<parts, kThreads, 0, stream>>>(xt, n, ws, min_val, max_val);
    return parts;
  }
  const int parts = minmax_parts(n, 1);
  minmax_partial_kernel<T, 1><<<parts, kThreads, 0, stream>>>(xt, n, ws, min_val, max_val);
  return parts;
}

int lsq_blocks_per_channel(const FqLayout& l) {
  const int64_t count = l.n / (l.channels > 0 ? l.channels : 1);
  int64_t b = ceil_div(count, static_cast<int64_t>(kThreads) * 8);
  int64_t cap = kLsqTargetBlocks / (l.channels > 0 ? l.channels : 1);
  if (cap < 1) cap = 1;
  if (b > cap) b = cap;
  return static_cast<int>(b < 1 ? 1 : b);
}

}  // namespace

void fq_forward(DType dt, const void* x, void* out, uint8_t* mask, const FqLayout& l,
                const float* scale, const void* zero_point, bool zp_is_float, int quant_min,
                int quant_max, cudaStream_t stream) {
  if (l.n <= 0) return;
  const MinMaxFinish none{};
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    if (!l.per_channel) {
      launch_fq_any<T, false, false, false>(x, out, mask, l, scale, zero_point, zp_is_float,
                                            quant_min, quant_max, none, stream);
    } else if (zp_is_float) {
      launch_fq_any<T, true, true, false>(x, out, mask, l, scale, zero_point, true, quant_min,
                                          quant_max, none, stream);
    } else {
      launch_fq_any<T, true, false, false>(x, out, mask, l, scale, zero_point, false, quant_min,
                                           quant_max, none, stream);
    }
  });
}

void fq_mask_backward(DType dt, const void* grad, const uint8_t* mask, void* out, int64_t n,
                      cudaStream_t stream) {
  if (n <= 0) return;
  const int blocks = elementwise_blocks(ceil_div(n, 8));
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad);
    T* o = static_cast<T*>(out);
    if (aligned16(grad) && aligned16(out)) {
      mask_backward_kernel<T, true><<<blocks, kThreads, 0, stream>>>(g, mask, o, n);
    } else {
      mask_backward_kernel<T, false><<<blocks, kThreads, 0, stream>>>(g, mask, o, n);
    }
  });
}

size_t lsq_workspace_floats(const FqLayout& l) {
  return static_cast<size_t>(l.channels) * lsq_blocks_per_channel(l) * 2;
}

void fq_learnable_backward(DType dt, const void* grad, const void* x, void* dx, float* dscale,
                           float* dzero_point, const float* scale, const float* zero_point,
                           const FqLayout& l, int quant_min, int quant_max, float grad_factor,
                           float* workspace, cudaStream_t stream) {
  // No launch for empty input (a 0-sized grid is a launch error); the caller zero-fills.
  if (l.n <= 0 || l.channels <= 0) return;
  const int nbx = lsq_blocks_per_channel(l);
  const int gy = static_cast<int>(l.channels < 65535 ? l.channels : 65535);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    lsq_partial_kernel<T><<<dim3(nbx, gy), kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(dx), scale,
        zero_point, l, quant_min, quant_max, grad_factor, workspace);
  });
  const int gc = static_cast<int>(l.channels < 65535 ? l.channels : 65535);
  lsq_finish_kernel<<<gc, kThreads, 0, stream>>>(workspace, nbx, l.channels, dscale, dzero_point);
}

size_t minmax_workspace_floats(const FqLayout& l) {
  (void)l;
  return 2 * kMaxPartials + 2;
}

void fq_minmax_forward(DType dt, const void* x, void* out, uint8_t* mask, const FqLayout& l,
                       int quant_min, int quant_max, bool symmetric, float eps, float* scale,
                       int32_t* zero_point, float* workspace, cudaStream_t stream) {
  if (l.n <= 0) return;  // the caller fills scale = 1, zero_point = 0
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    if (!l.per_channel) {
      const MinMaxFinish fin = qparams_finish(
          workspace, launch_minmax_partials<T>(x, l.n, workspace, nullptr, nullptr, stream), scale,
          zero_point, symmetric, eps);
      launch_fq_any<T, false, false, true>(x, out, mask, l, nullptr, nullptr, false, quant_min,
                                           quant_max, fin, stream);
      return;
    }
    const int64_t L = l.n / l.channels;
    const int grid = static_cast<int>(l.channels < (1 << 30) ? l.channels : (1 << 30));
    const bool segments = l.inner == L;  // channel axis outermost in memory order
    if (segments && (mask == nullptr || L % 8 == 0)) {
      minmax_fq_segment_kernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<T*>(out), mask, L, l.channels, quant_min,
          quant_max, symmetric, eps, scale, zero_point);
      return;
    }
    minmax_channel_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), l,
                                                              quant_min, quant_max, symmetric,
                                                              eps, scale, zero_point);
    const MinMaxFinish none{};
    launch_fq_any<T, true, false, false>(x, out, mask, l, scale, zero_point, false, quant_min,
                                         quant_max, none, stream);
  });
}

void fq_moving_average_forward(DType dt, const void* x, void* out, uint8_t* mask, int64_t n,
                               float* min_val, float* max_val, float* scale,
                               int32_t* zero_point, float averaging_constant, int quant_min,
                               int quant_max, bool symmetric, float eps, float* workspace,
                               cudaStream_t stream) {
  if (n <= 0) return;
  FqLayout l;
  l.n = n;
  l.inner = n;
  l.channels = 1;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    MinMaxFinish fin = qparams_finish(
        workspace, launch_minmax_partials<T>(x, n, workspace, min_val, max_val, stream), scale,
        zero_point, symmetric, eps);
    fin.moving_average = true;  // the EMA of the stored range, written back, feeds the qparams
    fin.averaging_constant = averaging_constant;
    fin.min_val = min_val;
    fin.max_val = max_val;
    launch_fq_any<T, false, false, true>(x, out, mask, l, nullptr, nullptr, false, quant_min,
                                         quant_max, fin, stream);
  });
}

}  // namespace acq::cuda
