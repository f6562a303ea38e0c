// CUDA kernels of the spatial-attention family; see attention.cuh.
#include "cuda/attention.cuh"
#include "cuda/convert.cuh"
#include "cuda/launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace acq::cuda {
namespace {

constexpr float kEps = 1e-12f;  // norm clamp, as acq_kernels.attention.reference.EPS
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGridY = 65535;

template <bool kSquare>
__device__ __forceinline__ float pow_abs(float x, float p) {
  if constexpr (kSquare) {
    return x * x;
  } else {
    return expf(p * logf(fabsf(x)));  // 0 at x == 0 (exp(-inf)); NaN stays NaN
  }
}

// V consecutive elements moved as one V * sizeof(T)-byte access (up to 128 bits).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// Pixels contiguous: a block covers block_s pixel vectors (V consecutive pixels per thread,
// one V-wide load per channel) x kThreads/block_s channel groups, so small maps (7x7) still
// keep every thread busy; each thread keeps four channel chains (four loads in flight), the
// groups combine in shared memory in a fixed order.
template <typename T, bool kSquare, int V>
__global__ void __launch_bounds__(kThreads, 4)
    map_nchw_kernel(const T* __restrict__ f, float* __restrict__ a32, int64_t N, int C, int HW,
                    int64_t stride_n, int64_t stride_c, float p, int block_s) {
  __shared__ float part[kThreads * V];
  const int groups = kThreads / block_s;
  const int ls = threadIdx.x % block_s, grp = threadIdx.x / block_s;
  const int s = (blockIdx.x * block_s + ls) * V;  // HW % V == 0: all V pixels or none
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    float acc[4][V] = {};
    if (s < HW) {
      const T* x = f + n * stride_n + s;
      int c = grp;
      for (; c + 3 * groups < C; c += 4 * groups) {
        Pack<T, V> in[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) in[k] = load_pack<T, V>(x + static_cast<int64_t>(c + k * groups) * stride_c);
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[k][j] += pow_abs<kSquare>(to_acc(in[k].v[j]), p);
      }
      for (; c < C; c += groups) {
        const Pack<T, V> in = load_pack<T, V>(x + static_cast<int64_t>(c) * stride_c);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[0][j] += pow_abs<kSquare>(to_acc(in.v[j]), p);
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) part[threadIdx.x * V + j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
    __syncthreads();
    if (grp == 0 && s < HW) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float tot = 0.f;
        for (int g = 0; g < groups; ++g) tot += part[(g * block_s + ls) * V + j];
        a32[n * HW + s + j] = tot / static_cast<float>(C);
      }
    }
    __syncthreads();
  }
}

// Channels contiguous: tpp threads per pixel (a power of two <= 32, so a warp holds 32 / tpp
// pixels), each summing V consecutive channels per load with four loads in flight, then a
// shuffle tree within the pixel's lanes.
template <typename T, bool kSquare, int V>
__global__ void __launch_bounds__(kThreads, 4)
    map_nhwc_kernel(const T* __restrict__ f, float* __restrict__ a32, int64_t N, int C, int HW,
                    int64_t stride_n, int64_t stride_s, float p, int tpp) {
  const int sub = threadIdx.x % tpp;
  const int s = blockIdx.x * (kThreads / tpp) + threadIdx.x / tpp;
  const int cv = C / V;  // C % V == 0
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // block-uniform: shuffles stay safe
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (s < HW) {
      const T* x = f + n * stride_n + static_cast<int64_t>(s) * stride_s;
      int k = sub;
      for (; k + 3 * tpp < cv; k += 4 * tpp) {
        Pack<T, V> in[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) in[u] = load_pack<T, V>(x + (k + u * tpp) * V);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[u] += pow_abs<kSquare>(to_acc(in[u].v[j]), p);
      }
      for (; k < cv; k += tpp) {
        const Pack<T, V> in = load_pack<T, V>(x + k * V);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[0] += pow_abs<kSquare>(to_acc(in.v[j]), p);
      }
    }
    float tot = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int off = tpp / 2; off > 0; off >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, off);
    if (s < HW && sub == 0) a32[n * HW + s] = tot / static_cast<float>(C);
  }
}

// Block-wide sum of 4 values; every thread gets the totals.
__device__ __forceinline__ void block_sum4(float v[4]) {
  __shared__ float buf[kWarps][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) buf[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float t = 0.f;
    for (int w = 0; w < kWarps; ++w) t += buf[w][k];
    v[k] = t;
  }
}

// One block per sample: norm, sum and center of the fp32 map ([N, HW], C times smaller than F).
template <typename T>
__global__ void finalize_kernel(const float* __restrict__ a32, T* __restrict__ amap,
                                T* __restrict__ anorm, T* __restrict__ center,
                                float* __restrict__ stats, int H, int W) {
  const int64_t n = blockIdx.x;
  const int HW = H * W;
  const float* a = a32 + n * HW;
  float v[4] = {0.f, 0.f, 0.f, 0.f};  // sum A^2, sum A, sum A*u, sum A*v
  for (int s = threadIdx.x; s < HW; s += kThreads) {
    const float val = a[s];
    const int h = s / W, w = s - h * W;
    const float u = static_cast<float>(2 * w + 1) / static_cast<float>(W) - 1.f;
    const float vv = static_cast<float>(2 * h + 1) / static_cast<float>(H) - 1.f;
    v[0] += val * val;
    v[1] += val;
    v[2] += val * u;
    v[3] += val * vv;
  }
  block_sum4(v);
  const float norm = sqrtf(v[0]);
  const float denom = norm < kEps ? kEps : norm;  // not fmaxf: it drops NaN
  const float cx = v[1] == 0.f ? 0.f : v[2] / v[1];
  const float cy = v[1] == 0.f ? 0.f : v[3] / v[1];
  for (int s = threadIdx.x; s < HW; s += kThreads) {
    const float val = a[s];
    amap[n * HW + s] = from_acc<T>(val);
    anorm[n * HW + s] = from_acc<T>(val / denom);
  }
  if (threadIdx.x == 0) {
    center[2 * n] = from_acc<T>(cx);
    center[2 * n + 1] = from_acc<T>(cy);
    stats[4 * n] = norm;
    stats[4 * n + 1] = v[1];
    stats[4 * n + 2] = cx;
    stats[4 * n + 3] = cy;
  }
}

// One block per sample: <an, g_anorm> by a block reduction, then dA for every pixel.
__global__ void map_grad_kernel(const float* __restrict__ a32, const float* __restrict__ stats,
                                const float* __restrict__ g_amap,
                                const float* __restrict__ g_anorm,
                                const float* __restrict__ g_center, int H, int W,
                                float* __restrict__ dA) {
  const int64_t n = blockIdx.x;
  const int HW = H * W;
  const float* a = a32 + n * HW;
  const float norm = stats[4 * n], tot = stats[4 * n + 1];
  const float cx = stats[4 * n + 2], cy = stats[4 * n + 3];
  const bool active = norm >= kEps;  // F.normalize's clamp_min passes grads where norm >= eps
  const float denom = active ? norm : kEps;
  float dot = 0.f;
  if (g_anorm != nullptr) {
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = threadIdx.x; s < HW; s += kThreads) v[0] += (a[s] / denom) * g_anorm[n * HW + s];
    block_sum4(v);
    dot = active ? v[0] : 0.f;
  }
  const float gx = g_center != nullptr ? g_center[2 * n] : 0.f;
  const float gy = g_center != nullptr ? g_center[2 * n + 1] : 0.f;
  const bool center_term = g_center != nullptr && tot != 0.f;
  for (int s = threadIdx.x; s < HW; s += kThreads) {
    float d = g_amap != nullptr ? g_amap[n * HW + s] : 0.f;
    if (g_anorm != nullptr) d += (g_anorm[n * HW + s] - (a[s] / denom) * dot) / denom;
    if (center_term) {
      const int h = s / W, w = s - h * W;
      const float u = static_cast<float>(2 * w + 1) / static_cast<float>(W) - 1.f;
      const float vv = static_cast<float>(2 * h + 1) / static_cast<float>(H) - 1.f;
      d += (gx * (u - cx) + gy * (vv - cy)) / tot;
    }
    dA[n * HW + s] = d;
  }
}

template <bool kSquare>
__device__ __forceinline__ float grad_elem(float x, float d, float pm1) {
  if constexpr (kSquare) {
    return d * x;
  } else {
    const float mag = d * expf(pm1 * logf(x == 0.f ? 1.f : fabsf(x)));  // no inf/NaN at 0
    return x == 0.f ? 0.f : (x > 0.f ? mag : -mag);
  }
}

// Elementwise over all N*C*HW elements in memory-friendly order (the contiguous axis fastest),
// V consecutive elements of the contiguous axis per step (up to 128-bit loads and stores of f
// and df; the host picks V > 1 only when every access is V-aligned), so the index divisions
// run once per V elements. Index is uint32_t when the count allows (cheaper divisions), else
// uint64_t.
template <typename T, bool kSquare, bool kChannelsLast, typename Index, int V>
__global__ void __launch_bounds__(kThreads)
    feat_bwd_kernel(const T* __restrict__ f, const float* __restrict__ dA, T* __restrict__ df,
                    Index total, Index C, Index HW, int64_t in_n, int64_t in_mid, int64_t out_n,
                    int64_t out_mid, float scale, float pm1) {
  const Index inner_v = (kChannelsLast ? C : HW) / V;
  const Index outer = kChannelsLast ? HW : C;
  const Index total_v = total / V;
  for (Index idx = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; idx < total_v;
       idx += static_cast<Index>(gridDim.x) * kThreads) {
    const Index i = (idx % inner_v) * V;
    const Index r = idx / inner_v;
    const Index n = r / outer;
    const Index m = r - n * outer;  // c (nchw) or s (nhwc)
    const int64_t in_off = static_cast<int64_t>(n) * in_n + static_cast<int64_t>(m) * in_mid + i;
    const Pack<T, V> x = load_pack<T, V>(f + in_off);
    float d[V];
    if constexpr (kChannelsLast) {
#pragma unroll
      for (int j = 0; j < V; ++j) d[j] = dA[r] * scale;
    } else {
      const float* da = dA + static_cast<int64_t>(n) * HW + i;
      if constexpr (V >= 4) {
#pragma unroll
        for (int j = 0; j < V; j += 4) {
          const Pack<float, 4> q = load_pack<float, 4>(da + j);
#pragma unroll
          for (int k = 0; k < 4; ++k) d[j + k] = q.v[k] * scale;
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) d[j] = da[j] * scale;
      }
    }
    Pack<T, V> y;
#pragma unroll
    for (int j = 0; j < V; ++j) y.v[j] = from_acc<T>(grad_elem<kSquare>(to_acc(x.v[j]), d[j], pm1));
    *reinterpret_cast<Pack<T, V>*>(df + static_cast<int64_t>(n) * out_n +
                                   static_cast<int64_t>(m) * out_mid + i) = y;
  }
}

inline unsigned grid_y(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGridY ? (rows > 0 ? rows : 1) : kMaxGridY);
}

// Widest V (elements per access, at most 16 bytes) such that every access is V-aligned: the
// base pointer, the strides and the contiguous extent are all multiples of V.
template <typename T>
int attn_vec(const T* f, int64_t extent, int64_t stride_a, int64_t stride_b) {
  for (int V = 16 / static_cast<int>(sizeof(T)); V > 1; V /= 2) {
    if (aligned_to(f, static_cast<unsigned>(V * sizeof(T))) && extent % V == 0 &&
        stride_a % V == 0 && stride_b % V == 0)
      return V;
  }
  return 1;
}

template <typename T, int V>
void launch_map_nhwc(const T* f, const AttnGeom& g, float p, float* a32, cudaStream_t stream) {
  const int C = static_cast<int>(g.C), HW = static_cast<int>(g.H * g.W);
  // About four vector loads per thread per pixel; at most a warp per pixel.
  const int tpp = pow2_at_least(ceil_div(C / V, 4), 1, 32);
  const dim3 grid(static_cast<unsigned>(ceil_div(HW, kThreads / tpp)), grid_y(g.N));
  if (p == 2.f)
    map_nhwc_kernel<T, true, V><<<grid, kThreads, 0, stream>>>(f, a32, g.N, C, HW, g.stride_n, g.stride_s, p, tpp);
  else
    map_nhwc_kernel<T, false, V><<<grid, kThreads, 0, stream>>>(f, a32, g.N, C, HW, g.stride_n, g.stride_s, p, tpp);
}

template <typename T, int V>
void launch_map_nchw(const T* f, const AttnGeom& g, float p, float* a32, cudaStream_t stream) {
  const int C = static_cast<int>(g.C), HW = static_cast<int>(g.H * g.W);
  const int64_t hwv = HW / V;
  // Pixel vectors per block: the smallest power of two >= HW / V in 32..kThreads, halved
  // (more channel groups per block) while the grid is short of ~4 blocks per SM.
  int block_s = pow2_at_least(hwv, 32, kThreads);
  const int64_t target = 4LL * sm_count();
  while (block_s > 32 && 2 * (kThreads / block_s) <= C &&
         ceil_div(hwv, block_s) * static_cast<int64_t>(grid_y(g.N)) < target)
    block_s /= 2;
  const dim3 grid(static_cast<unsigned>(ceil_div(hwv, block_s)), grid_y(g.N));
  if (p == 2.f)
    map_nchw_kernel<T, true, V><<<grid, kThreads, 0, stream>>>(f, a32, g.N, C, HW, g.stride_n, g.stride_c, p, block_s);
  else
    map_nchw_kernel<T, false, V><<<grid, kThreads, 0, stream>>>(f, a32, g.N, C, HW, g.stride_n, g.stride_c, p, block_s);
}

// Calls launch<V>() with the runtime vector width V in {1, 2, 4, 8}.
template <typename F>
void with_vec(int V, F&& launch) {
  switch (V) {
    case 8: launch(std::integral_constant<int, 8>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    default: launch(std::integral_constant<int, 1>{}); break;
  }
}

template <typename T>
cudaError_t map_fwd_typed(const T* f, const AttnGeom& g, float p, float* a32, T* amap, T* anorm,
                          T* center, float* stats, cudaStream_t stream) {
  if (g.channels_last) {
    with_vec(attn_vec(f, g.C, g.stride_n, g.stride_s), [&](auto v) {
      constexpr int V = decltype(v)::value;
      if constexpr (V * sizeof(T) <= 16) launch_map_nhwc<T, V>(f, g, p, a32, stream);
    });
  } else {
    with_vec(attn_vec(f, g.H * g.W, g.stride_n, g.stride_c), [&](auto v) {
      constexpr int V = decltype(v)::value;
      if constexpr (V * sizeof(T) <= 16) launch_map_nchw<T, V>(f, g, p, a32, stream);
    });
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  finalize_kernel<T><<<static_cast<unsigned>(g.N), kThreads, 0, stream>>>(
      a32, amap, anorm, center, stats, static_cast<int>(g.H), static_cast<int>(g.W));
  return cudaGetLastError();
}

template <typename T, bool kChannelsLast, typename Index>
cudaError_t feat_bwd_indexed(const T* f, const float* dA, T* df, const AttnGeom& g,
                             int64_t out_n, int64_t out_mid, float p, cudaStream_t stream) {
  const int64_t total = g.N * g.C * g.H * g.W;
  const int64_t in_mid = kChannelsLast ? g.stride_s : g.stride_c;
  const int64_t inner = kChannelsLast ? g.C : g.H * g.W;
  // V-aligned f and df accesses (and 16-byte dA loads for NCHW, V >= 4).
  int V = std::min(attn_vec(f, inner, g.stride_n, in_mid), attn_vec(df, inner, out_n, out_mid));
  if (!kChannelsLast && V >= 4 && !aligned_to(dA, 16)) V = 2;
  const Index C = static_cast<Index>(g.C), HW = static_cast<Index>(g.H * g.W);
  const float pm1 = p - 1.f;
  const float scale = (p == 2.f ? 2.f : p) / static_cast<float>(g.C);
  with_vec(V, [&](auto v) {
    constexpr int VV = decltype(v)::value;
    if constexpr (VV * sizeof(T) <= 16) {
      // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
      const int64_t blocks_needed = (total / VV + kThreads - 1) / kThreads;
      const unsigned blocks = static_cast<unsigned>(blocks_needed < 65536 ? blocks_needed : 65536);
      if (p == 2.f)
        feat_bwd_kernel<T, true, kChannelsLast, Index, VV><<<blocks, kThreads, 0, stream>>>(
            f, dA, df, static_cast<Index>(total), C, HW, g.stride_n, in_mid, out_n, out_mid, scale,
            pm1);
      else
        feat_bwd_kernel<T, false, kChannelsLast, Index, VV><<<blocks, kThreads, 0, stream>>>(
            f, dA, df, static_cast<Index>(total), C, HW, g.stride_n, in_mid, out_n, out_mid, scale,
            pm1);
    }
  });
  return cudaGetLastError();
}

template <typename T, bool kChannelsLast>
cudaError_t feat_bwd_layout(const T* f, const float* dA, T* df, const AttnGeom& g, int64_t out_n,
                            int64_t out_mid, float p, cudaStream_t stream) {
  // The grid-stride loop may step up to one grid past `total`; keep that below 2^32.
  const int64_t total = g.N * g.C * g.H * g.W;
  if (total + 65536LL * kThreads < (1LL << 32))
    return feat_bwd_indexed<T, kChannelsLast, uint32_t>(f, dA, df, g, out_n, out_mid, p, stream);
  return feat_bwd_indexed<T, kChannelsLast, uint64_t>(f, dA, df, g, out_n, out_mid, p, stream);
}

template <typename T>
cudaError_t feat_bwd_typed(const T* f, const float* dA, T* df, const AttnGeom& g, int64_t out_n,
                           int64_t out_c, int64_t out_s, float p, cudaStream_t stream) {
  if (g.channels_last) return feat_bwd_layout<T, true>(f, dA, df, g, out_n, out_s, p, stream);
  return feat_bwd_layout<T, false>(f, dA, df, g, out_n, out_c, p, stream);
}

}  // namespace

cudaError_t attention_map_grad(const float* a32, const float* stats, const float* g_amap,
                               const float* g_anorm, const float* g_center, int64_t N, int64_t H,
                               int64_t W, float* dA, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  map_grad_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
      a32, stats, g_amap, g_anorm, g_center, static_cast<int>(H), static_cast<int>(W), dA);
  return cudaGetLastError();
}

cudaError_t attention_map_fwd(const void* f, AttnDtype dtype, const AttnGeom& g, float p,
                              float* a32, void* amap, void* anorm, void* center, float* stats,
                              cudaStream_t stream) {
  if (g.N == 0) return cudaSuccess;
  switch (dtype) {
    case AttnDtype::kFloat32:
      return map_fwd_typed(static_cast<const float*>(f), g, p, a32, static_cast<float*>(amap),
                           static_cast<float*>(anorm), static_cast<float*>(center), stats,
                           stream);
    case AttnDtype::kFloat16:
      return map_fwd_typed(static_cast<const __half*>(f), g, p, a32, static_cast<__half*>(amap),
                           static_cast<__half*>(anorm), static_cast<__half*>(center), stats,
                           stream);
    case AttnDtype::kBFloat16:
      return map_fwd_typed(static_cast<const __nv_bfloat16*>(f), g, p, a32,
                           static_cast<__nv_bfloat16*>(amap), static_cast<__nv_bfloat16*>(anorm),
                           static_cast<__nv_bfloat16*>(center), stats, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attention_feat_bwd(const void* f, AttnDtype dtype, const float* dA, void* df,
                               const AttnGeom& in, int64_t out_stride_n, int64_t out_stride_c,
                               int64_t out_stride_s, float p, cudaStream_t stream) {
  if (in.N == 0) return cudaSuccess;
  switch (dtype) {
    case AttnDtype::kFloat32:
      return feat_bwd_typed(static_cast<const float*>(f), dA, static_cast<float*>(df), in,
                            out_stride_n, out_stride_c, out_stride_s, p, stream);
    case AttnDtype::kFloat16:
      return feat_bwd_typed(static_cast<const __half*>(f), dA, static_cast<__half*>(df), in,
                            out_stride_n, out_stride_c, out_stride_s, p, stream);
    case AttnDtype::kBFloat16:
      return feat_bwd_typed(static_cast<const __nv_bfloat16*>(f), dA,
                            static_cast<__nv_bfloat16*>(df), in, out_stride_n, out_stride_c,
                            out_stride_s, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace acq::cuda
