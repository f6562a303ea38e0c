// See bn_stats.cuh. Each block reduces one tile with per-thread shifted sums (shift k = the
// channel's first element, the same for all tiles of a channel, so fp32 sums stay small for
// data with a large mean), turns them into (count, mean - k, M2) and merges those with
// Chan's formula; a second kernel merges each channel's partials (a tree over partial rows,
// see bn_combine_kernel) and adds k back.
#include "bn_stats.cuh"
#include "cuda/convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

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

// Per-thread (count, mean, M2) about the shift from shifted sums; M2 = s2 - s1^2 / n has
// little cancellation because the shifted data is centred near zero.
__device__ __forceinline__ Welford welford_of(float cnt, float s1, float s2) {
  return {cnt, cnt > 0.f ? s1 / cnt : 0.f, cnt > 0.f ? fmaxf(s2 - s1 * s1 / cnt, 0.f) : 0.f};
}

__device__ __forceinline__ void store_partial(float* part, int64_t n_slots, int64_t slot,
                                              Welford w) {
  part[slot] = w.n;
  part[n_slots + slot] = w.mean;  // about the channel's shift
  part[2 * n_slots + slot] = w.m2;
}

// Elements i .. i + V - 1 of the T array at ptr, as floats: one 128-bit load when V > 1
// (the caller has checked that the address is 16-byte aligned).
template <typename T, int V>
__device__ __forceinline__ void load_floats(int64_t ptr, int64_t i, float (&v)[V]) {
  const T* p = reinterpret_cast<const T*>(ptr) + i;
  if constexpr (V == 1) {
    v[0] = to_acc(*p);
  } else {
    static_assert(V * sizeof(T) == 16, "a vector is 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));  // ld.global.nc: x is read-only here
    T e[V];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = to_acc(e[j]);
  }
}

// Stores v as elements i .. i + V - 1 of the T array at ptr (one 128-bit store when V > 1).
template <typename T, int V>
__device__ __forceinline__ void store_floats(int64_t ptr, int64_t i, const float (&v)[V]) {
  T* p = reinterpret_cast<T*>(ptr) + i;
  if constexpr (V == 1) {
    *p = from_acc<T>(v[0]);
  } else {
    T e[V];
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = from_acc<T>(v[j]);
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    __stwb(reinterpret_cast<uint4*>(p), raw);  // st.global (the table's pointer is generic)
  }
}

// Calls f(T{}) with the element type of a table dtype code.
template <typename F>
__device__ __forceinline__ void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 1: f(__half{}); break;
    case 2: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

__device__ __forceinline__ bool aligned16(int64_t ptr) { return (ptr & 15) == 0; }

// Kind 1, 128-bit loads (x 16-byte aligned, row stride and C multiples of V, so each thread's
// V channels are all inside the tile or all outside): kLanes = 32 / V threads span the tile's
// 32 channels of a row, V channels each, and the block walks kBnThreads / kLanes rows at a
// time. Per-thread Welfords are merged over the warp's rows by shuffles, then over the warps
// in order by the first warp.
template <typename T>
__device__ __forceinline__ void partial_rows_vec(const Tile& t, Welford* sh, float* part,
                                                 int64_t n_slots) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kLanes = kBnChanBlock / V;
  constexpr int kRowStep = kBnThreads / kLanes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t* L = t.L;
  const int64_t x = L[kBnX], rs = L[kBnRowStride], sC = L[kBnStrideC];
  const int64_t c = t.c0 + (tid % kLanes) * V;  // the first of this thread's V channels
  float s1[V], s2[V], shift[V], cnt = 0.f;
#pragma unroll
  for (int j = 0; j < V; ++j) s1[j] = s2[j] = shift[j] = 0.f;
  if (c < t.c1) {
#pragma unroll
    for (int j = 0; j < V; ++j) shift[j] = load_as_float(x, t.dtype, (c + j) * sC);
    for (int64_t m = t.m0 + tid / kLanes; m < t.m1; m += kRowStep) {
      float v[V];
      load_floats<T, V>(x, m * rs + c, v);  // sC == 1 in kind 1
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float d = v[j] - shift[j];
        s1[j] += d;
        s2[j] += d * d;
      }
      cnt += 1.f;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    Welford w = welford_of(cnt, s1[j], s2[j]);
    for (int o = 16; o >= kLanes; o >>= 1) {  // lanes holding the same channels
      Welford b{__shfl_down_sync(0xffffffffu, w.n, o), __shfl_down_sync(0xffffffffu, w.mean, o),
                __shfl_down_sync(0xffffffffu, w.m2, o)};
      w = chan_merge(w, b);
    }
    if (lane < kLanes) sh[warp * kBnChanBlock + lane * V + j] = w;
  }
  __syncthreads();
  if (tid < kBnChanBlock) {
    Welford w = sh[tid];
    for (int r = 1; r < kBnThreads / 32; ++r) w = chan_merge(w, sh[r * kBnChanBlock + tid]);
    if (t.c0 + tid < t.c1) store_partial(part, n_slots, L[kBnPBase] + t.p * L[kBnC] + t.c0 + tid, w);
  }
}

// Kind 0 walk over one channel's positions [m0, m1) (position m at n * sN + c * sC + s * sS,
// m = n * S + s), split over the block: with V > 1 (sS == 1; S, sN, sC multiples of V; the
// pointers 16-byte aligned: the caller checks) fv(offset) runs on each whole V-vector of
// positions and f1(offset) on the < V positions before and after them, one per thread; with
// V == 1, fv runs on every position. The thread's (n, s) is stepped without division (one
// division before the loop).
template <int V, typename F1, typename FV>
__device__ __forceinline__ void walk_generic(const Tile& t, F1&& f1, FV&& fv) {
  const int tid = threadIdx.x;
  const int64_t* L = t.L;
  const int64_t c = t.c0, S = L[kBnS], sN = L[kBnStrideN], sS = L[kBnStrideS];
  const int64_t cbase = c * L[kBnStrideC];
  const int64_t v0 = (t.m0 + V - 1) / V, v1 = t.m1 / V;  // whole vectors [v0, v1)
  if constexpr (V > 1) {
    const int64_t head_end = v0 * V < t.m1 ? v0 * V : t.m1;
    const int64_t tail_begin = v1 * V > head_end ? v1 * V : head_end;
    if (t.m0 + tid < head_end) f1(generic_offset(L, c, t.m0 + tid));
    if (tail_begin + tid < t.m1) f1(generic_offset(L, c, tail_begin + tid));
  }
  int64_t k = v0 + tid;
  if (k < v1) {
    const int64_t step = static_cast<int64_t>(kBnThreads) * V;  // positions per pass
    const int64_t dn = step / S, ds = step - dn * S;
    int64_t n = (k * V) / S, sp = k * V - n * S;
    for (; k < v1; k += kBnThreads) {
      fv(n * sN + cbase + sp * sS);
      sp += ds;
      n += dn;
      if (sp >= S) {
        sp -= S;
        ++n;
      }
    }
  }
}

// Kind 0 partial (one channel): shifted sums over walk_generic, then a block merge.
template <typename T, int V>
__device__ __forceinline__ void partial_generic(const Tile& t, Welford* sh, float* part,
                                                int64_t n_slots) {
  const int tid = threadIdx.x;
  const int64_t* L = t.L;
  const int64_t x = L[kBnX], c = t.c0;
  const float shift = load_as_float(x, t.dtype, c * L[kBnStrideC]);
  float s1 = 0.f, s2 = 0.f, cnt = 0.f;
  auto add = [&](float v) {
    float d = v - shift;
    s1 += d;
    s2 += d * d;
    cnt += 1.f;
  };
  walk_generic<V>(t, [&](int64_t o) { add(load_as_float(x, t.dtype, o)); },
                  [&](int64_t o) {
                    float v[V];
                    load_floats<T, V>(x, o, v);
#pragma unroll
                    for (int j = 0; j < V; ++j) add(v[j]);
                  });
  Welford w = warp_merge(welford_of(cnt, s1, s2));
  if ((tid & 31) == 0) sh[tid >> 5] = w;
  __syncthreads();
  if (tid == 0) {
    for (int r = 1; r < kBnThreads / 32; ++r) w = chan_merge(w, sh[r]);
    store_partial(part, n_slots, L[kBnPBase] + t.p * L[kBnC] + c, w);
  }
}

// Kind 1, scalar: 32 channels x 8 row groups; a warp reads 32 consecutive channels of one row.
__device__ __forceinline__ void partial_rows_scalar(const Tile& t, Welford* sh, float* part,
                                                    int64_t n_slots) {
  const int64_t* L = t.L;
  const int64_t x = L[kBnX];
  const int tid = threadIdx.x;
  float s1 = 0.f, s2 = 0.f, cnt = 0.f;
  const int64_t c = t.c0 + (tid % kBnChanBlock);
  const bool active = c < t.c1;
  const int64_t rs = L[kBnRowStride];
  const float shift = active ? load_as_float(x, t.dtype, c * L[kBnStrideC]) : 0.f;
  if (active) {
    for (int64_t m = t.m0 + tid / kBnChanBlock; m < t.m1; m += kBnThreads / kBnChanBlock) {
      float d = load_as_float(x, t.dtype, m * rs + c * L[kBnStrideC]) - shift;
      s1 += d;
      s2 += d * d;
      cnt += 1.f;
    }
  }
  Welford w = welford_of(cnt, s1, s2);
  sh[tid] = w;
  __syncthreads();
  if (tid < kBnChanBlock) {
    for (int r = 1; r < kBnThreads / kBnChanBlock; ++r) w = chan_merge(w, sh[tid + r * kBnChanBlock]);
    if (c < t.c1) store_partial(part, n_slots, L[kBnPBase] + t.p * L[kBnC] + c, w);
  }
}

// Whether a tile's 128-bit walk applies (block-uniform): the pointer(s) 16-byte aligned and
// the layout in whole V-vectors (kind 1: row stride and C multiples of V, so each thread's V
// channels are all in the tile or all out; kind 0: see walk_generic).
__device__ __forceinline__ bool tile_vectorizable(const Tile& t, bool aligned) {
  const int64_t* L = t.L;
  const int V = t.dtype == 0 ? 4 : 8;  // elements per 16 bytes
  if (!aligned) return false;
  if (t.kind == 1) return L[kBnRowStride] % V == 0 && L[kBnC] % V == 0;
  return L[kBnStrideS] == 1 && L[kBnS] % V == 0 && L[kBnStrideN] % V == 0 &&
         L[kBnStrideC] % V == 0;
}

// One tile's partial (count, mean - shift, M2): 128-bit loads where the layer's layout and
// alignment allow (checked per tile, block-uniform), else the scalar walks.
__global__ void __launch_bounds__(kBnThreads)
bn_partial_kernel(const int64_t* __restrict__ layers, int n_layers, float* __restrict__ part,
                  int64_t n_slots) {
  __shared__ Welford sh[kBnThreads];
  const Tile t = make_tile(layers, n_layers, blockIdx.x);
  const bool vec = tile_vectorizable(t, aligned16(t.L[kBnX]));
  if (t.kind == 1) {
    if (vec) {
      dispatch_dtype(t.dtype, [&](auto tag) { partial_rows_vec<decltype(tag)>(t, sh, part, n_slots); });
    } else {
      partial_rows_scalar(t, sh, part, n_slots);
    }
  } else if (vec) {
    dispatch_dtype(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      partial_generic<T, 16 / sizeof(T)>(t, sh, part, n_slots);
    });
  } else {
    dispatch_dtype(t.dtype, [&](auto tag) { partial_generic<decltype(tag), 1>(t, sh, part, n_slots); });
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

// dx = a + b * (x - k) of one tile, T elements, V per access (V > 1 only where
// tile_vectorizable holds for x and dx, which share strides).
template <typename T, int V>
__device__ __forceinline__ void backward_tile(const Tile& t, const float* coef, int64_t total_c) {
  const int64_t* L = t.L;
  const int64_t x = L[kBnX], dx = L[kBnDx], cb = L[kBnCBase];
  const int tid = threadIdx.x;
  if (t.kind == 1) {
    // As partial_rows_vec: 32 / V threads across the tile's 32 channels, V channels each.
    constexpr int kLanes = kBnChanBlock / V;
    const int64_t c = t.c0 + (tid % kLanes) * V;
    if (c >= t.c1) return;
    float a[V], b[V], k[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      a[j] = coef[cb + c + j];
      b[j] = coef[total_c + cb + c + j];
      k[j] = coef[2 * total_c + cb + c + j];
    }
    const int64_t rs = L[kBnRowStride], sC = L[kBnStrideC];
    for (int64_t m = t.m0 + tid / kLanes; m < t.m1; m += kBnThreads / kLanes) {
      const int64_t o = m * rs + c * sC;  // V > 1: sC == 1 (kind 1)
      float v[V];
      load_floats<T, V>(x, o, v);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = a[j] + b[j] * (v[j] - k[j]);
      store_floats<T, V>(dx, o, v);
    }
  } else {
    const int64_t c = t.c0;
    const float a = coef[cb + c], b = coef[total_c + cb + c], k = coef[2 * total_c + cb + c];
    walk_generic<V>(t,
                    [&](int64_t o) {
                      store_from_float(dx, t.dtype, o, a + b * (load_as_float(x, t.dtype, o) - k));
                    },
                    [&](int64_t o) {
                      float v[V];
                      load_floats<T, V>(x, o, v);
#pragma unroll
                      for (int j = 0; j < V; ++j) v[j] = a + b * (v[j] - k);
                      store_floats<T, V>(dx, o, v);
                    });
  }
}

__global__ void __launch_bounds__(kBnThreads)
bn_backward_kernel(const int64_t* __restrict__ layers, int n_layers,
                   const float* __restrict__ coef, int64_t total_c) {
  const Tile t = make_tile(layers, n_layers, blockIdx.x);
  const bool vec = tile_vectorizable(t, aligned16(t.L[kBnX]) && aligned16(t.L[kBnDx]));
  dispatch_dtype(t.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vec)
      backward_tile<T, 16 / sizeof(T)>(t, coef, total_c);
    else
      backward_tile<T, 1>(t, coef, total_c);
  });
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
