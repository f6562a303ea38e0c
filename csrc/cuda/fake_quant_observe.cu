// fq_observe_forward on CUDA: a torch.ao min/max observer step (per tensor or per channel,
// moving average or running min/max), the qparams and the fake quant in ONE kernel launch,
// with the observer state and qparams updated in place on the device (no host read).
//
// Phases of observe_fq_kernel, separated by grid-wide barriers:
//   1. min/max partials [K, C] (per tensor: one per block, K = gridDim.x) into the workspace;
//   2. one warp per channel reduces its K partials in a fixed order, applies the observer
//      update to min_val/max_val (read and written by that same thread), computes the qparams
//      as torch does on CUDA and stores scale/zero_point;
//   3. (quantize) the fake quant of x with the stored qparams, and the packed mask.
// Small inputs (up to kSingleBlockMax elements) run on one block, where the barriers are
// __syncthreads. Larger ones run on a persistent grid no larger than what is co-resident
// (occupancy x SMs), launched cooperatively (cudaLaunchAttributeCooperative): the launch fails
// rather than deadlocks if the grid could not be co-resident (it is then relaunched on one
// block), the driver owns (and resets) the grid barrier's state, and a cooperative kernel is a
// valid CUDA-graph kernel node (CUDA's headers: cudaLaunchAttributeCooperative is "valid for
// graph nodes, launches"; even device-launched graphs permit cooperative kernel nodes without
// MPS), so stream capture records it as is. The occupancy and attribute queries are not
// stream work (capture-safe). An atomic-counter barrier on a normal launch was not used: it
// needs a zeroed, persistent counter per device and stream, and nothing but the occupancy
// estimate would stand between it and a deadlock.
// Every block of a phase writes all of its partials / outputs, so the workspace needs no
// clearing; min/max are order-independent, so the result does not depend on the grid size
// (up to the sign of a zero that is the min or max of both -0 and +0).
#include "cuda/fake_quant.cuh"
#include "cuda/fake_quant_device.cuh"
#include "cuda/launch.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace acq::cuda {
namespace {

using namespace dev;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// At most this many elements: one block does everything (no grid barrier). One 256-thread
// block keeps only ~16 KiB of loads in flight, about 30 GB/s from DRAM, so beyond a few tens
// of thousands of elements the multi-block grid and its two grid barriers (microseconds)
// should win; the crossover is an estimate, not measured on a GPU.
constexpr int64_t kSingleBlockMax = int64_t{1} << 15;
// Elements per block of the multi-block grid before adding blocks stops paying off.
constexpr int64_t kElemsPerBlock = int64_t{kThreads} * 16;

struct ObserveArgs {
  const void* x = nullptr;
  void* out = nullptr;
  uint8_t* mask = nullptr;
  int64_t n = 0, inner = 1, channels = 1;
  // Observer state and qparams [channels]; written by this kernel, so never read through the
  // non-coherent (read-only) cache: no __restrict__ / __ldg on them.
  float* min_val = nullptr;
  float* max_val = nullptr;
  float* scale = nullptr;
  int32_t* zero_point = nullptr;
  float averaging_constant = 0.0f;
  bool moving_average = false;
  int quant_min = 0, quant_max = 0;
  bool symmetric = false;
  int symmetric_zero_point = 0;
  float eps = 0.0f;
  bool quantize = false;
  float* ws = nullptr;  // partial mins [K, C], then partial maxs [K, C]
  int64_t K = 1;        // partial rows
  int tpr = 1;          // channels innermost: threads per row of the [rpb, tpr] thread tile
  int64_t gx = 1;       // channels innermost: column tiles
};

// Grid-wide barrier between phases (a cooperative launch whenever gridDim.x > 1).
__device__ __forceinline__ void grid_barrier() {
  if (gridDim.x == 1) {
    __syncthreads();
  } else {
    cooperative_groups::this_grid().sync();
  }
}

// (o / d, o % d) for o < 2^31 without a 64-bit division (d may be any positive int64).
__device__ __forceinline__ void divmod_small(int64_t o, int64_t d, int64_t& q, int64_t& r) {
  if (d > o) {
    q = 0;
    r = o;
  } else {
    const uint32_t q32 = static_cast<uint32_t>(o) / static_cast<uint32_t>(d);
    q = q32;
    r = o - static_cast<int64_t>(q32) * d;
  }
}

// The channel of a memory offset that advances by a fixed step: c = (o / inner) % C kept as
// (pos = o % inner, c) and stepped by compares, so loops never divide.
struct ChanCursor {
  int64_t pos = 0, c = 0, step_pos = 0, step_c = 0;

  __device__ __forceinline__ void init(int64_t o, int64_t step, int64_t inner, int64_t C) {
    int64_t q;
    q = o / inner;  // once, before the loop
    pos = o - q * inner;
    c = q % C;
    q = step / inner;
    step_pos = step - q * inner;
    step_c = q % C;
  }
  __device__ __forceinline__ void advance(int64_t inner, int64_t C) {
    pos += step_pos;
    const bool carry = pos >= inner;
    if (carry) pos -= inner;
    c += step_c + carry;  // < 2C: one wrap at most
    if (c >= C) c -= C;
  }
};

// Block-wide NaN-sticky min and max in a fixed order; every thread gets the result.
__device__ __forceinline__ void block_minmax(float& mn, float& mx) {
  __shared__ float s_min[kWarps], s_max[kWarps];
  for (int off = 16; off > 0; off >>= 1) {
    mn = nan_min(mn, __shfl_xor_sync(0xffffffffu, mn, off));
    mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // s_min/s_max may still be read from a previous call
  if (lane == 0) {
    s_min[warp] = mn;
    s_max[warp] = mx;
  }
  __syncthreads();
  mn = kInf;
  mx = -kInf;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    mn = nan_min(mn, s_min[w]);
    mx = nan_max(mx, s_max[w]);
  }
}

// Phase 1, per tensor: one partial per block, four independent 128-bit loads in flight.
template <typename T, int V>
__device__ __forceinline__ void tensor_minmax(const T* __restrict__ x, const ObserveArgs& a) {
  float mn = kInf, mx = -kInf;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t nvec = a.n / V;
  int64_t i = tid;
  for (; i + 3 * nthreads < nvec; i += 4 * nthreads) {
    const Vec<T, V> v0 = load_vec<T, V>(x + i * V);
    const Vec<T, V> v1 = load_vec<T, V>(x + (i + nthreads) * V);
    const Vec<T, V> v2 = load_vec<T, V>(x + (i + 2 * nthreads) * V);
    const Vec<T, V> v3 = load_vec<T, V>(x + (i + 3 * nthreads) * V);
    fold_minmax(v0, mn, mx);
    fold_minmax(v1, mn, mx);
    fold_minmax(v2, mn, mx);
    fold_minmax(v3, mn, mx);
  }
  for (; i < nvec; i += nthreads) fold_minmax(load_vec<T, V>(x + i * V), mn, mx);
  for (int64_t k = nvec * V + tid; k < a.n; k += nthreads) fold_minmax(load_vec<T, 1>(x + k), mn, mx);
  block_minmax(mn, mx);
  if (threadIdx.x == 0) {
    a.ws[blockIdx.x] = mn;
    a.ws[gridDim.x + blockIdx.x] = mx;
  }
}

// Phase 1, channels innermost (inner == 1; x is [rows, C], V | C): a [rpb, tpr] thread tile,
// each thread owning V consecutive channels (one 128-bit load per row), tile rows over the
// rows; a shared-memory tree over the tile's rows (fixed order). Tasks (column tile, row
// group k) of gx * K are spread over the blocks.
template <typename T, int V>
__device__ __forceinline__ void columns_minmax(const T* __restrict__ x, const ObserveArgs& a) {
  __shared__ float s_mn[kThreads * V], s_mx[kThreads * V];
  const int64_t C = a.channels, rows = a.n / C, CV = C / V;
  const int tpr = a.tpr, rpb = kThreads / tpr;
  const int col = threadIdx.x % tpr, r = threadIdx.x / tpr;
  const int64_t step = a.K * rpb;
  float* part_min = a.ws;
  float* part_max = a.ws + a.K * C;
  for (int64_t t = blockIdx.x; t < a.gx * a.K; t += gridDim.x) {  // block-uniform
    // Tasks number < 2^31 (gx * K <= max(grid, gx), C < 2^31 host-checked): 32-bit division.
    const int64_t tile = static_cast<uint32_t>(t) % static_cast<uint32_t>(a.gx);
    const int64_t k = static_cast<uint32_t>(t) / static_cast<uint32_t>(a.gx);
    const int64_t cv = tile * tpr + col;
    float mn[V], mx[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      mn[j] = kInf;
      mx[j] = -kInf;
    }
    if (cv < CV) {
      int64_t q = k * rpb + r;
      const T* p = x + q * C + cv * V;
      const int64_t jump = step * C;
      for (; q + step < rows; q += 2 * step, p += 2 * jump) {
        const Vec<T, V> v0 = load_vec<T, V>(p);
        const Vec<T, V> v1 = load_vec<T, V>(p + jump);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float f0 = static_cast<float>(to_acc(v0.v[j]));
          const float f1 = static_cast<float>(to_acc(v1.v[j]));
          mn[j] = nan_min(nan_min(mn[j], f0), f1);
          mx[j] = nan_max(nan_max(mx[j], f0), f1);
        }
      }
      if (q < rows) {
        const Vec<T, V> v0 = load_vec<T, V>(p);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float f0 = static_cast<float>(to_acc(v0.v[j]));
          mn[j] = nan_min(mn[j], f0);
          mx[j] = nan_max(mx[j], f0);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      s_mn[threadIdx.x * V + j] = mn[j];
      s_mx[threadIdx.x * V + j] = mx[j];
    }
    for (int h = rpb / 2; h > 0; h >>= 1) {  // tree over the tile rows (rpb a power of two)
      __syncthreads();
      if (r < h) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int o = threadIdx.x * V + j, o2 = (threadIdx.x + h * tpr) * V + j;
          s_mn[o] = nan_min(s_mn[o], s_mn[o2]);
          s_mx[o] = nan_max(s_mx[o], s_mx[o2]);
        }
      }
    }
    __syncthreads();
    // Row 0 of the tile holds the tile's tpr * V channels in order.
    const int64_t c0 = tile * tpr * V;
    for (int i = threadIdx.x; i < tpr * V; i += kThreads) {
      if (c0 + i < C) {
        part_min[k * C + c0 + i] = s_mn[i];
        part_max[k * C + c0 + i] = s_mx[i];
      }
    }
    __syncthreads();  // the shared tile is refilled by the next task
  }
}

// Phase 1, inner > 1 (channel c is `rows` runs of inner = inner_v * V contiguous elements at
// (q * C + c) * inner): task (c, k) of C * K; the K * kThreads threads of a channel stride
// over its rows * inner_v vectors in run order (coalesced along a run), a (row, vector)
// cursor stepped without division; then a block reduction.
template <typename T, int V>
__device__ __forceinline__ void runs_minmax(const T* __restrict__ x, const ObserveArgs& a) {
  const int64_t C = a.channels, inner = a.inner, inner_v = inner / V;
  const int64_t rows = a.n / (C * inner);
  int64_t dq, di;
  divmod_small(a.K * kThreads, inner_v, dq, di);  // K * kThreads < 2^31 (host-checked)
  float* part_min = a.ws;
  float* part_max = a.ws + a.K * C;
  for (int64_t t = blockIdx.x; t < C * a.K; t += gridDim.x) {  // block-uniform
    const int64_t c = static_cast<uint32_t>(t) % static_cast<uint32_t>(C);  // as in columns
    const int64_t k = static_cast<uint32_t>(t) / static_cast<uint32_t>(C);
    int64_t q, i;
    divmod_small(k * kThreads + threadIdx.x, inner_v, q, i);
    const T* base = x + c * inner;
    float mn = kInf, mx = -kInf;
    for (; q < rows;) {
      fold_minmax(load_vec<T, V>(base + q * C * inner + i * V), mn, mx);
      i += di;
      q += dq;
      if (i >= inner_v) {
        i -= inner_v;
        ++q;
      }
    }
    block_minmax(mn, mx);
    if (threadIdx.x == 0) {
      part_min[k * C + c] = mn;
      part_max[k * C + c] = mx;
    }
  }
}

// Phase 2: one warp per channel: its K partials (fixed order), the observer update, qparams.
__device__ __forceinline__ void finish_channels(const ObserveArgs& a, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t nw = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t C = a.channels;
  const float* part_min = a.ws;
  const float* part_max = a.ws + K * C;
  for (int64_t c = gw; c < C; c += nw) {  // warp-uniform
    float mn = kInf, mx = -kInf;
    for (int64_t k = lane; k < K; k += 32) {
      mn = nan_min(mn, part_min[k * C + c]);
      mx = nan_max(mx, part_max[k * C + c]);
    }
    for (int off = 16; off > 0; off >>= 1) {
      mn = nan_min(mn, __shfl_xor_sync(0xffffffffu, mn, off));
      mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    }
    if (lane == 0) {
      const float old_min = a.min_val[c], old_max = a.max_val[c];
      float new_min, new_max;
      if (a.moving_average) {
        if (old_min == kInf && old_max == -kInf) {  // nothing seen yet: the batch range
          new_min = mn;
          new_max = mx;
        } else {  // min_val + c * (cur - min_val), each torch op rounded on its own
          const float ac = a.averaging_constant;
          new_min = __fadd_rn(old_min, __fmul_rn(ac, __fsub_rn(mn, old_min)));
          new_max = __fadd_rn(old_max, __fmul_rn(ac, __fsub_rn(mx, old_max)));
        }
      } else {  // torch.min(cur, min_val) / torch.max(cur, max_val): NaN propagates
        new_min = nan_min(mn, old_min);
        new_max = nan_max(mx, old_max);
      }
      a.min_val[c] = new_min;
      a.max_val[c] = new_max;
      calc_qparams(new_min, new_max, a.quant_min, a.quant_max, a.symmetric,
                   a.symmetric_zero_point, a.eps, a.scale + c, a.zero_point + c);
    }
  }
}

// Phase 3: the fake quant, grid-stride over warp tiles of 32 x V elements (V > 1: 128-bit
// accesses; per channel V > 1 only when a vector holds one channel (inner % V == 0) or V
// consecutive channels (inner == 1, C % V == 0)), then the scalar remainder, 32 consecutive
// elements per warp and one ballot word each. Channels follow a cursor: no division in a loop.
template <typename T, int V, bool PerChannel>
__device__ __forceinline__ void fake_quant_phase(const T* __restrict__ x, const ObserveArgs& a) {
  using A = acc_t<T>;
  T* __restrict__ out = static_cast<T*>(a.out);
  uint8_t* __restrict__ mask = a.mask;
  const A qmin = static_cast<A>(a.quant_min), qmax = static_cast<A>(a.quant_max);
  const int64_t n = a.n, inner = a.inner, C = a.channels;
  const int64_t mask_bytes = (n + 7) / 8;
  const bool columns = inner == 1;
  A t_sc = 0, t_inv = 0, t_zp = 0;
  if constexpr (!PerChannel) {
    t_sc = a.scale[0];
    t_inv = static_cast<A>(__frcp_rn(a.scale[0]));  // == 1.0f / scale, as torch's kernel
    t_zp = static_cast<A>(a.zero_point[0]);
  }
  auto params = [&](int64_t c, A& sc, A& inv, A& zp) {
    if constexpr (PerChannel) {
      const float s = a.scale[c];
      sc = s;
      inv = static_cast<A>(__frcp_rn(s));
      zp = static_cast<A>(a.zero_point[c]);
    } else {
      sc = t_sc;
      inv = t_inv;
      zp = t_zp;
    }
  };
  const int lane = threadIdx.x & 31;
  const int64_t gwarp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * kThreads) >> 5;

  const int64_t ntiles = V > 1 ? n / (32 * V) : 0;
  if (V > 1 && gwarp < ntiles) {
    ChanCursor cur;
    if constexpr (PerChannel) cur.init((gwarp * 32 + lane) * V, nwarps * 32 * V, inner, C);
    for (int64_t t = gwarp; t < ntiles; t += nwarps) {  // warp-uniform bounds
      const int64_t base = t * (32 * V) + static_cast<int64_t>(lane) * V;
      const Vec<T, V> in = load_vec<T, V>(x + base);
      Vec<T, V> res;
      uint32_t bits = 0;
      A sc, inv, zp;
      params(cur.c, sc, inv, zp);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (PerChannel && columns && j > 0) params(cur.c + j, sc, inv, zp);
        bool ok;
        res.v[j] = from_acc<T>(fq_elem<A, !PerChannel>(to_acc(in.v[j]), sc, inv, zp, qmin, qmax, ok));
        bits |= static_cast<uint32_t>(ok) << j;
      }
      store_vec<T, V>(out + base, res);
      if (mask != nullptr) {
        const uint32_t w = tile_mask_word<V>(bits, lane);
        if (lane % (32 / V) == 0) store_mask_word(mask, mask_bytes, t * V + lane / (32 / V), w);
      }
      if constexpr (PerChannel) cur.advance(inner, C);
    }
  }

  const int64_t start = ntiles * (32 * V);
  const int64_t ntail = (n - start + 31) / 32;
  if (gwarp < ntail) {
    ChanCursor cur;
    if constexpr (PerChannel) cur.init(start + gwarp * 32 + lane, nwarps * 32, inner, C);
    for (int64_t t = gwarp; t < ntail; t += nwarps) {
      const int64_t i = start + t * 32 + lane;
      bool ok = false;
      if (i < n) {
        A sc, inv, zp;
        params(cur.c, sc, inv, zp);
        out[i] = from_acc<T>(fq_elem<A, !PerChannel>(to_acc(x[i]), sc, inv, zp, qmin, qmax, ok));
      }
      const uint32_t w = __ballot_sync(0xffffffffu, ok);
      if (mask != nullptr && lane == 0) store_mask_word(mask, mask_bytes, start / 32 + t, w);
      if constexpr (PerChannel) cur.advance(inner, C);
    }
  }
}

template <typename T, int V, bool PerChannel>
__global__ void __launch_bounds__(kThreads) observe_fq_kernel(ObserveArgs a) {
  const T* __restrict__ x = static_cast<const T*>(a.x);
  if constexpr (PerChannel) {
    if (a.inner == 1) {
      columns_minmax<T, V>(x, a);
    } else {
      runs_minmax<T, V>(x, a);
    }
  } else {
    tensor_minmax<T, V>(x, a);
  }
  grid_barrier();
  finish_channels(a, PerChannel ? a.K : static_cast<int64_t>(gridDim.x));
  if (!a.quantize) return;  // grid-uniform
  grid_barrier();
  fake_quant_phase<T, V, PerChannel>(x, a);
}

using KernelFn = void (*)(ObserveArgs);

// Blocks of `k` that fit on one SM (cached per kernel and device).
template <typename T, int V, bool PerChannel>
int blocks_per_sm() {
  static int cached[64] = {0};
  int d = 0;
  cudaGetDevice(&d);
  if (d < 0 || d >= 64) d = 0;
  if (cached[d] == 0) {
    int b = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, observe_fq_kernel<T, V, PerChannel>,
                                                      kThreads, 0) != cudaSuccess) {
      cudaGetLastError();  // a failed query leaves the single-block grid
      b = -1;
    }
    cached[d] = b == 0 ? -1 : b;
  }
  return cached[d];
}

bool cooperative_supported() {
  static int cached[64] = {0};  // 0 unknown, 1 yes, -1 no
  int d = 0;
  cudaGetDevice(&d);
  if (d < 0 || d >= 64) return false;
  if (cached[d] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrCooperativeLaunch, d) != cudaSuccess) {
      cudaGetLastError();
      v = 0;
    }
    cached[d] = v ? 1 : -1;
  }
  return cached[d] == 1;
}

bool aligned16(const void* p) { return aligned_to(p, 16); }

struct Plan {
  KernelFn kernel = nullptr;
  int grid = 1;
  int64_t K = 1;
  int tpr = 1;
  int64_t gx = 1;
};

template <typename T, int V, bool PerChannel>
Plan make_plan(const FqLayout& l, bool single) {
  Plan p;
  p.kernel = observe_fq_kernel<T, V, PerChannel>;
  if (!single && l.n > kSingleBlockMax && cooperative_supported()) {
    const int per_sm = blocks_per_sm<T, V, PerChannel>();
    if (per_sm > 0) {
      const int64_t fit = static_cast<int64_t>(per_sm) * sm_count();
      const int64_t want = ceil_div(l.n, kElemsPerBlock);
      p.grid = static_cast<int>(want < fit ? want : fit);
    }
  }
  if (!PerChannel) {
    p.K = p.grid;
    return p;
  }
  const int64_t C = l.channels;
  if (l.inner == 1) {
    const int64_t rows = l.n / C, CV = C / V;
    p.tpr = pow2_at_least(CV, 1, kThreads);
    const int64_t rpb = kThreads / p.tpr;
    p.gx = ceil_div(CV, p.tpr);
    int64_t K = p.grid / p.gx;
    const int64_t kmax = ceil_div(rows, rpb);
    p.K = K < 1 ? 1 : (K > kmax ? kmax : K);
  } else {
    const int64_t units = (l.n / V) / C;  // vectors per channel
    int64_t K = p.grid / C;
    const int64_t kmax = ceil_div(units, kThreads);
    p.K = K < 1 ? 1 : (K > kmax ? kmax : K);
  }
  return p;
}

// Vector width: 128-bit when x and out are 16-byte aligned and (per channel) a vector never
// straddles channels unevenly; float64 stays scalar.
template <typename T>
Plan plan_for(const FqLayout& l, const void* x, const void* out, bool single) {
  constexpr int VV = 16 / sizeof(T);
  if constexpr (sizeof(T) == 8) {
    return l.per_channel ? make_plan<T, 1, true>(l, single) : make_plan<T, 1, false>(l, single);
  } else {
    bool vec = aligned16(x) && (out == nullptr || aligned16(out));
    if (l.per_channel) {
      vec = vec && (l.inner == 1 ? l.channels % VV == 0 : l.inner % VV == 0);
      return vec ? make_plan<T, VV, true>(l, single) : make_plan<T, 1, true>(l, single);
    }
    return vec ? make_plan<T, VV, false>(l, single) : make_plan<T, 1, false>(l, single);
  }
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

// single: one block (its K never exceeds the multi-block plan's, so the workspace fits).
Plan plan_any(DType dt, const FqLayout& l, const void* x, const void* out, bool single = false) {
  Plan p;
  dispatch(dt, [&](auto tag) { p = plan_for<decltype(tag)>(l, x, out, single); });
  return p;
}

cudaError_t launch(const Plan& p, const ObserveArgs& args, cudaStream_t stream) {
  ObserveArgs a = args;
  a.K = p.K;
  a.tpr = p.tpr;
  a.gx = p.gx;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.grid));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.grid > 1 ? 1 : 0;  // the barrier needs co-residency only across blocks
  return cudaLaunchKernelEx(&cfg, p.kernel, a);
}

}  // namespace

size_t observe_workspace_floats(DType dt, const FqLayout& l, const void* x, const void* out) {
  if (l.n <= 0) return 0;
  const Plan p = plan_any(dt, l, x, out);
  return static_cast<size_t>(2 * p.K * l.channels);
}

cudaError_t fq_observe_forward(DType dt, const void* x, void* out, uint8_t* mask,
                               const FqLayout& l, float* min_val, float* max_val, float* scale,
                               int32_t* zero_point, bool moving_average,
                               float averaging_constant, int quant_min, int quant_max,
                               bool symmetric, int symmetric_zero_point, float eps,
                               float* workspace, cudaStream_t stream) {
  if (l.n <= 0) return cudaSuccess;  // nothing observed: the state stays as it is
  const Plan p = plan_any(dt, l, x, out);
  ObserveArgs a;
  a.x = x;
  a.out = out;
  a.mask = mask;
  a.n = l.n;
  a.inner = l.per_channel ? l.inner : l.n;
  a.channels = l.per_channel ? l.channels : 1;
  a.min_val = min_val;
  a.max_val = max_val;
  a.scale = scale;
  a.zero_point = zero_point;
  a.averaging_constant = averaging_constant;
  a.moving_average = moving_average;
  a.quant_min = quant_min;
  a.quant_max = quant_max;
  a.symmetric = symmetric;
  a.symmetric_zero_point = symmetric_zero_point;
  a.eps = eps;
  a.quantize = out != nullptr;
  a.ws = workspace;
  cudaError_t err = launch(p, a, stream);
  if (err == cudaErrorCooperativeLaunchTooLarge && p.grid > 1) {
    // Fewer SMs usable than the device has (MPS limits, a partitioned device): the launch was
    // refused before running anything (not a sticky error); one block is always co-resident.
    cudaGetLastError();
    err = launch(plan_any(dt, l, x, out, /*single=*/true), a, stream);
  }
  return err;
}

}  // namespace acq::cuda
