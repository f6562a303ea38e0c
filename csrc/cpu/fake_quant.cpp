// CPU kernels of the fake-quantization family.
//
// Work is split into chunks of kChunk elements (a multiple of 64, so every thread writes whole
// mask bytes) run by at::parallel_for, and each chunk into blocks of kBlock elements whose
// in-range flags go to a small stack array and are then packed 8 per byte. Per-channel work
// walks "runs": maximal stretches of memory with one channel, so the inner loops see scalar
// qparams and auto-vectorise. Rounding is the magic-number trick, exact for round-half-even
// under the default rounding mode and vectorisable on baseline SSE2 (std::nearbyint is not).
// Comparisons may raise FP exceptions; telling gcc we do not inspect the exception flags
// lets it if-convert the compare-and-select clamps, so the loops vectorise. Values are
// unaffected (no reassociation, no finite-math assumptions; fp-contract=off keeps targets
// with FMA from fusing x * inv + zp, which would round once instead of twice).
// (Before the includes, so that inlined helpers get the same option and still inline.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif

#include "cpu/fake_quant.h"
#include "cpu/fake_quant_avx2.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// A second, AVX2 copy of the hot loops picked at load time (bitwise the same results: no FMA
// is enabled, so no contraction changes the rounding).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ACQ_HOT __attribute__((target_clones("avx2", "default")))
#else
#define ACQ_HOT
#endif

namespace acq::cpu {
namespace {

constexpr int64_t kChunk = 32768;  // elements per parallel task (multiple of 64)
constexpr int64_t kBlock = 512;    // elements per stack flag buffer (multiple of 64)
constexpr int64_t kShortRun = 32;  // channel strides below this use fq_cycle

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Round half to even: (v + 1.5 * 2^(p-1)) - 1.5 * 2^(p-1) is exact for |v| < 2^(p-2); larger
// values are already integers (or, below 2^(p-1), far outside any 16-bit quant range).
inline float rne(float v) {
  const float r = (v + 0x1.8p23f) - 0x1.8p23f;
  return std::fabs(v) < 0x1p22f ? r : v;
}
inline double rne(double v) {
  const double r = (v + 0x1.8p52) - 0x1.8p52;
  return std::fabs(v) < 0x1p51 ? r : v;
}

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Chunk size of the per-channel reductions: kChunk, grown (in whole blocks) so that the
// [chunks x channels] partials stay within about 2^20 entries.
int64_t reduction_chunk(int64_t n, int64_t channels) {
  constexpr int64_t kMaxEntries = int64_t{1} << 20;
  const int64_t want = (n / kMaxEntries + 1) * channels;  // chunk >= n * C / kMaxEntries
  const int64_t c = std::max(kChunk, want);
  return (c + kBlock - 1) / kBlock * kBlock;
}

// Calls f(offset, length, channel) for each maximal run of one channel in [begin, end).
template <typename F>
inline void for_each_run(int64_t begin, int64_t end, int64_t inner, int64_t channels, F&& f) {
  if (channels == 1) {
    f(begin, end - begin, int64_t{0});
    return;
  }
  int64_t o = begin;
  int64_t c = (o / inner) % channels;
  int64_t pos = o % inner;
  while (o < end) {
    const int64_t len = std::min(inner - pos, end - o);
    f(o, len, c);
    o += len;
    pos = 0;
    if (++c == channels) c = 0;
  }
}

// Packs flags[0..len) (0/1 bytes) into mask bytes, LSB first. The multiply moves byte k of
// an 8-byte word to bit 56 + k with no overlapping partial products (so no carries).
inline void pack_flags(const uint8_t* flags, int64_t len, uint8_t* mask) {
  const int64_t full = len / 8;
  for (int64_t j = 0; j < full; ++j) {
    uint64_t u;
    std::memcpy(&u, flags + 8 * j, 8);
    mask[j] = static_cast<uint8_t>((u * 0x0102040810204080ULL) >> 56);
  }
  if (len % 8) {
    unsigned b = 0;
    for (int64_t k = 0; k < len % 8; ++k) b |= static_cast<unsigned>(flags[8 * full + k]) << k;
    mask[full] = static_cast<uint8_t>(b);
  }
}

// One element of the fake quant; returns the output, sets the in-range flag.
template <typename T, bool ZpBefore>
inline T fq_one(T xv, acc_t<T> sc, acc_t<T> inv, acc_t<T> zp, acc_t<T> qmin, acc_t<T> qmax,
                bool via_float, uint8_t* flag) {
  using A = acc_t<T>;
  const A v = static_cast<A>(xv) * inv;
  const A q = ZpBefore ? rne(v + zp) : rne(v) + zp;
  *flag = static_cast<uint8_t>((q >= qmin) & (q <= qmax));
  // Compare-and-select so that NaN falls through both and propagates.
  A qc = q < qmin ? qmin : q;
  qc = qc > qmax ? qmax : qc;
  if constexpr (ZpBefore) {
    // torch computes (qc - zp) * scale in double for a float zero point (qc - zp is then
    // exact), rounding once to fp32.
    const double d = (static_cast<double>(qc) - static_cast<double>(zp)) *
                     static_cast<double>(sc);
    return static_cast<T>(static_cast<A>(d));
  } else {
    const A r = (qc - zp) * sc;  // exact product, rounded once
    return static_cast<T>(via_float ? static_cast<A>(static_cast<float>(r)) : r);
  }
}

// A run of one channel (or the whole tensor): scalar qparams, vectorises.
template <typename T, bool ZpBefore>
ACQ_HOT void fq_run(const T* __restrict x, T* __restrict out, uint8_t* __restrict flags,
                    int64_t len, acc_t<T> sc, acc_t<T> inv, acc_t<T> zp, acc_t<T> qmin,
                    acc_t<T> qmax, bool via_float) {
  for (int64_t i = 0; i < len; ++i) {
    out[i] = fq_one<T, ZpBefore>(x[i], sc, inv, zp, qmin, qmax, via_float, flags + i);
  }
}

// Per-channel with a short channel stride (e.g. channels last along C): the channel changes
// every `inner` elements, so walk it alongside instead of calling fq_run per tiny run.
template <typename T, bool ZpBefore>
ACQ_HOT void fq_cycle(const T* __restrict x, T* __restrict out, uint8_t* __restrict flags,
                      int64_t len, int64_t pos, int64_t c, int64_t inner, int64_t channels,
                      const float* sc, const float* inv, const float* zp, acc_t<T> qmin,
                      acc_t<T> qmax) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < len; ++i) {
    out[i] = fq_one<T, ZpBefore>(x[i], static_cast<A>(sc[c]), static_cast<A>(inv[c]),
                                 static_cast<A>(zp[c]), qmin, qmax, false, flags + i);
    if (++pos == inner) {
      pos = 0;
      if (++c == channels) c = 0;
    }
  }
}

template <typename T>
ACQ_HOT void mask_backward_bytes(const T* __restrict grad, const uint8_t* __restrict mask,
                                 T* __restrict out, int64_t nbytes) {
  using A = acc_t<T>;
  for (int64_t j = 0; j < nbytes; ++j) {
    const unsigned b = mask[j];
    for (int k = 0; k < 8; ++k) {
      // grad * bit (not a select) so NaN and -0 behave like torch's grad * mask.
      out[8 * j + k] = static_cast<T>(static_cast<A>(grad[8 * j + k]) *
                                      static_cast<A>((b >> k) & 1u));
    }
  }
}

// Sum of a[0..len) with 8 independent lanes (vectorises without reassociation licences).
template <typename A>
inline A lane_sum(const A* __restrict a, int64_t len) {
  A acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t full = len / 8 * 8;
  for (int64_t i = 0; i < full; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k];
  }
  for (int64_t i = full; i < len; ++i) acc[i - full] += a[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// len <= kBlock (runs never cross a block). Fma: torch's CPU kernels are compiled with FP
// contraction on AVX2/AVX512, so zp + x * inv and (xc - zp) * scale - x are fused multiply-adds
// there (one rounding); std::fma reproduces them (this file is fp-contract=off otherwise).
// ds_el/dz_el non-null: the per-element gradients are written there (the caller reduces them
// as torch does); else they are summed into *sum_ds / *sum_dz.
template <typename T, bool Fma>
ACQ_HOT void lsq_run(const T* __restrict grad, const T* __restrict x, T* __restrict dx,
                     int64_t len, acc_t<T> sc, acc_t<T> inv, acc_t<T> zp, acc_t<T> qmin,
                     acc_t<T> qmax, acc_t<T> gf, acc_t<T>* sum_ds, acc_t<T>* sum_dz,
                     T* __restrict ds_el, T* __restrict dz_el) {
  using A = acc_t<T>;
  alignas(64) A ds[kBlock];
  alignas(64) A dz[kBlock];
  // Same expressions and order as torch's fake_quantize_learnable_*_grad_kernel_cpu.
  const A dsmall = qmin - zp;
  const A dbig = qmax - zp;
  for (int64_t i = 0; i < len; ++i) {
    const A g = static_cast<A>(grad[i]);
    const A xi = static_cast<A>(x[i]);
    const A xq = Fma ? rne(std::fma(xi, inv, zp)) : rne(zp + xi * inv);
    const bool lo = xq < qmin;
    const bool hi = xq > qmax;
    dx[i] = static_cast<T>(g * static_cast<A>((xq >= qmin) & (xq <= qmax)));
    const A xc = lo ? qmin : (hi ? qmax : xq);
    const A err = Fma ? std::fma(xc - zp, sc, -xi) : (xc - zp) * sc - xi;
    const A ds_in = ((g * err) * inv) * gf;
    const A ds_out = (g * (lo ? dsmall : dbig)) * gf;
    const A dz_out = ((-g) * sc) * gf;
    ds[i] = (lo | hi) ? ds_out : ds_in;
    dz[i] = (lo | hi) ? dz_out : A(0);
  }
  if (ds_el != nullptr) {
    for (int64_t i = 0; i < len; ++i) {
      ds_el[i] = static_cast<T>(ds[i]);
      dz_el[i] = static_cast<T>(dz[i]);
    }
    return;
  }
  *sum_ds += lane_sum(ds, len);
  *sum_dz += lane_sum(dz, len);
}

template <typename T>
ACQ_HOT void minmax_run(const T* __restrict x, int64_t len, float* mn_io, float* mx_io,
                        bool* nan_io) {
  // 16 independent lanes so the reduction vectorises without reassociation licences; NaN is
  // tracked in a float lane (all lanes one width, so the lane loop vectorises).
  constexpr int L = 16;
  float mn[L], mx[L], nn[L];
  for (int k = 0; k < L; ++k) {
    mn[k] = *mn_io;
    mx[k] = *mx_io;
    nn[k] = 0.0f;
  }
  const int64_t full = len / L * L;
  for (int64_t i = 0; i < full; i += L) {
    for (int k = 0; k < L; ++k) {
      const float v = static_cast<float>(x[i + k]);
      mn[k] = v < mn[k] ? v : mn[k];
      mx[k] = v > mx[k] ? v : mx[k];
      nn[k] = v != v ? v : nn[k];
    }
  }
  float m0 = mn[0], m1 = mx[0];
  bool has_nan = *nan_io;
  for (int k = 0; k < L; ++k) {
    m0 = mn[k] < m0 ? mn[k] : m0;
    m1 = mx[k] > m1 ? mx[k] : m1;
    has_nan |= nn[k] != nn[k];
  }
  for (int64_t i = full; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    m0 = v < m0 ? v : m0;
    m1 = v > m1 ? v : m1;
    has_nan |= v != v;
  }
  *mn_io = m0;
  *mx_io = m1;
  *nan_io = has_nan;
}

template <typename T, bool ZpBefore>
void fq_forward_impl(const T* x, T* out, uint8_t* mask, int64_t n, const FqParams& p) {
  using A = acc_t<T>;
  const A qmin = static_cast<A>(p.quant_min);
  const A qmax = static_cast<A>(p.quant_max);
  at::parallel_for(0, num_chunks(n), 1, [&](int64_t cb, int64_t ce) {
    alignas(64) uint8_t flags[kBlock];
    int64_t start = cb * kChunk;
    if constexpr (std::is_same_v<T, float> && !ZpBefore) {
      if (p.channels == 1 && avx2::available()) {  // starts on a mask byte: cb * kChunk
        start += avx2::fq_tensor_f32(x + start, out + start, mask ? mask + start / 8 : nullptr,
                                     std::min(n, ce * kChunk) - start, p.scale[0],
                                     p.inv_scale[0], p.zero_point[0], qmin, qmax);
      }
    }
    for (int64_t b0 = start; b0 < std::min(n, ce * kChunk); b0 += kBlock) {
      const int64_t b1 = std::min(b0 + kBlock, n);
      if (p.channels > 1 && p.inner < kShortRun) {
        fq_cycle<T, ZpBefore>(x + b0, out + b0, flags, b1 - b0, b0 % p.inner,
                              (b0 / p.inner) % p.channels, p.inner, p.channels, p.scale,
                              p.inv_scale, p.zero_point, qmin, qmax);
      } else {
        for_each_run(b0, b1, p.inner, p.channels, [&](int64_t o, int64_t len, int64_t c) {
          int64_t done = 0;
          if constexpr (std::is_same_v<T, float> && !ZpBefore) {
            if (avx2::available()) {
              done = avx2::fq_run_f32(x + o, out + o, flags + (o - b0), len, p.scale[c],
                                      p.inv_scale[c], p.zero_point[c], qmin, qmax);
            }
          }
          fq_run<T, ZpBefore>(x + o + done, out + o + done, flags + (o - b0) + done, len - done,
                              static_cast<A>(p.scale[c]), static_cast<A>(p.inv_scale[c]),
                              static_cast<A>(p.zero_point[c]), qmin, qmax, p.out_via_float);
        });
      }
      if (mask != nullptr) pack_flags(flags, b1 - b0, mask + b0 / 8);
    }
  });
}

}  // namespace

template <typename T>
void fq_forward(const T* x, T* out, uint8_t* mask, int64_t n, const FqParams& p) {
  if (n <= 0) return;
  if (p.zp_before_round) {
    fq_forward_impl<T, true>(x, out, mask, n, p);
  } else {
    fq_forward_impl<T, false>(x, out, mask, n, p);
  }
}

template <typename T>
void fq_mask_backward(const T* grad, const uint8_t* mask, T* out, int64_t n) {
  if (n <= 0) return;
  at::parallel_for(0, num_chunks(n), 1, [&](int64_t cb, int64_t ce) {
    const int64_t b0 = cb * kChunk;
    const int64_t b1 = std::min(n, ce * kChunk);
    const int64_t full = (b1 - b0) / 8;
    if constexpr (std::is_same_v<T, float>) {
      if (avx2::available()) {
        avx2::mask_backward_f32(grad + b0, mask + b0 / 8, out + b0, full);
      } else {
        mask_backward_bytes<T>(grad + b0, mask + b0 / 8, out + b0, full);
      }
    } else {
      mask_backward_bytes<T>(grad + b0, mask + b0 / 8, out + b0, full);
    }
    using A = acc_t<T>;
    const unsigned last = mask[b0 / 8 + full];  // only read when a partial byte exists
    for (int64_t i = b0 + 8 * full, k = 0; i < b1; ++i, ++k) {
      out[i] = static_cast<T>(static_cast<A>(grad[i]) * static_cast<A>((last >> k) & 1u));
    }
  });
}

template <typename T>
void fq_learnable_backward(const T* grad, const T* x, T* dx, float* dscale, float* dzero_point,
                           int64_t n, const FqParams& p, float grad_factor, bool fma) {
  using A = acc_t<T>;
  const int64_t C = p.channels;
  const int64_t chunk = reduction_chunk(n, C);
  const int64_t chunks = (n + chunk - 1) / chunk;
  // Per-chunk partial sums: fixed chunk boundaries and a fixed combine order make the result
  // independent of the thread count.
  std::vector<double> part(static_cast<size_t>(chunks * C * 2), 0.0);
  const A qmin = static_cast<A>(p.quant_min);
  const A qmax = static_cast<A>(p.quant_max);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      double* ds = part.data() + ch * C * 2;
      double* dz = ds + C;
      const int64_t end = std::min(n, (ch + 1) * chunk);
      for (int64_t b0 = ch * chunk; b0 < end; b0 += kBlock) {
        for_each_run(b0, std::min(b0 + kBlock, end), p.inner, C,
                     [&](int64_t o, int64_t len, int64_t c) {
                       A s_ds = 0, s_dz = 0;
                       auto run = fma ? lsq_run<T, true> : lsq_run<T, false>;
                       run(grad + o, x + o, dx + o, len, static_cast<A>(p.scale[c]),
                           static_cast<A>(p.inv_scale[c]), static_cast<A>(p.zero_point[c]),
                           qmin, qmax, static_cast<A>(grad_factor), &s_ds, &s_dz, nullptr,
                           nullptr);
                       ds[c] += s_ds;
                       dz[c] += s_dz;
                     });
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s_ds = 0, s_dz = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      s_ds += part[ch * C * 2 + c];
      s_dz += part[ch * C * 2 + C + c];
    }
    dscale[c] = static_cast<float>(s_ds);
    dzero_point[c] = static_cast<float>(s_dz);
  }
}

template <typename T>
void fq_learnable_backward_elementwise(const T* grad, const T* x, T* dx, T* ds_el, T* dz_el,
                                       int64_t n, const FqParams& p, float grad_factor,
                                       bool fma) {
  using A = acc_t<T>;
  const A qmin = static_cast<A>(p.quant_min);
  const A qmax = static_cast<A>(p.quant_max);
  at::parallel_for(0, num_chunks(n), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t b0 = cb * kChunk; b0 < std::min(n, ce * kChunk); b0 += kBlock) {
      for_each_run(b0, std::min(b0 + kBlock, n), p.inner, p.channels,
                   [&](int64_t o, int64_t len, int64_t c) {
                     auto run = fma ? lsq_run<T, true> : lsq_run<T, false>;
                     run(grad + o, x + o, dx + o, len, static_cast<A>(p.scale[c]),
                         static_cast<A>(p.inv_scale[c]), static_cast<A>(p.zero_point[c]), qmin,
                         qmax, static_cast<A>(grad_factor), nullptr, nullptr, ds_el + o,
                         dz_el + o);
                   });
    }
  });
}

template <typename T>
void minmax(const T* x, int64_t n, int64_t inner, int64_t channels, float* min_out,
            float* max_out) {
  const int64_t C = channels;
  const int64_t chunk = reduction_chunk(n, C);
  const int64_t chunks = (n + chunk - 1) / chunk;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> pmin(static_cast<size_t>(std::max<int64_t>(chunks * C, 1)), kInf);
  std::vector<float> pmax(pmin.size(), -kInf);
  std::vector<uint8_t> pnan(pmin.size(), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t end = std::min(n, (ch + 1) * chunk);
      for_each_run(ch * chunk, end, inner, C, [&](int64_t o, int64_t len, int64_t c) {
        const int64_t i = ch * C + c;
        bool has_nan = pnan[i] != 0;
        minmax_run<T>(x + o, len, &pmin[i], &pmax[i], &has_nan);
        pnan[i] = has_nan;
      });
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    float mn = kInf, mx = -kInf;
    bool has_nan = false;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t i = ch * C + c;
      mn = std::min(mn, pmin[i]);
      mx = std::max(mx, pmax[i]);
      has_nan |= pnan[i] != 0;
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    min_out[c] = has_nan ? nan : mn;
    max_out[c] = has_nan ? nan : mx;
  }
}

void calculate_qparams(float min_val, float max_val, int64_t quant_min, int64_t quant_max,
                       bool symmetric, float eps, float* scale, int32_t* zero_point) {
  calculate_qparams(min_val, max_val, quant_min, quant_max, symmetric,
                    quant_min < 0 ? 0 : (quant_min + quant_max) / 2, eps, scale, zero_point);
}

void observe_update(const float* cur_min, const float* cur_max, float* min_val, float* max_val,
                    int64_t channels, float averaging_constant, bool moving_average) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float c = averaging_constant;
  for (int64_t i = 0; i < channels; ++i) {
    const float bmin = cur_min[i], bmax = cur_max[i];
    if (moving_average) {
      if (min_val[i] == kInf && max_val[i] == -kInf) {  // nothing seen yet: the batch range
        min_val[i] = bmin;
        max_val[i] = bmax;
      } else {
        // min_val + c * (batch_min - min_val), each step rounded to fp32 like torch's tensor
        // ops (fp-contract=off: no fused multiply-add)
        min_val[i] = min_val[i] + c * (bmin - min_val[i]);
        max_val[i] = max_val[i] + c * (bmax - max_val[i]);
      }
    } else {  // torch.min / torch.max: NaN propagates
      const float m0 = min_val[i], m1 = max_val[i];
      min_val[i] = (std::isnan(bmin) || std::isnan(m0)) ? std::numeric_limits<float>::quiet_NaN()
                                                        : std::min(bmin, m0);
      max_val[i] = (std::isnan(bmax) || std::isnan(m1)) ? std::numeric_limits<float>::quiet_NaN()
                                                        : std::max(bmax, m1);
    }
  }
}

void calculate_qparams(float min_val, float max_val, int64_t quant_min, int64_t quant_max,
                       bool symmetric, int64_t symmetric_zero_point, float eps, float* scale,
                       int32_t* zero_point) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (min_val == kInf && max_val == -kInf) {  // nothing observed (check_min_max_valid)
    *scale = 1.0f;
    *zero_point = 0;
    return;
  }
  // torch.min/max propagate NaN, hence the explicit checks.
  const float min_neg = (min_val < 0.0f || std::isnan(min_val)) ? min_val : 0.0f;
  float max_pos = (max_val > 0.0f || std::isnan(max_val)) ? max_val : 0.0f;
  float s;
  int64_t zp;
  if (symmetric) {
    const float neg = -min_neg;
    max_pos = (neg > max_pos || std::isnan(neg)) ? neg : max_pos;
    s = max_pos / static_cast<float>(static_cast<double>(quant_max - quant_min) / 2);
    s = (s < eps && !std::isnan(s)) ? eps : s;
    zp = symmetric_zero_point;
  } else {
    s = (max_pos - min_neg) / static_cast<float>(quant_max - quant_min);
    s = (s < eps && !std::isnan(s)) ? eps : s;
    const float r = std::nearbyint(min_neg / s);
    // torch: quant_min - round(min_neg / scale).to(int32) in int32 arithmetic, which wraps;
    // NaN or out-of-range values (min_val = -inf) convert to INT32_MIN as torch's CPU cast
    // does on x86 (casting them in C++ is undefined), so an unsigned range clamps to quant_min.
    const int32_t ri = (r >= -0x1p31f && r < 0x1p31f) ? static_cast<int32_t>(r)
                                                       : std::numeric_limits<int32_t>::min();
    const uint32_t diff = static_cast<uint32_t>(static_cast<int32_t>(quant_min)) -
                          static_cast<uint32_t>(ri);
    zp = static_cast<int32_t>(diff);  // two's-complement wrap, as torch's int32 subtraction
    zp = std::min(std::max(zp, quant_min), quant_max);
  }
  *scale = s;
  *zero_point = static_cast<int32_t>(zp);
}

void unpack_mask(const uint8_t* mask, bool* out, int64_t n) {
  if (n <= 0) return;
  // the 8 bools of each byte value as one 64-bit store (byte k of the word = bit k)
  static const auto table = [] {
    std::array<uint64_t, 256> t{};
    for (int v = 0; v < 256; ++v) {
      unsigned char b[8];
      for (int k = 0; k < 8; ++k) b[k] = static_cast<unsigned char>((v >> k) & 1);
      std::memcpy(&t[v], b, 8);
    }
    return t;
  }();
  at::parallel_for(0, num_chunks(n), 1, [&](int64_t cb, int64_t ce) {
    const int64_t b0 = cb * kChunk;
    const int64_t b1 = std::min(n, ce * kChunk);
    const int64_t full = (b1 - b0) / 8;
    const uint8_t* m = mask + b0 / 8;
    int64_t j = 0;
    if (avx2::available()) {
      j = avx2::unpack_mask(m, reinterpret_cast<uint8_t*>(out + b0), full);
    }
    for (; j < full; ++j) std::memcpy(out + b0 + 8 * j, &table[m[j]], 8);
    for (int64_t i = b0 + 8 * full, k = 0; i < b1; ++i, ++k) out[i] = (m[full] >> k) & 1u;
  });
}

#define ACQ_INSTANTIATE(T)                                                                   \
  template void fq_forward<T>(const T*, T*, uint8_t*, int64_t, const FqParams&);             \
  template void fq_mask_backward<T>(const T*, const uint8_t*, T*, int64_t);                  \
  template void fq_learnable_backward<T>(const T*, const T*, T*, float*, float*, int64_t,    \
                                         const FqParams&, float, bool);                      \
  template void minmax<T>(const T*, int64_t, int64_t, int64_t, float*, float*);

ACQ_INSTANTIATE(float)
ACQ_INSTANTIATE(double)
template void fq_learnable_backward_elementwise<float>(const float*, const float*, float*, float*,
                                                       float*, int64_t, const FqParams&, float,
                                                       bool);
template void fq_learnable_backward_elementwise<double>(const double*, const double*, double*,
                                                        double*, double*, int64_t,
                                                        const FqParams&, float, bool);
ACQ_INSTANTIATE(c10::Half)
ACQ_INSTANTIATE(c10::BFloat16)
#undef ACQ_INSTANTIATE

}  // namespace acq::cpu
