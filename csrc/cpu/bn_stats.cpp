#include "cpu/bn_stats.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>

namespace acq {
namespace cpu {
namespace {

constexpr int64_t kChanBlock = 64;  // channels per item when channels are contiguous
constexpr int kLanes = 16;          // independent accumulators of a contiguous run

constexpr int64_t kItemElems = 1 << 15;  // channel-inner items: about this many elements
constexpr int64_t kMaxItemRows = 1024;

// A work item: channels [c0, c1) of one layer over positions m = n * S + s in [m0, m1).
// `slot` is where its partial sums go (c1 - c0 doubles each for s1 and s2).
struct Item {
  int layer;
  int64_t c0, c1, m0, m1, slot;
};

bool channels_inner(const BnLayer& L) { return L.sC == 1 && L.C > 1; }

std::vector<Item> make_items(const std::vector<BnLayer>& layers, int64_t* n_slots) {
  std::vector<Item> items;
  int64_t slot = 0;
  for (int l = 0; l < static_cast<int>(layers.size()); ++l) {
    const BnLayer& L = layers[l];
    const int64_t M = L.N * L.S;
    if (channels_inner(L)) {
      // Split positions too, or a layer with few channels would be one item.
      for (int64_t c = 0; c < L.C; c += kChanBlock) {
        const int64_t c1 = std::min(L.C, c + kChanBlock);
        // fp32 partial sums: at most kMaxItemRows rows per item keeps their error ~1e-6.
        const int64_t rows = std::clamp<int64_t>(kItemElems / (c1 - c), 1, kMaxItemRows);
        for (int64_t m = 0; m < M; m += rows) {
          items.push_back({l, c, c1, m, std::min(M, m + rows), slot});
          slot += c1 - c;
        }
      }
    } else {
      for (int64_t c = 0; c < L.C; ++c) items.push_back({l, c, c + 1, 0, M, slot++});
    }
  }
  *n_slots = slot;
  return items;
}

// Runs f(item) over all items with dynamic scheduling: layers differ a lot in work per item.
template <typename F>
void for_each_item(const std::vector<Item>& items, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(items[i]);
  });
}

// Sum of (x - k) and (x - k)^2 over a contiguous run, with kLanes independent accumulators
// so that the compiler vectorises it without reassociating.
template <typename T>
inline void run_sums(const T* p, int64_t n, double k, double& s1, double& s2) {
  double a1[kLanes] = {0}, a2[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      double d = static_cast<double>(static_cast<float>(p[i + j])) - k;
      a1[j] += d;
      a2[j] += d * d;
    }
  }
  for (; i < n; ++i) {
    double d = static_cast<double>(static_cast<float>(p[i])) - k;
    a1[0] += d;
    a2[0] += d * d;
  }
  for (int j = 0; j < kLanes; ++j) {
    s1 += a1[j];
    s2 += a2[j];
  }
}

template <>
inline void run_sums<double>(const double* p, int64_t n, double k, double& s1, double& s2) {
  double a1[kLanes] = {0}, a2[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      double d = p[i + j] - k;
      a1[j] += d;
      a2[j] += d * d;
    }
  }
  for (; i < n; ++i) {
    double d = p[i] - k;
    a1[0] += d;
    a2[0] += d * d;
  }
  for (int j = 0; j < kLanes; ++j) {
    s1 += a1[j];
    s2 += a2[j];
  }
}

template <typename T>
inline double as_double(T v) { return static_cast<double>(static_cast<float>(v)); }
template <>
inline double as_double<double>(double v) { return v; }

// Positions outer, a block of contiguous channels inner (each row is a vector load).
// Accumulates in fp32 lanes (an item has at most kItemElems / nc rows of shifted values),
// then in double. NC > 0 fixes the block width at compile time so the accumulators can live
// in vector registers.
template <typename T, int NC>
void channel_block_sums(const BnLayer& L, const Item& it, const T* x, double* ps1, double* ps2) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t nc = NC > 0 ? NC : it.c1 - it.c0;
  acc_t k[kChanBlock], s1[kChanBlock] = {0}, s2[kChanBlock] = {0};
  for (int64_t j = 0; j < nc; ++j) k[j] = static_cast<acc_t>(x[it.c0 + j]);
  for (int64_t m = it.m0; m < it.m1; ++m) {
    const int64_t n = m / L.S, s = m - n * L.S;
    const T* p = x + n * L.sN + s * L.sS + it.c0;
    for (int64_t j = 0; j < nc; ++j) {
      acc_t d = static_cast<acc_t>(p[j]) - k[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
  for (int64_t j = 0; j < nc; ++j) {
    ps1[it.slot + j] = s1[j];
    ps2[it.slot + j] = s2[j];
  }
}

// Shifted sums of one item into ps1/ps2[item.slot ...]; the shift of channel c is its first
// element, the same for every item of that channel, so the items' sums add up.
template <typename T>
void forward_item(const BnLayer& L, const Item& it, double* ps1, double* ps2) {
  const T* x = static_cast<const T*>(L.x);
  if (channels_inner(L)) {
    const int64_t nc = it.c1 - it.c0;
    if (nc == kChanBlock) {
      channel_block_sums<T, kChanBlock>(L, it, x, ps1, ps2);
    } else {
      channel_block_sums<T, 0>(L, it, x, ps1, ps2);
    }
    return;
  }
  const int64_t c = it.c0;
  const T* xc = x + c * L.sC;
  const double k = as_double(xc[0]);
  double s1 = 0, s2 = 0;
  for (int64_t n = 0; n < L.N; ++n) {
    const T* row = xc + n * L.sN;
    if (L.sS == 1) {
      run_sums<T>(row, L.S, k, s1, s2);
    } else {
      for (int64_t s = 0; s < L.S; ++s) {
        double d = as_double(row[s * L.sS]) - k;
        s1 += d;
        s2 += d * d;
      }
    }
  }
  ps1[it.slot] = s1;
  ps2[it.slot] = s2;
}

template <typename T>
void backward_item(const BnLayer& L, const Item& it, const double* coef, int64_t total_c) {
  // fp32 math for fp32/fp16/bf16 (the result is rounded to T anyway), double for double.
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T* x = static_cast<const T*>(L.x);
  T* dx = static_cast<T*>(L.dx);
  const double* A = coef + L.cbase;
  const double* B = coef + total_c + L.cbase;
  const double* K = coef + 2 * total_c + L.cbase;
  if (channels_inner(L)) {
    const int64_t nc = it.c1 - it.c0;
    acc_t a[kChanBlock], b[kChanBlock], k[kChanBlock];
    for (int64_t j = 0; j < nc; ++j) {
      a[j] = static_cast<acc_t>(A[it.c0 + j]);
      b[j] = static_cast<acc_t>(B[it.c0 + j]);
      k[j] = static_cast<acc_t>(K[it.c0 + j]);
    }
    for (int64_t m = it.m0; m < it.m1; ++m) {
      const int64_t n = m / L.S, s = m - n * L.S;
      const int64_t o = n * L.sN + s * L.sS + it.c0;
      for (int64_t j = 0; j < nc; ++j)
        dx[o + j] = static_cast<T>(a[j] + b[j] * (static_cast<acc_t>(x[o + j]) - k[j]));
    }
    return;
  }
  const int64_t c = it.c0;
  const acc_t a = static_cast<acc_t>(A[c]), b = static_cast<acc_t>(B[c]),
              k = static_cast<acc_t>(K[c]);
  for (int64_t n = 0; n < L.N; ++n) {
    const int64_t o = n * L.sN + c * L.sC;
    if (L.sS == 1) {
      const T* xr = x + o;
      T* dr = dx + o;
      for (int64_t s = 0; s < L.S; ++s) dr[s] = static_cast<T>(a + b * (static_cast<acc_t>(xr[s]) - k));
    } else {
      for (int64_t s = 0; s < L.S; ++s) {
        const int64_t e = o + s * L.sS;
        dx[e] = static_cast<T>(a + b * (static_cast<acc_t>(x[e]) - k));
      }
    }
  }
}

template <typename F>
void dispatch(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Double: f(double{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "bn_stats: unsupported dtype ", t);
  }
}

}  // namespace

void bn_stats_forward(const std::vector<BnLayer>& layers, double* mean, double* var) {
  int64_t n_slots = 0;
  const std::vector<Item> items = make_items(layers, &n_slots);
  std::vector<double> ps1(n_slots), ps2(n_slots);
  for_each_item(items, [&](const Item& it) {
    const BnLayer& L = layers[it.layer];
    dispatch(L.dtype, [&](auto tag) { forward_item<decltype(tag)>(L, it, ps1.data(), ps2.data()); });
  });
  // Combine: the items of a channel hold sums about the same shift, so they simply add.
  int64_t total_c = 0;
  for (const BnLayer& L : layers) total_c = std::max(total_c, L.cbase + L.C);
  std::vector<double> s1(total_c, 0.0), s2(total_c, 0.0), shift(total_c, 0.0);
  for (const Item& it : items) {
    const BnLayer& L = layers[it.layer];
    for (int64_t c = it.c0; c < it.c1; ++c) {
      s1[L.cbase + c] += ps1[it.slot + c - it.c0];
      s2[L.cbase + c] += ps2[it.slot + c - it.c0];
    }
  }
  for (const BnLayer& L : layers) {
    const double M = static_cast<double>(L.N * L.S);
    for (int64_t c = 0; c < L.C; ++c) {
      double k = 0;
      dispatch(L.dtype, [&](auto tag) {
        using T = decltype(tag);
        k = as_double(static_cast<const T*>(L.x)[c * L.sC]);
      });
      const double m1 = s1[L.cbase + c] / M;
      mean[L.cbase + c] = k + m1;
      var[L.cbase + c] = std::max(s2[L.cbase + c] / M - m1 * m1, 0.0);
    }
  }
}

void bn_stats_backward(const std::vector<BnLayer>& layers, const double* coef, int64_t total_c) {
  int64_t n_slots = 0;
  const std::vector<Item> items = make_items(layers, &n_slots);
  for_each_item(items, [&](const Item& it) {
    const BnLayer& L = layers[it.layer];
    dispatch(L.dtype, [&](auto tag) { backward_item<decltype(tag)>(L, it, coef, total_c); });
  });
}

}  // namespace cpu
}  // namespace acq
