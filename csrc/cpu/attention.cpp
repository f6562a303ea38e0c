// CPU kernels of the spatial-attention family; see attention.h.
#include "cpu/attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

namespace acq::cpu {
namespace {

constexpr double kEps = 1e-12;  // norm clamp, as acq_kernels.attention.reference.EPS
constexpr int kLanes = 8;       // independent partial sums: lets the channel reduction vectorise

template <bool kSquare, typename T, typename Acc>
inline Acc pow_abs(T v, Acc p) {
  const Acc x = static_cast<Acc>(v);
  if constexpr (kSquare) {
    return x * x;
  } else {
    return std::pow(std::abs(x), p);  // 0 at x == 0 (p > 0); NaN stays NaN
  }
}

// acc[s] = sum_c |f[c, s]|^p over pixels-contiguous rows. Four channel rows per sweep cut the
// load/store traffic on acc (which stays in L1) by four; the inner loops vectorise.
template <bool kSquare, typename T, typename Acc>
void channel_sum_nchw(const T* __restrict__ f, int64_t C, int64_t HW, int64_t stride_c, Acc p,
                      Acc* __restrict__ acc) {
  std::fill(acc, acc + HW, Acc(0));
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const T* __restrict__ r0 = f + c * stride_c;
    const T* __restrict__ r1 = r0 + stride_c;
    const T* __restrict__ r2 = r1 + stride_c;
    const T* __restrict__ r3 = r2 + stride_c;
    for (int64_t s = 0; s < HW; ++s)
      acc[s] += (pow_abs<kSquare>(r0[s], p) + pow_abs<kSquare>(r1[s], p)) +
                (pow_abs<kSquare>(r2[s], p) + pow_abs<kSquare>(r3[s], p));
  }
  for (; c < C; ++c) {
    const T* __restrict__ row = f + c * stride_c;
    for (int64_t s = 0; s < HW; ++s) acc[s] += pow_abs<kSquare>(row[s], p);
  }
}

// acc[s] = sum_c |f[s, c]|^p over channels-contiguous pixels.
template <bool kSquare, typename T, typename Acc>
void channel_sum_nhwc(const T* f, int64_t C, int64_t HW, int64_t stride_s, Acc p, Acc* acc) {
  for (int64_t s = 0; s < HW; ++s) {
    const T* px = f + s * stride_s;
    Acc part[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int j = 0; j < kLanes; ++j) part[j] += pow_abs<kSquare>(px[c + j], p);
    Acc tot = 0;
    for (int j = 0; j < kLanes; ++j) tot += part[j];
    for (; c < C; ++c) tot += pow_abs<kSquare>(px[c], p);
    acc[s] = tot;
  }
}

// Norm, sum and center of one sample's map; writes its outputs.
template <typename T, typename Acc>
void finalize_sample(Acc* a, int64_t C, int64_t H, int64_t W, T* amap, T* anorm, T* center,
                     Acc* stats) {
  const int64_t HW = H * W;
  // Sums over the map in double: cheap at HW elements and order-insensitive enough to match
  // torch's pairwise reductions closely.
  double sq = 0, tot = 0, sx = 0, sy = 0;
  for (int64_t h = 0; h < H; ++h) {
    const Acc v = static_cast<Acc>(2 * h + 1) / static_cast<Acc>(H) - Acc(1);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t s = h * W + w;
      const Acc u = static_cast<Acc>(2 * w + 1) / static_cast<Acc>(W) - Acc(1);
      const Acc val = a[s] / static_cast<Acc>(C);
      a[s] = val;
      sq += static_cast<double>(val) * val;
      tot += val;
      sx += static_cast<double>(val) * u;
      sy += static_cast<double>(val) * v;
    }
  }
  const Acc norm = static_cast<Acc>(std::sqrt(sq));
  const Acc denom = norm < static_cast<Acc>(kEps) ? static_cast<Acc>(kEps) : norm;  // NaN stays
  const Acc total = static_cast<Acc>(tot);
  const Acc cx = total == Acc(0) ? Acc(0) : static_cast<Acc>(sx) / total;
  const Acc cy = total == Acc(0) ? Acc(0) : static_cast<Acc>(sy) / total;
  for (int64_t s = 0; s < HW; ++s) {
    amap[s] = static_cast<T>(a[s]);
    anorm[s] = static_cast<T>(a[s] / denom);
  }
  center[0] = static_cast<T>(cx);
  center[1] = static_cast<T>(cy);
  stats[0] = norm;
  stats[1] = total;
  stats[2] = cx;
  stats[3] = cy;
}

template <bool kSquare, typename T, typename Acc>
void map_fwd_impl(const T* f, AttnShape sh, AttnLayout lay, Acc p, Acc* a32, T* amap, T* anorm,
                  T* center, Acc* stats) {
  const int64_t HW = sh.H * sh.W;
  at::parallel_for(0, sh.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* fn = f + n * lay.stride_n;
      Acc* acc = a32 + n * HW;
      if (lay.channels_last)
        channel_sum_nhwc<kSquare>(fn, sh.C, HW, lay.stride_s, p, acc);
      else
        channel_sum_nchw<kSquare>(fn, sh.C, HW, lay.stride_c, p, acc);
      finalize_sample(acc, sh.C, sh.H, sh.W, amap + n * HW, anorm + n * HW, center + 2 * n,
                      stats + 4 * n);
    }
  });
}

template <bool kSquare, typename T, typename Acc>
inline T grad_elem(T v, Acc d, Acc pm1) {
  const Acc x = static_cast<Acc>(v);
  if constexpr (kSquare) {
    return static_cast<T>(d * x);
  } else {
    const Acc mag = std::pow(std::abs(x), pm1);
    return static_cast<T>(x == Acc(0) ? Acc(0) : (x > Acc(0) ? d * mag : -d * mag));
  }
}

template <bool kSquare, typename T, typename Acc>
void feat_bwd_impl(const T* f, const Acc* dA, T* df, AttnShape sh, AttnLayout in,
                   AttnLayout out, Acc scale, Acc pm1) {
  const int64_t HW = sh.H * sh.W;
  const int64_t C = sh.C;
  if (!in.channels_last) {
    // Rows (n, c) of HW contiguous pixels.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, sh.N * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / C, c = r % C;
        const T* x = f + n * in.stride_n + c * in.stride_c;
        T* y = df + n * out.stride_n + c * out.stride_c;
        const Acc* d = dA + n * HW;
        for (int64_t s = 0; s < HW; ++s) y[s] = grad_elem<kSquare>(x[s], d[s] * scale, pm1);
      }
    });
  } else {
    // Rows (n, s) of C contiguous channels; dA is indexed by the row itself.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, sh.N * HW, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / HW, s = r % HW;
        const T* x = f + n * in.stride_n + s * in.stride_s;
        T* y = df + n * out.stride_n + s * out.stride_s;
        const Acc d = dA[r] * scale;
        for (int64_t c = 0; c < C; ++c) y[c] = grad_elem<kSquare>(x[c], d, pm1);
      }
    });
  }
}

}  // namespace

template <typename T, typename Acc>
void attention_map_fwd(const T* f, AttnShape shape, AttnLayout lay, double p, Acc* a32, T* amap,
                       T* anorm, T* center, Acc* stats) {
  if (p == 2.0)
    map_fwd_impl<true>(f, shape, lay, Acc(2), a32, amap, anorm, center, stats);
  else
    map_fwd_impl<false>(f, shape, lay, static_cast<Acc>(p), a32, amap, anorm, center, stats);
}

template <typename T, typename Acc>
void attention_feat_bwd(const T* f, const Acc* dA, T* df, AttnShape shape, AttnLayout in,
                        AttnLayout out, double p) {
  const Acc C = static_cast<Acc>(shape.C);
  if (p == 2.0)
    feat_bwd_impl<true>(f, dA, df, shape, in, out, Acc(2) / C, Acc(1));
  else
    feat_bwd_impl<false>(f, dA, df, shape, in, out, static_cast<Acc>(p) / C,
                         static_cast<Acc>(p - 1.0));
}

template <typename Acc>
void attention_map_grad(const Acc* a32, const Acc* stats, const Acc* g_amap, const Acc* g_anorm,
                        const Acc* g_center, AttnShape sh, Acc* dA) {
  const int64_t H = sh.H, W = sh.W, HW = H * W;
  const Acc eps = static_cast<Acc>(kEps);
  // ~HW-sized work per sample: only worth threads for large batches.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, sh.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Acc* a = a32 + n * HW;
      const Acc* st = stats + 4 * n;
      Acc* d = dA + n * HW;
      if (g_amap) {
        const Acc* g = g_amap + n * HW;
        for (int64_t s = 0; s < HW; ++s) d[s] = g[s];
      } else {
        std::fill(d, d + HW, Acc(0));
      }
      if (g_anorm) {
        const Acc* g = g_anorm + n * HW;
        const Acc norm = st[0];
        const bool active = norm >= eps;  // F.normalize's clamp_min passes grads where norm >= eps
        const Acc denom = active ? norm : eps;
        Acc part[kLanes] = {};
        int64_t s = 0;
        for (; s + kLanes <= HW; s += kLanes)
          for (int j = 0; j < kLanes; ++j) part[j] += (a[s + j] / denom) * g[s + j];
        Acc dot = 0;
        for (int j = 0; j < kLanes; ++j) dot += part[j];
        for (; s < HW; ++s) dot += (a[s] / denom) * g[s];
        if (!active) dot = 0;
        for (s = 0; s < HW; ++s) d[s] += (g[s] - (a[s] / denom) * dot) / denom;
      }
      if (g_center && st[1] != Acc(0)) {
        const Acc tot = st[1], cx = st[2], cy = st[3];
        const Acc gx = g_center[2 * n], gy = g_center[2 * n + 1];
        for (int64_t h = 0; h < H; ++h) {
          const Acc v = static_cast<Acc>(2 * h + 1) / static_cast<Acc>(H) - Acc(1);
          const Acc ty = gy * (v - cy);
          for (int64_t w = 0; w < W; ++w) {
            const Acc u = static_cast<Acc>(2 * w + 1) / static_cast<Acc>(W) - Acc(1);
            d[h * W + w] += (gx * (u - cx) + ty) / tot;
          }
        }
      }
    }
  });
}

template void attention_map_grad<float>(const float*, const float*, const float*, const float*,
                                        const float*, AttnShape, float*);
template void attention_map_grad<double>(const double*, const double*, const double*,
                                         const double*, const double*, AttnShape, double*);

#define ACQ_ATTN_INSTANTIATE(T, Acc)                                                        \
  template void attention_map_fwd<T, Acc>(const T*, AttnShape, AttnLayout, double, Acc*, T*, \
                                          T*, T*, Acc*);                                     \
  template void attention_feat_bwd<T, Acc>(const T*, const Acc*, T*, AttnShape, AttnLayout, \
                                           AttnLayout, double);

ACQ_ATTN_INSTANTIATE(float, float)
ACQ_ATTN_INSTANTIATE(double, double)
ACQ_ATTN_INSTANTIATE(c10::Half, float)
ACQ_ATTN_INSTANTIATE(c10::BFloat16, float)

}  // namespace acq::cpu
