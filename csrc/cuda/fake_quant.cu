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
#include "cuda/fake_quant_device.cuh"
#include "cuda/launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace acq::cuda {
namespace {

constexpr int kThreads = 256;
// Pass-1 blocks of the per-tensor min/max (= partials that one finishing block reduces):
// sized to the device, four 128-bit loads in flight per thread.
constexpr int kPartialBlocksPerSm = 4;
// Pass-1 blocks of a per-channel min/max (its partials [gy, C] go to one finishing pass).
constexpr int kChannelBlocksPerSm = 2;
// LSQ backward pass-1 blocks: a constant, so the order of its sums is the same on every GPU.
constexpr int kLsqTargetBlocks = 1024;
// The shared device math (round-to-nearest ops, NaN-sticky min/max, 128-bit vectors, mask words).
using dev::add_rn;
using dev::fold_minmax;
using dev::kInf;
using dev::load_vec;
using dev::mul_rn;
using dev::nan_max;
using dev::nan_min;
using dev::rne;
using dev::store_mask_word;
using dev::store_vec;
using dev::tile_mask_word;
using dev::Vec;

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

// The channel of a memory offset that a thread advances by a fixed step: (o / inner) % C kept
// as (pos = o % inner, c) and stepped with compares, so that a grid-stride loop divides once,
// before it starts, never per element or vector.
struct ChanCursor {
  int64_t pos, c, step_pos, step_c;
};

__device__ __forceinline__ ChanCursor chan_cursor(int64_t o, int64_t step, int64_t inner,
                                                  int64_t C, bool small) {
  ChanCursor k;
  int64_t q, unused;
  divmod(o, inner, small, q, k.pos);
  divmod(q, C, small, unused, k.c);
  divmod(step, inner, small, q, k.step_pos);
  divmod(q, C, small, unused, k.step_c);
  return k;
}

__device__ __forceinline__ void chan_advance(ChanCursor& k, int64_t inner, int64_t C) {
  k.pos += k.step_pos;
  const bool carry = k.pos >= inner;
  if (carry) k.pos -= inner;
  k.c += k.step_c + carry;  // < 2C: one wrap at most
  if (k.c >= C) k.c -= C;
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

// torch.ao UniformQuantizationObserverBase._calculate_qparams as torch runs it on CUDA
// (dev::calc_qparams), with the symmetric zero point of torch.ao's dtypes (0 signed, the
// midpoint unsigned). 1.0f / x there (no fast math) is the same IEEE reciprocal as __frcp_rn.
__device__ __forceinline__ void calc_qparams(float mn, float mx, int qmin, int qmax,
                                             bool symmetric, float eps, float* scale,
                                             int32_t* zero_point) {
  dev::calc_qparams(mn, mx, qmin, qmax, symmetric, qmin < 0 ? 0 : (qmin + qmax) / 2, eps, scale,
                    zero_point);
}

// Where an observer's qparams go, and calc_qparams's settings: one struct that every observer
// kernel (per-tensor finish, per-channel finish, segments) takes, built once by the launcher.
struct QparamsOut {
  int quant_min = 0, quant_max = 0;
  bool symmetric = false;
  float eps = 0.0f;
  float* scale = nullptr;         // [channels]
  int32_t* zero_point = nullptr;  // [channels]
};

__device__ __forceinline__ void store_qparams(const QparamsOut& q, int64_t c, float mn,
                                              float mx) {
  calc_qparams(mn, mx, q.quant_min, q.quant_max, q.symmetric, q.eps, q.scale + c,
               q.zero_point + c);
}

// Per-tensor qparams from the min/max partials (optionally after the moving-average update),
// computed once by minmax_finish_kernel and written to q (and the updated buffers), which the
// per-tensor fake-quant launch then reads.
struct MinMaxFinish {
  const float* partials = nullptr;  // [nparts mins][nparts maxs][old min, old max]
  int nparts = 0;
  bool moving_average = false;
  float averaging_constant = 0.0f;
  float* min_val = nullptr;
  float* max_val = nullptr;
  QparamsOut q;
};

// Pass 2 of the per-tensor observer: one block reduces the (at most 4 x SM) partials.
__global__ void __launch_bounds__(kThreads) minmax_finish_kernel(MinMaxFinish f) {
  float mn = kInf, mx = -kInf;
  for (int i = threadIdx.x; i < f.nparts; i += blockDim.x) {
    mn = nan_min(mn, f.partials[i]);
    mx = nan_max(mx, f.partials[f.nparts + i]);
  }
  block_minmax(mn, mx);
  if (threadIdx.x == 0) {
    if (f.moving_average) {
      // MovingAverageMinMaxObserver.forward, on the buffers as they were before this call
      // (snapshotted by the partials pass).
      const float old_min = f.partials[2 * f.nparts];
      const float old_max = f.partials[2 * f.nparts + 1];
      if (!(old_min == kInf && old_max == -kInf)) {
        const float c = f.averaging_constant;
        mn = __fadd_rn(old_min, __fmul_rn(c, __fsub_rn(mn, old_min)));
        mx = __fadd_rn(old_max, __fmul_rn(c, __fsub_rn(mx, old_max)));
      }
      *f.min_val = mn;
      *f.max_val = mx;
    }
    store_qparams(f.q, 0, mn, mx);
  }
}

// The fake-quant kernel. PerChannel: qparams per element from scale[c] / zero_point[c];
// ZpBefore: float zero point added before rounding. No division per element or vector: the
// runs layout (inner >= V, a vector spans at most two channels) and the scalar loop step a
// ChanCursor; Cols (inner == 1, channels innermost, C >= V) needs a grid on which a thread's V
// channels c + j (mod C) never change (see cols_grid), so their qparams are resolved once,
// before the loop.
template <typename T, int V, bool PerChannel, bool ZpBefore, bool Cols = false>
__global__ void __launch_bounds__(kThreads)
    fq_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ mask,
              FqLayout l, const float* __restrict__ scale, const void* __restrict__ zero_point,
              bool zp_is_float, int quant_min, int quant_max) {
  using A = acc_t<T>;
  const A qmin = static_cast<A>(quant_min);
  const A qmax = static_cast<A>(quant_max);
  const int64_t n = l.n;
  const int64_t mask_bytes = (n + 7) / 8;
  const bool small = n <= 0xffffffffLL;  // 32-bit channel arithmetic

  A t_sc = 0, t_inv = 0, t_zp = 0;  // per-tensor qparams
  if constexpr (!PerChannel) {
    const float s = scale[0];
    float z;
    if (zp_is_float) {  // torch's per-tensor float zero point: clamp(rne(zp))
      z = rintf(static_cast<const float*>(zero_point)[0]);
      z = fminf(fmaxf(z, static_cast<float>(quant_min)), static_cast<float>(quant_max));
    } else {
      z = static_cast<float>(static_cast<const int32_t*>(zero_point)[0]);
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
  const int64_t C = l.channels;
  ChanCursor cur{};
  const int64_t base0 = gwarp * (32 * V) + static_cast<int64_t>(lane) * V;
  A csc[Cols ? V : 1], cinv[Cols ? V : 1], czp[Cols ? V : 1];  // Cols: the thread's channels
  if constexpr (Cols) {
    // base0 < grid threads x V < 2^31 and C < 2^31 (cols_grid): a 32-bit division.
    const int64_t c = static_cast<uint32_t>(base0) % static_cast<uint32_t>(C);
    // All loads first, then the reciprocals (ptxas expands each into a call on its slow path;
    // with loads and calls interleaved, the values live across the calls spilled).
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t cj = c + j < C ? c + j : c + j - C;  // C >= V: one wrap at most
      csc[j] = scale[cj];
      if constexpr (ZpBefore) {
        czp[j] = static_cast<A>(static_cast<const float*>(zero_point)[cj]);
      } else {
        czp[j] = static_cast<A>(static_cast<const int32_t*>(zero_point)[cj]);
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) cinv[j] = static_cast<A>(__frcp_rn(static_cast<float>(csc[j])));
  } else if constexpr (PerChannel && V > 1) {
    cur = chan_cursor(base0, nwarps * (32 * V), l.inner, C, small);
  }
  for (int64_t t = gwarp; t < ntiles; t += nwarps) {
    const int64_t base = t * (32 * V) + static_cast<int64_t>(lane) * V;
    const Vec<T, V> in = load_vec<T, V>(x + base);
    Vec<T, V> res;
    uint32_t bits = 0;
    // Runs (inner >= V): a vector spans at most two channels; both qparam sets are loaded up
    // front (no calls inside the unrolled loop).
    A sc0 = 0, inv0 = 0, zp0 = 0, sc1 = 0, inv1 = 0, zp1 = 0;
    int64_t first_len = V;  // elements of the vector in the first channel
    if constexpr (PerChannel && !Cols) {
      const int64_t c0 = cur.c;
      params(c0, sc0, inv0, zp0);
      params(c0 + 1 == C ? 0 : c0 + 1, sc1, inv1, zp1);
      first_len = l.inner - cur.pos;
    } else if constexpr (!PerChannel) {
      params(0, sc0, inv0, zp0);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A sc, inv, zp;
      if constexpr (Cols) {
        sc = csc[j];
        inv = cinv[j];
        zp = czp[j];
      } else {
        const bool second = PerChannel && j >= first_len;
        sc = second ? sc1 : sc0;
        inv = second ? inv1 : inv0;
        zp = second ? zp1 : zp0;
      }
      bool ok;
      res.v[j] = from_acc<T>(fq_elem<A, ZpBefore, !PerChannel>(to_acc(in.v[j]), sc, inv, zp, qmin, qmax, ok));
      bits |= static_cast<uint32_t>(ok) << j;
    }
    store_vec<T, V>(out + base, res);
    if (mask != nullptr) {
      // Lanes [k * kLanesPerWord, (k + 1) * kLanesPerWord) hold the 32 elements of word k.
      const uint32_t w = tile_mask_word<V>(bits, lane);
      if (lane % kLanesPerWord == 0) store_mask_word(mask, mask_bytes, t * V + lane / kLanesPerWord, w);
    }
    if constexpr (PerChannel && V > 1 && !Cols) chan_advance(cur, l.inner, C);
  }

  // Scalar remainder: 32 consecutive elements per warp -> one ballot word.
  const int64_t start = ntiles * (32 * V);
  const int64_t ntail = (n - start + 31) / 32;
  auto tail_tile = [&](int64_t t, int64_t c) {
    const int64_t i = start + t * 32 + lane;
    bool ok = false;
    if (i < n) {
      A sc, inv, zp;
      params(c, sc, inv, zp);
      out[i] = from_acc<T>(fq_elem<A, ZpBefore, !PerChannel>(to_acc(x[i]), sc, inv, zp, qmin, qmax, ok));
    }
    const uint32_t w = __ballot_sync(0xffffffffu, ok);
    if (mask != nullptr && lane == 0) store_mask_word(mask, mask_bytes, start / 32 + t, w);
  };
  if constexpr (V > 1) {
    // Fewer than 32 x V elements are left: at most V <= 8 tiles, one per warp of the first
    // block, so this is no loop and its channel is divided out directly.
    if (gwarp < ntail) {
      int64_t c = 0;
      if constexpr (PerChannel) {
        int64_t q, r, unused;
        divmod(start + gwarp * 32 + lane, l.inner, small, q, r);
        divmod(q, C, small, unused, c);
      }
      tail_tile(gwarp, c);
    }
  } else {
    if constexpr (PerChannel) cur = chan_cursor(gwarp * 32 + lane, nwarps * 32, l.inner, C, small);
    for (int64_t t = gwarp; t < ntail; t += nwarps) {
      tail_tile(t, PerChannel ? cur.c : 0);
      if constexpr (PerChannel) chan_advance(cur, l.inner, C);
    }
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

// LSQ backward: torch's per-element formulas (_fake_quantize_learnable_per_*_affine_backward).
// One channel's resolved qparams, as torch resolves them.
template <typename A>
struct LsqParams {
  A sc, inv, zp, dsmall, dbig;
};

template <typename A>
__device__ __forceinline__ LsqParams<A> lsq_params(const float* scale, const float* zero_point,
                                                   int64_t c, bool per_channel, int quant_min,
                                                   int quant_max) {
  const float s = scale[c];
  const float zraw = zero_point[c];
  float z;
  if (!per_channel) {  // torch per-tensor: int64(clamp(zp + 0.5))
    z = fminf(fmaxf(__fadd_rn(zraw, 0.5f), static_cast<float>(quant_min)),
              static_cast<float>(quant_max));
    z = truncf(z);
  } else {  // torch per-channel: clamp(round(zp))
    z = fminf(fmaxf(rintf(zraw), static_cast<float>(quant_min)), static_cast<float>(quant_max));
  }
  LsqParams<A> p;
  p.sc = s;
  p.inv = static_cast<A>(__frcp_rn(s));
  p.zp = z;
  p.dsmall = static_cast<A>(quant_min) - p.zp;
  p.dbig = static_cast<A>(quant_max) - p.zp;
  return p;
}

// dx of one element, and its dscale / dzero_point terms added to s_ds / s_dz.
template <typename T, typename A>
__device__ __forceinline__ T lsq_elem(A g, A xi, const LsqParams<A>& p, A qmin, A qmax, A gf,
                                      A& s_ds, A& s_dz) {
  const A xq = rne(add_rn(p.zp, mul_rn(xi, p.inv)));
  const bool lo = xq < qmin, hi = xq > qmax;
  const A xc = lo ? qmin : (hi ? qmax : xq);
  const A xfq = mul_rn(xc - p.zp, p.sc);
  const A ds_in = mul_rn(mul_rn(g * (xfq - xi), p.inv), gf);
  const A ds_out = mul_rn(g * (lo ? p.dsmall : p.dbig), gf);
  const A dz_out = mul_rn(mul_rn(-g, p.sc), gf);
  s_ds = add_rn(s_ds, (lo || hi) ? ds_out : ds_in);
  s_dz = add_rn(s_dz, (lo || hi) ? dz_out : A(0));
  return from_acc<T>(g * static_cast<A>((xq >= qmin) && (xq <= qmax)));
}

// Where a reduction block's result goes: straight into the per-channel outputs when the grid
// has one block row (gridDim.y == 1), else into partials [gridDim.y, C] for a finishing pass.
__device__ __forceinline__ bool single_pass() { return gridDim.y == 1; }

// A pass-1 block's LSQ sums of channel c (of C): the outputs, or its row of the partials.
__device__ __forceinline__ void store_lsq_sums(float* dscale, float* dzero_point,
                                               float* partials, int64_t C, int64_t c, float ds,
                                               float dz) {
  if (single_pass()) {
    dscale[c] = ds;
    dzero_point[c] = dz;
  } else {
    partials[(blockIdx.y * C + c) * 2] = ds;
    partials[(blockIdx.y * C + c) * 2 + 1] = dz;
  }
}

// LSQ backward, pass 1, one channel (per tensor, or a size-1 channel axis): grid-stride over 128-bit vectors of grad and x, then a
// fixed-order block sum into partials[blockIdx.y][0] (grid (1, blocks)).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    lsq_flat_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx,
                    const float* __restrict__ scale, const float* __restrict__ zero_point,
                    int64_t n, bool per_channel, int quant_min, int quant_max,
                    float grad_factor, float* __restrict__ dscale,
                    float* __restrict__ dzero_point, float* __restrict__ partials) {
  using A = acc_t<T>;
  const A qmin = static_cast<A>(quant_min), qmax = static_cast<A>(quant_max);
  const A gf = static_cast<A>(grad_factor);
  const LsqParams<A> p = lsq_params<A>(scale, zero_point, 0, per_channel, quant_min, quant_max);
  A s_ds = 0, s_dz = 0;
  const int64_t tid = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.y) * blockDim.x;
  const int64_t nvec = n / V;
  for (int64_t i = tid; i < nvec; i += nthreads) {
    const Vec<T, V> g = load_vec<T, V>(grad + i * V);
    const Vec<T, V> xv = load_vec<T, V>(x + i * V);
    Vec<T, V> d;
#pragma unroll
    for (int j = 0; j < V; ++j)
      d.v[j] = lsq_elem<T, A>(to_acc(g.v[j]), to_acc(xv.v[j]), p, qmin, qmax, gf, s_ds, s_dz);
    store_vec<T, V>(dx + i * V, d);
  }
  for (int64_t i = nvec * V + tid; i < n; i += nthreads)
    dx[i] = lsq_elem<T, A>(to_acc(grad[i]), to_acc(x[i]), p, qmin, qmax, gf, s_ds, s_dz);
  const float b_ds = block_sum(static_cast<float>(s_ds));
  const float b_dz = block_sum(static_cast<float>(s_dz));
  if (threadIdx.x == 0) store_lsq_sums(dscale, dzero_point, partials, 1, 0, b_ds, b_dz);
}

// Shared-memory tree over the `rpb` row groups of a [rpb, tpr] thread tile (rpb a power of
// two): afterwards s[col * W + j] (row 0) holds the combination of all rows, in a fixed order.
template <int W, typename F>
__device__ __forceinline__ void tile_rows_tree(float* s, int tpr, F&& combine) {
  const int rpb = blockDim.x / tpr, r = threadIdx.x / tpr;
  for (int h = rpb / 2; h > 0; h >>= 1) {
    __syncthreads();
    if (r < h) {
#pragma unroll
      for (int j = 0; j < W; ++j)
        s[threadIdx.x * W + j] = combine(s[threadIdx.x * W + j], s[(threadIdx.x + h * tpr) * W + j]);
    }
  }
  __syncthreads();
}

// LSQ backward, pass 1, channels innermost (inner == 1; x is [rows, C]): a [rpb, tpr] thread
// tile, each thread owning V consecutive channels (one 128-bit load of grad and of x per row),
// rows strided over the block rows of the grid; sums combined over the tile's rows by a
// fixed tree. grid (ceil(C / (tpr * V)), gy).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    lsq_columns_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx,
                       const float* __restrict__ scale, const float* __restrict__ zero_point,
                       int64_t rows, int64_t C, int tpr, int quant_min, int quant_max,
                       float grad_factor, float* __restrict__ dscale,
                       float* __restrict__ dzero_point, float* __restrict__ partials) {
  using A = acc_t<T>;
  __shared__ float s_sum[kThreads * 2 * V];
  const A qmin = static_cast<A>(quant_min), qmax = static_cast<A>(quant_max);
  const A gf = static_cast<A>(grad_factor);
  const int col = threadIdx.x % tpr, r = threadIdx.x / tpr, rpb = blockDim.x / tpr;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tpr + col) * V;
  A s_ds[V], s_dz[V];
#pragma unroll
  for (int j = 0; j < V; ++j) s_ds[j] = s_dz[j] = 0;
  if (c0 < C) {  // V > 1 only when C % V == 0, so all V channels exist
    LsqParams<A> p[V];
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = lsq_params<A>(scale, zero_point, c0 + j, true, quant_min, quant_max);
    const int64_t step = static_cast<int64_t>(gridDim.y) * rpb;
    for (int64_t q = static_cast<int64_t>(blockIdx.y) * rpb + r; q < rows; q += step) {
      const int64_t o = q * C + c0;
      const Vec<T, V> g = load_vec<T, V>(grad + o);
      const Vec<T, V> xv = load_vec<T, V>(x + o);
      Vec<T, V> d;
#pragma unroll
      for (int j = 0; j < V; ++j)
        d.v[j] = lsq_elem<T, A>(to_acc(g.v[j]), to_acc(xv.v[j]), p[j], qmin, qmax, gf, s_ds[j], s_dz[j]);
      store_vec<T, V>(dx + o, d);
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s_sum[threadIdx.x * 2 * V + 2 * j] = static_cast<float>(s_ds[j]);
    s_sum[threadIdx.x * 2 * V + 2 * j + 1] = static_cast<float>(s_dz[j]);
  }
  tile_rows_tree<2 * V>(s_sum, tpr, [](float a, float b) { return a + b; });
  if (r == 0 && c0 < C) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = c0 + j;
      store_lsq_sums(dscale, dzero_point, partials, C, c, s_sum[threadIdx.x * 2 * V + 2 * j],
                     s_sum[threadIdx.x * 2 * V + 2 * j + 1]);
    }
  }
}

// LSQ backward, pass 1, inner > 1: channel c is `rows` contiguous runs of inner = inner_v * V
// elements at (q * C + c) * inner. Block (c, y): a [rpb, tpr] thread tile, lanes over a run
// (128-bit loads when inner % V == 0), tile rows over runs; the gridDim.y block rows are
// gridDim.y / gi groups over the runs x gi slices of each run (so few long runs, e.g. N = 1
// activations, still spread over many blocks); no per-element division.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 4)
    lsq_rows_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx,
                    const float* __restrict__ scale, const float* __restrict__ zero_point,
                    int64_t rows, int64_t C, int64_t inner_v, int tpr, int gi, bool per_channel,
                    int quant_min, int quant_max, float grad_factor, float* __restrict__ dscale,
                    float* __restrict__ dzero_point, float* __restrict__ partials) {
  using A = acc_t<T>;
  const A qmin = static_cast<A>(quant_min), qmax = static_cast<A>(quant_max);
  const A gf = static_cast<A>(grad_factor);
  const int col = threadIdx.x % tpr, r = threadIdx.x / tpr, rpb = blockDim.x / tpr;
  const int64_t run = inner_v * V, row_stride = C * run;
  const int yq = blockIdx.y / gi, yi = blockIdx.y % gi;  // once per block
  const int64_t q_step = static_cast<int64_t>(gridDim.y / gi) * rpb;
  const int64_t i_step = static_cast<int64_t>(gi) * tpr;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {  // block-uniform
    const LsqParams<A> p = lsq_params<A>(scale, zero_point, c, per_channel, quant_min, quant_max);
    A s_ds = 0, s_dz = 0;
    for (int64_t i = static_cast<int64_t>(yi) * tpr + col; i < inner_v; i += i_step) {
      for (int64_t q = static_cast<int64_t>(yq) * rpb + r; q < rows; q += q_step) {
        const int64_t o = q * row_stride + c * run + i * V;
        const Vec<T, V> g = load_vec<T, V>(grad + o);
        const Vec<T, V> xv = load_vec<T, V>(x + o);
        Vec<T, V> d;
#pragma unroll
        for (int j = 0; j < V; ++j)
          d.v[j] = lsq_elem<T, A>(to_acc(g.v[j]), to_acc(xv.v[j]), p, qmin, qmax, gf, s_ds, s_dz);
        store_vec<T, V>(dx + o, d);
      }
    }
    const float b_ds = block_sum(static_cast<float>(s_ds));
    const float b_dz = block_sum(static_cast<float>(s_dz));
    if (threadIdx.x == 0) store_lsq_sums(dscale, dzero_point, partials, C, c, b_ds, b_dz);
  }
}

// LSQ backward, pass 2 (only when pass 1 had gy > 1 block rows): one block per channel sums its
// gy partials ([gy, C, 2]) in a fixed order.
__global__ void __launch_bounds__(kThreads)
    lsq_finish_kernel(const float* __restrict__ partials, int gy, int64_t channels,
                      float* __restrict__ dscale, float* __restrict__ dzero_point) {
  for (int64_t c = blockIdx.x; c < channels; c += gridDim.x) {
    float s_ds = 0.0f, s_dz = 0.0f;
    for (int b = threadIdx.x; b < gy; b += blockDim.x) {
      s_ds += partials[(b * channels + c) * 2];
      s_dz += partials[(b * channels + c) * 2 + 1];
    }
    const float t_ds = block_sum(s_ds);
    const float t_dz = block_sum(s_dz);
    if (threadIdx.x == 0) {
      dscale[c] = t_ds;
      dzero_point[c] = t_dz;
    }
  }
}

// NaN-sticky min/max of x[0, n) over the thread's share of a grid-stride walk (first index i,
// stride `stride` in vectors of V): four independent 128-bit loads in flight, then the vectors
// left over, then the scalar tail n % V.
template <typename T, int V>
__device__ __forceinline__ void fold_strided(const T* __restrict__ x, int64_t n, int64_t i,
                                             int64_t stride, float& mn, float& mx) {
  const int64_t nvec = n / V;
  const int64_t first = i;
  for (; i + 3 * stride < nvec; i += 4 * stride) {
    const Vec<T, V> a = load_vec<T, V>(x + i * V);
    const Vec<T, V> b = load_vec<T, V>(x + (i + stride) * V);
    const Vec<T, V> c = load_vec<T, V>(x + (i + 2 * stride) * V);
    const Vec<T, V> d = load_vec<T, V>(x + (i + 3 * stride) * V);
    fold_minmax(a, mn, mx);
    fold_minmax(b, mn, mx);
    fold_minmax(c, mn, mx);
    fold_minmax(d, mn, mx);
  }
  for (; i < nvec; i += stride) fold_minmax(load_vec<T, V>(x + i * V), mn, mx);
  if constexpr (V > 1) {
    for (int64_t k = nvec * V + first; k < n; k += stride) fold_minmax(load_vec<T, 1>(x + k), mn, mx);
  }
}

// Per-tensor min/max, pass 1: one NaN-sticky partial per block, four independent 128-bit
// loads in flight per thread. Block 0 also snapshots the moving-average buffers (if given)
// for pass 2, which overwrites them.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    minmax_partial_kernel(const T* __restrict__ x, int64_t n, float* __restrict__ partials,
                          const float* __restrict__ min_val, const float* __restrict__ max_val) {
  float mn = kInf, mx = -kInf;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  fold_strided<T, V>(x, n, tid, static_cast<int64_t>(gridDim.x) * blockDim.x, mn, mx);
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
// quantizes the segment (second read from L2). V > 1 (128-bit accesses) only when x and out
// are 16-byte aligned and L % V == 0, so every segment starts aligned; the fake quant runs
// whole warp tiles of 32 x V elements, then 32-element scalar tiles for the rest. Needs
// L % 8 == 0 when the mask is saved, so that no mask byte is shared by two blocks. Same
// per-element math as fq_kernel; min/max is exact, so the load order changes no bit.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    minmax_fq_segment_kernel(const T* __restrict__ x, T* __restrict__ out,
                             uint8_t* __restrict__ mask, int64_t L, int64_t C, QparamsOut qo) {
  using A = acc_t<T>;
  constexpr int kLanesPerWord = 32 / V;
  __shared__ float s_qp[2];
  const A qmin = static_cast<A>(qo.quant_min), qmax = static_cast<A>(qo.quant_max);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t ntiles = V > 1 ? L / (32 * V) : 0;  // whole vector tiles of a segment
  const int64_t start = ntiles * (32 * V);           // a multiple of 32: whole mask words
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {  // block-uniform
    const T* xs = x + c * L;
    T* os = out + c * L;
    float mn = kInf, mx = -kInf;
    fold_strided<T, V>(xs, L, threadIdx.x, blockDim.x, mn, mx);
    block_minmax(mn, mx);
    if (threadIdx.x == 0) {
      float s;
      int32_t zp;
      calc_qparams(mn, mx, qo.quant_min, qo.quant_max, qo.symmetric, qo.eps, &s, &zp);
      qo.scale[c] = s;
      qo.zero_point[c] = zp;
      s_qp[0] = s;
      s_qp[1] = static_cast<float>(zp);
    }
    __syncthreads();
    const A sc = s_qp[0], inv = static_cast<A>(__frcp_rn(s_qp[0])), zp = s_qp[1];
    for (int64_t t = warp; t < ntiles; t += nwarps) {  // warp-uniform
      const int64_t j = t * (32 * V) + static_cast<int64_t>(lane) * V;
      const Vec<T, V> in = load_vec<T, V>(xs + j);
      Vec<T, V> res;
      uint32_t bits = 0;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        bool ok;
        res.v[k] = from_acc<T>(fq_elem<A, false>(to_acc(in.v[k]), sc, inv, zp, qmin, qmax, ok));
        bits |= static_cast<uint32_t>(ok) << k;
      }
      store_vec<T, V>(os + j, res);
      if (mask != nullptr) {
        // Word lane / kLanesPerWord of the tile; its lanes write one byte each (the segment
        // starts on a byte boundary, not necessarily on a word one).
        const uint32_t w = tile_mask_word<V>(bits, lane);
        const int b = lane % kLanesPerWord;
        if (b < 4)
          mask[(c * L + t * (32 * V)) / 8 + (lane / kLanesPerWord) * 4 + b] =
              static_cast<uint8_t>(w >> (8 * b));
      }
    }
    for (int64_t j0 = start + static_cast<int64_t>(warp) * 32; j0 < L; j0 += nwarps * 32) {
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

// Per-channel min/max destination: pass 1 writes NaN-sticky partials [gridDim.y, C] (mins,
// then maxs); minmax_columns_kernel<float, 1, true> turns them into qparams.
struct ChannelMinMaxOut {
  float* part_min = nullptr;
  float* part_max = nullptr;
  QparamsOut q;
};

// Finish: the qparams of channel c; pass 1: its block's partial min/max (row blockIdx.y).
// (Pass 1 always leaves the qparams to the finishing pass: the IEEE division in calc_qparams
// has a subroutine slow path, and inlined there its call made ptxas spill the loop state.)
template <bool Finish>
__device__ __forceinline__ void channel_minmax_store(const ChannelMinMaxOut& o, int64_t C,
                                                     int64_t c, float mn, float mx) {
  if constexpr (Finish) {
    store_qparams(o.q, c, mn, mx);
  } else {
    o.part_min[blockIdx.y * C + c] = mn;
    o.part_max[blockIdx.y * C + c] = mx;
  }
}

// Per-channel min/max with the channel innermost (inner == 1; x is [rows, C]): a [rpb, tpr]
// thread tile, each thread owning V consecutive channels (128-bit loads, a warp reads whole
// rows), rows strided over the grid's block rows with four loads in flight per thread, then a
// shared-memory tree over the tile's rows. grid (ceil(C / (tpr * V)), gy).
// Pairs: the finishing pass over [rows, C] partial mins (a) and maxs (b); otherwise b is unused.
template <typename T, int V, bool Pairs>
__global__ void __launch_bounds__(kThreads)
    minmax_columns_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t rows,
                          int64_t C, int tpr, ChannelMinMaxOut o) {
  __shared__ float s_mn[kThreads * V], s_mx[kThreads * V];
  const int col = threadIdx.x % tpr, r = threadIdx.x / tpr, rpb = blockDim.x / tpr;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tpr + col) * V;
  float mn[V], mx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mn[j] = kInf;
    mx[j] = -kInf;
  }
  auto fold = [&](const Vec<T, V>& lo, const Vec<T, V>& hi) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      mn[j] = nan_min(mn[j], static_cast<float>(to_acc(lo.v[j])));
      mx[j] = nan_max(mx[j], static_cast<float>(to_acc(hi.v[j])));
    }
  };
  if (c0 < C) {  // V > 1 only when C % V == 0, so all V channels exist
    const int64_t step = static_cast<int64_t>(gridDim.y) * rpb;
    const int64_t jump = step * C;
    int64_t q = static_cast<int64_t>(blockIdx.y) * rpb + r;
    int64_t o0 = q * C + c0;
    if constexpr (Pairs) {
      for (; q < rows; q += step, o0 += jump) fold(load_vec<T, V>(a + o0), load_vec<T, V>(b + o0));
    } else {
      for (; q + 3 * step < rows; q += 4 * step, o0 += 4 * jump) {
        const Vec<T, V> v0 = load_vec<T, V>(a + o0);
        const Vec<T, V> v1 = load_vec<T, V>(a + o0 + jump);
        const Vec<T, V> v2 = load_vec<T, V>(a + o0 + 2 * jump);
        const Vec<T, V> v3 = load_vec<T, V>(a + o0 + 3 * jump);
        fold(v0, v0);
        fold(v1, v1);
        fold(v2, v2);
        fold(v3, v3);
      }
      for (; q < rows; q += step, o0 += jump) {
        const Vec<T, V> v = load_vec<T, V>(a + o0);
        fold(v, v);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s_mn[threadIdx.x * V + j] = mn[j];
    s_mx[threadIdx.x * V + j] = mx[j];
  }
  tile_rows_tree<V>(s_mn, tpr, [](float u, float v) { return nan_min(u, v); });
  tile_rows_tree<V>(s_mx, tpr, [](float u, float v) { return nan_max(u, v); });
  // Row 0 of the tile holds the tile's tpr * V channels in order: one channel per thread.
  const int64_t tile_c0 = static_cast<int64_t>(blockIdx.x) * tpr * V;
  for (int k = threadIdx.x; k < tpr * V; k += blockDim.x) {
    if (tile_c0 + k < C) channel_minmax_store<Pairs>(o, C, tile_c0 + k, s_mn[k], s_mx[k]);
  }
}

// Per-channel min/max for inner > 1 (channel c is `rows` contiguous runs of inner = inner_v * V
// elements at (q * C + c) * inner): block (c, y), a [rpb, tpr] thread tile with lanes along a
// run (128-bit loads when inner % V == 0) and tile rows over runs, two runs in flight per
// thread; block rows split as in lsq_rows_kernel (runs x gi run slices); no per-element
// division.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, 4)
    minmax_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t C, int64_t inner_v,
                       int tpr, int gi, ChannelMinMaxOut o) {
  const int col = threadIdx.x % tpr, r = threadIdx.x / tpr, rpb = blockDim.x / tpr;
  const int64_t run = inner_v * V, row_stride = C * run;
  const int yq = blockIdx.y / gi, yi = blockIdx.y % gi;  // once per block
  const int64_t step = static_cast<int64_t>(gridDim.y / gi) * rpb;
  const int64_t i_step = static_cast<int64_t>(gi) * tpr;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {  // block-uniform
    float mn = kInf, mx = -kInf;
    for (int64_t i = static_cast<int64_t>(yi) * tpr + col; i < inner_v; i += i_step) {
      const T* base = x + c * run + i * V;
      int64_t q = static_cast<int64_t>(yq) * rpb + r;
      for (; q + step < rows; q += 2 * step) {
        const Vec<T, V> v0 = load_vec<T, V>(base + q * row_stride);
        const Vec<T, V> v1 = load_vec<T, V>(base + (q + step) * row_stride);
        fold_minmax(v0, mn, mx);
        fold_minmax(v1, mn, mx);
      }
      if (q < rows) fold_minmax(load_vec<T, V>(base + q * row_stride), mn, mx);
    }
    block_minmax(mn, mx);
    if (threadIdx.x == 0) channel_minmax_store<false>(o, C, c, mn, mx);
  }
}

int64_t elementwise_cap() { return static_cast<int64_t>(sm_count()) * 8; }  // 2048 threads/SM

int elementwise_blocks(int64_t work_items) {
  const int64_t cap = elementwise_cap();
  int64_t b = ceil_div(work_items, kThreads);
  if (b > cap) b = cap;
  return static_cast<int>(b < 1 ? 1 : b);
}

bool aligned16(const void* p) { return aligned_to(p, 16); }

// Grid of the channels-innermost fake quant (fq_kernel Cols), or 0 where it cannot run: the
// kernel needs each thread's V channels fixed, i.e. either one tile per warp at most (the
// elementwise grid covers n) or a step (blocks x kThreads x V elements) that is a whole
// number of rows of C, by rounding the grid up to a multiple of C / gcd(C, kThreads * V)
// blocks; that multiple may be at most the elementwise cap (so the grid at most doubles).
int64_t cols_grid(const FqLayout& l, int V) {
  const int64_t C = l.channels;
  if (l.inner != 1 || C < V || C >= (int64_t{1} << 31)) return 0;
  const int64_t blocks = elementwise_blocks(ceil_div(l.n, V));
  if (blocks * kThreads * V >= l.n) return blocks;
  int64_t a = C, b = static_cast<int64_t>(kThreads) * V;  // gcd(C, kThreads * V)
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  const int64_t m = C / a;
  return m <= elementwise_cap() ? ceil_div(blocks, m) * m : 0;
}

int minmax_parts(int64_t n, int V) {
  int64_t b = ceil_div(n, static_cast<int64_t>(kThreads) * V * 4);
  const int64_t cap = static_cast<int64_t>(kPartialBlocksPerSm) * sm_count();
  if (b > cap) b = cap;
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

// Cols: the grid from cols_grid (the kernel's precondition).
template <typename T, int V, bool PerChannel, bool ZpBefore, bool Cols = false>
void launch_fq(const T* x, T* out, uint8_t* mask, const FqLayout& l, const float* scale,
               const void* zp, bool zp_is_float, int qmin, int qmax, cudaStream_t stream) {
  const int64_t blocks = Cols ? cols_grid(l, V) : elementwise_blocks(ceil_div(l.n, V));
  const unsigned grid = static_cast<unsigned>(blocks);
  fq_kernel<T, V, PerChannel, ZpBefore, Cols><<<grid, kThreads, 0, stream>>>(
      x, out, mask, l, scale, zp, zp_is_float, qmin, qmax);
}

// Picks the vector width from the pointers' alignment.
template <typename T, bool PerChannel, bool ZpBefore>
void launch_fq_any(const void* x, void* out, uint8_t* mask, const FqLayout& l,
                   const float* scale, const void* zp, bool zp_is_float, int qmin, int qmax,
                   cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  T* ot = static_cast<T*>(out);
  // Per-channel vectors need inner >= V (at most two channels per vector) or the channels
  // innermost with C >= V (Cols); float64 per-channel stays scalar (its vector variant spills
  // around the fp64 rint/div calls).
  if constexpr (!PerChannel || sizeof(T) < 8) {
    if (aligned16(x) && aligned16(out)) {
      if (!PerChannel || l.inner >= V) {
        launch_fq<T, V, PerChannel, ZpBefore>(xt, ot, mask, l, scale, zp, zp_is_float, qmin,
                                              qmax, stream);
        return;
      }
      if constexpr (PerChannel) {
        if (cols_grid(l, V) > 0) {
          launch_fq<T, V, true, ZpBefore, true>(xt, ot, mask, l, scale, zp, zp_is_float, qmin,
                                                qmax, stream);
          return;
        }
      }
    }
  }
  launch_fq<T, 1, PerChannel, ZpBefore>(xt, ot, mask, l, scale, zp, zp_is_float, qmin, qmax,
                                        stream);
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

// The per-channel observer over contiguous segments of length L: 128-bit accesses when both
// pointers are 16-byte aligned and every segment starts aligned (L % V == 0).
template <typename T>
void launch_segments(const void* x, void* out, uint8_t* mask, int64_t L, int64_t C, int grid,
                     const QparamsOut& q, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  T* ot = static_cast<T*>(out);
  if (aligned16(x) && aligned16(out) && L % V == 0)
    minmax_fq_segment_kernel<T, V><<<grid, kThreads, 0, stream>>>(xt, ot, mask, L, C, q);
  else
    minmax_fq_segment_kernel<T, 1><<<grid, kThreads, 0, stream>>>(xt, ot, mask, L, C, q);
}

// Thread tile [rpb, tpr] (tpr * rpb == kThreads, tpr the smallest power of two covering
// `width` vectors) and grid (gx, gy) of a per-channel reduction's first pass. columns: the
// channel-innermost kernels (width = vectors per row, gx tiles across the channels); else
// the run kernels (width = vectors per run, one block column per channel). gy block rows
// share the rows, aiming at `target` blocks in all; run kernels split any budget the rows
// leave over into gi slices of each run (gy = row groups x gi).
struct TilePlan {
  int tpr = 1;
  int gi = 1;
  int64_t gx = 1, gy = 1;
};

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

TilePlan plan_tile(bool columns, int64_t C, int64_t rows, int64_t width, int64_t target) {
  TilePlan t;
  t.tpr = pow2_at_least(width, 1, kThreads);
  const int64_t rpb = kThreads / t.tpr;
  t.gx = columns ? ceil_div(width, t.tpr) : (C < (1 << 30) ? C : (1 << 30));
  const int64_t budget = clamp64(target / t.gx, 1, 65535);  // block rows
  const int64_t gq = clamp64(ceil_div(rows, rpb), 1, budget);
  if (!columns) t.gi = static_cast<int>(clamp64(ceil_div(width, t.tpr), 1, budget / gq));
  t.gy = gq * t.gi;
  return t;
}

// Vector width of a per-channel pass: 128-bit when every row/run start is 16-byte aligned.
int channel_vec(const FqLayout& l, size_t elem_bytes, bool aligned) {
  const int V = static_cast<int>(16 / elem_bytes);
  const int64_t unit = l.inner == 1 ? l.channels : l.inner;
  return aligned && unit % V == 0 ? V : 1;
}

TilePlan plan_channels(const FqLayout& l, int V, int64_t target) {
  const bool columns = l.inner == 1;
  const int64_t rows = l.n / (l.channels * l.inner);
  const int64_t width = columns ? ceil_div(l.channels, V) : l.inner / V;
  return plan_tile(columns, l.channels, rows, width, target);
}

// Largest gy any element size / alignment can give (sizes the workspace before the launch).
int64_t max_gy(const FqLayout& l, int64_t target) {
  int64_t g = 1;
  for (int V : {1, 2, 4, 8}) {
    if ((l.inner == 1 ? l.channels : l.inner) % V != 0) continue;
    const int64_t gy = plan_channels(l, V, target).gy;
    g = gy > g ? gy : g;
  }
  return g;
}

int64_t channel_minmax_target() { return static_cast<int64_t>(kChannelBlocksPerSm) * sm_count(); }

// Per-channel observer, any layout but segments: pass 1 (columns or runs kernel) and, when it
// used several block rows, the finishing columns pass over its partials; scale / zero_point
// are written on the device.
template <typename T>
void launch_channel_minmax(const T* x, const FqLayout& l, ChannelMinMaxOut o, float* ws,
                           cudaStream_t stream) {
  constexpr int VV = 16 / sizeof(T);
  const int V = channel_vec(l, sizeof(T), aligned16(x));
  const TilePlan t = plan_channels(l, V, channel_minmax_target());
  const int64_t rows = l.n / (l.channels * l.inner);
  o.part_min = ws;
  o.part_max = ws + t.gy * l.channels;
  const dim3 grid(static_cast<unsigned>(t.gx), static_cast<unsigned>(t.gy));
  if (l.inner == 1) {
    if (V == VV)
      minmax_columns_kernel<T, VV, false><<<grid, kThreads, 0, stream>>>(x, x, rows, l.channels, t.tpr, o);
    else
      minmax_columns_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(x, x, rows, l.channels, t.tpr, o);
  } else {
    if (V == VV)
      minmax_rows_kernel<T, VV><<<grid, kThreads, 0, stream>>>(x, rows, l.channels, l.inner / VV, t.tpr, t.gi, o);
    else
      minmax_rows_kernel<T, 1><<<grid, kThreads, 0, stream>>>(x, rows, l.channels, l.inner, t.tpr, t.gi, o);
  }
  {  // finish: [gy, C] partials -> qparams, threads across channels
    const int tpr = pow2_at_least(l.channels, 1, 32);
    minmax_columns_kernel<float, 1, true>
        <<<static_cast<unsigned>(ceil_div(l.channels, tpr)), kThreads, 0, stream>>>(
            o.part_min, o.part_max, t.gy, l.channels, tpr, o);
  }
}

// LSQ pass-1 geometry: one channel -> grid (1, blocks) over the flat tensor; else a TilePlan.
TilePlan plan_lsq(const FqLayout& l, int V) {
  if (l.channels == 1) {
    TilePlan t;
    int64_t b = ceil_div(l.n, static_cast<int64_t>(kThreads) * 8);
    t.gy = b < 1 ? 1 : (b > kLsqTargetBlocks ? kLsqTargetBlocks : b);
    return t;
  }
  return plan_channels(l, V, kLsqTargetBlocks);
}

}  // namespace

void fq_forward(DType dt, const void* x, void* out, uint8_t* mask, const FqLayout& l,
                const float* scale, const void* zero_point, bool zp_is_float, int quant_min,
                int quant_max, cudaStream_t stream) {
  if (l.n <= 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    if (!l.per_channel) {
      launch_fq_any<T, false, false>(x, out, mask, l, scale, zero_point, zp_is_float, quant_min,
                                     quant_max, stream);
    } else if (zp_is_float) {
      launch_fq_any<T, true, true>(x, out, mask, l, scale, zero_point, true, quant_min,
                                   quant_max, stream);
    } else {
      launch_fq_any<T, true, false>(x, out, mask, l, scale, zero_point, false, quant_min,
                                    quant_max, stream);
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
  if (l.channels <= 0 || l.n <= 0) return 0;
  const int64_t gy = l.channels == 1 ? plan_lsq(l, 1).gy : max_gy(l, kLsqTargetBlocks);
  return static_cast<size_t>(gy > 1 ? 2 * l.channels * gy : 0);
}

void fq_learnable_backward(DType dt, const void* grad, const void* x, void* dx, float* dscale,
                           float* dzero_point, const float* scale, const float* zero_point,
                           const FqLayout& l, int quant_min, int quant_max, float grad_factor,
                           float* workspace, cudaStream_t stream) {
  // No launch for empty input (a 0-sized grid is a launch error); the caller zero-fills.
  if (l.n <= 0 || l.channels <= 0) return;
  int64_t gy = 1;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VV = 16 / sizeof(T);
    const T* g = static_cast<const T*>(grad);
    const T* xt = static_cast<const T*>(x);
    T* d = static_cast<T*>(dx);
    const bool aligned = aligned16(grad) && aligned16(x) && aligned16(dx);
    if (l.channels == 1) {
      gy = plan_lsq(l, VV).gy;
      const dim3 grid(1, static_cast<unsigned>(gy));
      if (aligned)
        lsq_flat_kernel<T, VV><<<grid, kThreads, 0, stream>>>(g, xt, d, scale, zero_point, l.n,
                                                              l.per_channel, quant_min, quant_max,
                                                              grad_factor, dscale, dzero_point,
                                                              workspace);
      else
        lsq_flat_kernel<T, 1><<<grid, kThreads, 0, stream>>>(g, xt, d, scale, zero_point, l.n,
                                                             l.per_channel, quant_min, quant_max,
                                                             grad_factor, dscale, dzero_point,
                                                             workspace);
      return;
    }
    const int V = channel_vec(l, sizeof(T), aligned);
    const TilePlan t = plan_lsq(l, V);
    gy = t.gy;
    const int64_t rows = l.n / (l.channels * l.inner);
    const dim3 grid(static_cast<unsigned>(t.gx), static_cast<unsigned>(t.gy));
    if (l.inner == 1) {
      if (V == VV)
        lsq_columns_kernel<T, VV><<<grid, kThreads, 0, stream>>>(
            g, xt, d, scale, zero_point, rows, l.channels, t.tpr, quant_min, quant_max,
            grad_factor, dscale, dzero_point, workspace);
      else
        lsq_columns_kernel<T, 1><<<grid, kThreads, 0, stream>>>(
            g, xt, d, scale, zero_point, rows, l.channels, t.tpr, quant_min, quant_max,
            grad_factor, dscale, dzero_point, workspace);
    } else {
      if (V == VV)
        lsq_rows_kernel<T, VV><<<grid, kThreads, 0, stream>>>(
            g, xt, d, scale, zero_point, rows, l.channels, l.inner / VV, t.tpr, t.gi, l.per_channel,
            quant_min, quant_max, grad_factor, dscale, dzero_point, workspace);
      else
        lsq_rows_kernel<T, 1><<<grid, kThreads, 0, stream>>>(
            g, xt, d, scale, zero_point, rows, l.channels, l.inner, t.tpr, t.gi, l.per_channel,
            quant_min, quant_max, grad_factor, dscale, dzero_point, workspace);
    }
  });
  if (gy > 1) {  // pass 2: the [gy, C] partials, summed per channel in a fixed order
    const int gc = static_cast<int>(l.channels < 65535 ? l.channels : 65535);
    lsq_finish_kernel<<<gc, kThreads, 0, stream>>>(workspace, static_cast<int>(gy), l.channels,
                                                   dscale, dzero_point);
  }
}

size_t minmax_workspace_floats(const FqLayout& l) {
  const size_t per_tensor = 2 * static_cast<size_t>(kPartialBlocksPerSm) * sm_count() + 2;
  if (!l.per_channel || l.n <= 0 || l.channels <= 0) return per_tensor;
  const size_t per_channel = static_cast<size_t>(2 * max_gy(l, channel_minmax_target()) * l.channels);
  return per_channel > per_tensor ? per_channel : per_tensor;
}

void fq_minmax_forward(DType dt, const void* x, void* out, uint8_t* mask, const FqLayout& l,
                       int quant_min, int quant_max, bool symmetric, float eps, float* scale,
                       int32_t* zero_point, float* workspace, cudaStream_t stream) {
  if (l.n <= 0) return;  // the caller fills scale = 1, zero_point = 0
  const QparamsOut q{quant_min, quant_max, symmetric, eps, scale, zero_point};
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    if (!l.per_channel) {
      MinMaxFinish fin;
      fin.partials = workspace;
      fin.nparts = launch_minmax_partials<T>(x, l.n, workspace, nullptr, nullptr, stream);
      fin.q = q;
      minmax_finish_kernel<<<1, kThreads, 0, stream>>>(fin);
      launch_fq_any<T, false, false>(x, out, mask, l, scale, zero_point, false, quant_min,
                                     quant_max, stream);
      return;
    }
    const int64_t L = l.n / l.channels;
    const int grid = static_cast<int>(l.channels < (1 << 30) ? l.channels : (1 << 30));
    const bool segments = l.inner == L;  // channel axis outermost in memory order
    if (segments && (mask == nullptr || L % 8 == 0)) {
      launch_segments<T>(x, out, mask, L, l.channels, grid, q, stream);
      return;
    }
    ChannelMinMaxOut o;
    o.q = q;
    launch_channel_minmax<T>(static_cast<const T*>(x), l, o, workspace, stream);
    launch_fq_any<T, true, false>(x, out, mask, l, scale, zero_point, false, quant_min,
                                  quant_max, stream);
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
    MinMaxFinish fin;
    fin.partials = workspace;
    fin.nparts = launch_minmax_partials<T>(x, n, workspace, min_val, max_val, stream);
    fin.q = QparamsOut{quant_min, quant_max, symmetric, eps, scale, zero_point};
    fin.moving_average = true;  // the EMA of the stored range, written back, feeds the qparams
    fin.averaging_constant = averaging_constant;
    fin.min_val = min_val;
    fin.max_val = max_val;
    minmax_finish_kernel<<<1, kThreads, 0, stream>>>(fin);
    launch_fq_any<T, false, false>(x, out, mask, l, scale, zero_point, false, quant_min,
                                   quant_max, stream);
  });
}

}  // namespace acq::cuda
