// See bn_stats.cuh. Each block reduces one tile with per-thread shifted sums (shift k = the
// channel's first element, the same for all tiles of a channel, so fp32 sums stay small for
// data with a large mean), turns them into (count, mean - k, M2) and merges those with
// Chan's formula; a second kernel merges each channel's partials (a tree over partial rows,
// see bn_combine_kernel) and adds k back.
#include "bn_stats.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace acq {
namespace cuda {
namespace {

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford chan_merge(Welford a, Welford b) {
  float n = a.n + b.n;
  if (n == 0.f) return a;
  float w = b.n / n;
  float d = b.mean - a.mean;
  return {n, a.mean + d * w, a.m2 + b.m2 + d * d * a.n * w};
}

__device__ __forceinline__ float load_as_float(int64_t ptr, int dtype, int64_t i) {
  switch (dtype) {
    case 1: return __half2float(reinterpret_cast<const __half*>(ptr)[i]);
    case 2: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(ptr)[i]);
    default: return reinterpret_cast<const float*>(ptr)[i];
  }
}

__device__ __forceinline__ void store_from_float(int64_t ptr, int dtype, int64_t i, float v) {
  switch (dtype) {
    case 1: reinterpret_cast<__half*>(ptr)[i] = __float2half_rn(v); break;
    case 2: reinterpret_cast<__nv_bfloat16*>(ptr)[i] = __float2bfloat16_rn(v); break;
    default: reinterpret_cast<float*>(ptr)[i] = v;
  }
}

// The layer owning global tile `t`: binary search over kBnTileBegin.
__device__ __forceinline__ int find_layer(const int64_t* layers, int n_layers, int64_t t) {
  int lo = 0, hi = n_layers - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (layers[mid * kBnLayerFields + kBnTileBegin] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ Welford warp_merge(Welford w) {
  for (int o = 16; o > 0; o >>= 1) {
    Welford b{__shfl_down_sync(0xffffffffu, w.n, o), __shfl_down_sync(0xffffffffu, w.mean, o),
              __shfl_down_sync(0xffffffffu, w.m2, o)};
    w = chan_merge(w, b);
  }
  return w;
}

// Tile geometry shared by forward and backward.
struct Tile {
  const int64_t* L;
  int kind, dtype;
  int64_t c0, c1;      // channels [c0, c1) (kind 1), or the channel c0 (kind 0)
  int64_t m0, m1;      // positions [m0, m1)
  int64_t p;           // partial index within the channel
};

__device__ __forceinline__ Tile make_tile(const int64_t* layers, int n_layers, int64_t t) {
  int l = find_layer(layers, n_layers, t);
  const int64_t* L = layers + l * kBnLayerFields;
  Tile T;
  T.L = L;
  T.kind = static_cast<int>(L[kBnKind]);
  T.dtype = static_cast<int>(L[kBnDtype]);
  int64_t local = t - L[kBnTileBegin];
  int64_t M = L[kBnM], C = L[kBnC], P = L[kBnP];
  if (T.kind == 1) {
    int64_t n_cb = (C + kBnChanBlock - 1) / kBnChanBlock;
    T.p = local / n_cb;
    T.c0 = (local % n_cb) * kBnChanBlock;
    T.c1 = T.c0 + kBnChanBlock < C ? T.c0 + kBnChanBlock : C;
    T.m0 = T.p * kBnRowsPerTile;
    T.m1 = T.m0 + kBnRowsPerTile < M ? T.m0 + kBnRowsPerTile : M;
  } else {
    T.c0 = local / P;
    T.c1 = T.c0 + 1;
    T.p = local % P;
    int64_t chunk = (M + P - 1) / P;
    T.m0 = T.p * chunk;
    T.m1 = T.m0 + chunk < M ? T.m0 + chunk : M;
  }
  return T;
}

// Offset of position m of channel c (kind 0): n = m / S, s = m % S.
__device__ __forceinline__ int64_t generic_offset(const int64_t* L, int64_t c, int64_t m) {
  int64_t S = L[kBnS];
  int64_t n, s;
  if (m < 2147483647ll && S < 2147483647ll) {
    unsigned int mu = static_cast<unsigned int>(m), su = static_cast<unsigned int>(S);
    n = mu / su;
    s = mu - static_cast<unsigned int>(n) * su;
  } else {
    n = m / S;
    s = m - n * S;
  }
  return n * L[kBnStrideN] + c * L[kBnStrideC] + s * L[kBnStrideS];
}

__global__ void
bn_partial_kernel(const int64_t* __restrict__ layers, int n_layers, float* __restrict__ part,
                  int64_t n_slots) {
  __shared__ Welford sh[kBnThreads];
  Tile T = make_tile(layers, n_layers, blockIdx.x);
  const int64_t* L = T.L;
  const int64_t x = L[kBnX];
  const int64_t C = L[kBnC];
  const int tid = threadIdx.x;
  float s1 = 0.f, s2 = 0.f, cnt = 0.f, shift;
  int64_t c;
  if (T.kind == 1) {
    // 32 channels x 8 row groups; a warp reads 32 consecutive channels of one row.
    c = T.c0 + (tid % kBnChanBlock);
    const bool active = c < T.c1;
    const int64_t rs = L[kBnRowStride];
    shift = active ? load_as_float(x, T.dtype, c * L[kBnStrideC]) : 0.f;
    if (active) {
      for (int64_t m = T.m0 + tid / kBnChanBlock; m < T.m1; m += kBnThreads / kBnChanBlock) {
        float d = load_as_float(x, T.dtype, m * rs + c * L[kBnStrideC]) - shift;
        s1 += d;
        s2 += d * d;
        cnt += 1.f;
      }
    }
  } else {
    c = T.c0;
    shift = load_as_float(x, T.dtype, c * L[kBnStrideC]);
    for (int64_t m = T.m0 + tid; m < T.m1; m += kBnThreads) {
      float d = load_as_float(x, T.dtype, generic_offset(L, c, m)) - shift;
      s1 += d;
      s2 += d * d;
      cnt += 1.f;
    }
  }
  // Per-thread (count, mean, M2) about the shift; M2 = s2 - s1^2 / n has little cancellation
  // because the shifted data is centred near zero.
  Welford w{cnt, cnt > 0.f ? s1 / cnt : 0.f, cnt > 0.f ? fmaxf(s2 - s1 * s1 / cnt, 0.f) : 0.f};
  const int64_t pbase = L[kBnPBase];
  if (T.kind == 1) {
    sh[tid] = w;
    __syncthreads();
    if (tid < kBnChanBlock) {
      for (int r = 1; r < kBnThreads / kBnChanBlock; ++r) w = chan_merge(w, sh[tid + r * kBnChanBlock]);
      if (c < T.c1) {
        int64_t slot = pbase + T.p * C + c;
        part[slot] = w.n;
        part[n_slots + slot] = w.mean;  // about the channel's shift
        part[2 * n_slots + slot] = w.m2;
      }
    }
  } else {
    w = warp_merge(w);
    if ((tid & 31) == 0) sh[tid >> 5] = w;
    __syncthreads();
    if (tid == 0) {
      for (int r = 1; r < kBnThreads / 32; ++r) w = chan_merge(w, sh[r]);
      int64_t slot = pbase + T.p * C + c;
      part[slot] = w.n;
      part[n_slots + slot] = w.mean;  // about the channel's shift
      part[2 * n_slots + slot] = w.m2;
    }
  }
}

// Combine: a block per 32 consecutive global channels x kBnCombineRows partial rows. Lane =
// channel (a layer's partials for consecutive channels are adjacent, so the loads coalesce),
// row r merges partials r, r + rows, ... in order, then a shared-memory tree merges the rows.
// Chan's merge is accurate in any order (the partial means are about one shift per channel);
// this order differs from a serial left-to-right merge only by rounding.
constexpr int kBnCombineRows = 32;

__global__ void __launch_bounds__(kBnChanBlock * kBnCombineRows)
bn_combine_kernel(const int64_t* __restrict__ layers, int n_layers,
                  const float* __restrict__ part, int64_t n_slots, float* __restrict__ out,
                  int64_t total_c) {
  __shared__ Welford sh[kBnCombineRows][kBnChanBlock];
  const int lane = threadIdx.x % kBnChanBlock, row = threadIdx.x / kBnChanBlock;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kBnChanBlock + lane;
  const int64_t* L = nullptr;
  int64_t c = 0;
  Welford w{0.f, 0.f, 0.f};
  if (g < total_c) {
    int lo = 0, hi = n_layers - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (layers[mid * kBnLayerFields + kBnCBase] <= g) lo = mid; else hi = mid - 1;
    }
    L = layers + lo * kBnLayerFields;
    const int64_t C = L[kBnC], P = L[kBnP];
    c = g - L[kBnCBase];
    int64_t slot = L[kBnPBase] + row * C + c;
    for (int64_t p = row; p < P; p += kBnCombineRows, slot += kBnCombineRows * C)
      w = chan_merge(w, Welford{part[slot], part[n_slots + slot], part[2 * n_slots + slot]});
  }
  sh[row][lane] = w;
  for (int h = kBnCombineRows / 2; h > 0; h >>= 1) {
    __syncthreads();
    if (row < h) sh[row][lane] = chan_merge(sh[row][lane], sh[row + h][lane]);
  }
  __syncthreads();
  if (row == 0 && L != nullptr) {
    w = sh[0][lane];
    // Partial means are about the shift k = the channel's first element (small numbers, so
    // Chan's deltas lose nothing); add k back once.
    const float k = load_as_float(L[kBnX], static_cast<int>(L[kBnDtype]), c * L[kBnStrideC]);
    out[g] = w.mean + k;
    out[total_c + g] = w.n > 0.f ? w.m2 / w.n : 0.f;
  }
}

__global__ void
bn_backward_kernel(const int64_t* __restrict__ layers, int n_layers,
                   const float* __restrict__ coef, int64_t total_c) {
  Tile T = make_tile(layers, n_layers, blockIdx.x);
  const int64_t* L = T.L;
  const int64_t x = L[kBnX], dx = L[kBnDx], cb = L[kBnCBase];
  const int tid = threadIdx.x;
  if (T.kind == 1) {
    const int64_t c = T.c0 + (tid % kBnChanBlock);
    if (c >= T.c1) return;
    const float a = coef[cb + c], b = coef[total_c + cb + c], k = coef[2 * total_c + cb + c];
    const int64_t rs = L[kBnRowStride];
    for (int64_t m = T.m0 + tid / kBnChanBlock; m < T.m1; m += kBnThreads / kBnChanBlock) {
      int64_t o = m * rs + c * L[kBnStrideC];
      store_from_float(dx, T.dtype, o, a + b * (load_as_float(x, T.dtype, o) - k));
    }
  } else {
    const int64_t c = T.c0;
    const float a = coef[cb + c], b = coef[total_c + cb + c], k = coef[2 * total_c + cb + c];
    for (int64_t m = T.m0 + tid; m < T.m1; m += kBnThreads) {
      int64_t o = generic_offset(L, c, m);
      store_from_float(dx, T.dtype, o, a + b * (load_as_float(x, T.dtype, o) - k));
    }
  }
}

}  // namespace

void bn_stats_forward(const int64_t* layers_dev, int n_layers, int64_t n_tiles, float* partials,
                      int64_t n_slots, float* out, int64_t total_c, cudaStream_t stream) {
  if (n_tiles > 0)
    bn_partial_kernel<<<static_cast<unsigned int>(n_tiles), kBnThreads, 0, stream>>>(
        layers_dev, n_layers, partials, n_slots);
  const unsigned int blocks = static_cast<unsigned int>((total_c + kBnChanBlock - 1) / kBnChanBlock);
  if (blocks > 0)
    bn_combine_kernel<<<blocks, kBnChanBlock * kBnCombineRows, 0, stream>>>(
        layers_dev, n_layers, partials, n_slots, out, total_c);
}

void bn_stats_backward(const int64_t* layers_dev, int n_layers, int64_t n_tiles,
                       const float* coef, int64_t total_c, cudaStream_t stream) {
  if (n_tiles > 0)
    bn_backward_kernel<<<static_cast<unsigned int>(n_tiles), kBnThreads, 0, stream>>>(
        layers_dev, n_layers, coef, total_c);
}

}  // namespace cuda
}  // namespace acq
