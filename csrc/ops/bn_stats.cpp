// Operators of the batched BN-statistics family (see acq_kernels/bn_stats/ops.py):
//   bn_stats_fwd(Tensor[] xs) -> Tensor            [2, sum C]: means, biased variances
//   bn_stats_bwd(Tensor[] xs, Tensor coef) -> Tensor[]   dx = A + B * (x - K), coef [3, sum C]
// CPU: csrc/cpu/bn_stats.cpp; CUDA: csrc/cuda/bn_stats.cu (one launch each way for all layers).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "cpu/bn_stats.h"
#include "generated/build_config.h"

#if ACQ_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/bn_stats.cuh"
#endif

namespace {

// Layer geometry as [N, C, S] with strides, S merging the trailing dims.
struct Geometry {
  int64_t N, C, S, sN, sC, sS;
};

// Merges dims 2.. of x into one (S, sS); false when they do not form one arithmetic progression.
bool geometry(const at::Tensor& x, Geometry* g) {
  g->N = x.size(0);
  g->C = x.size(1);
  g->sN = x.stride(0);
  g->sC = x.stride(1);
  g->S = 1;
  g->sS = 1;
  bool first = true;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) == 1) continue;
    if (first) {
      g->sS = x.stride(d);
      first = false;
    } else if (x.stride(d) != g->S * g->sS) {
      return false;
    }
    g->S *= x.size(d);
  }
  return true;
}

void check_inputs(const at::TensorList xs, const char* op) {
  TORCH_CHECK(!xs.empty(), op, ": xs must be a non-empty list");
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].dim() >= 2, op, ": xs[", i, "] must have at least 2 dims");
    TORCH_CHECK(xs[i].numel() > 0, op, ": xs[", i, "] is empty");
    TORCH_CHECK(xs[i].device() == xs[0].device(), op, ": xs[", i, "] is on another device");
    const auto t = xs[i].scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, op,
                ": xs[", i, "] has unsupported dtype ", t);
  }
}

// Inputs with mergeable trailing dims and a gradient layout equal to their own (so x and dx
// share offsets); others are copied to contiguous.
std::vector<at::Tensor> prepare(const at::TensorList xs, std::vector<Geometry>* geo) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  geo->resize(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    at::Tensor x = xs[i];
    bool dense = x.is_non_overlapping_and_dense();
    if (!dense || !geometry(x, &(*geo)[i])) {
      x = x.contiguous();
      geometry(x, &(*geo)[i]);
    }
    out.push_back(x);
  }
  return out;
}

bool all_double(const at::TensorList xs) {
  for (const auto& x : xs)
    if (x.scalar_type() != at::kDouble) return false;
  return true;
}

std::vector<acq::cpu::BnLayer> cpu_layers(const std::vector<at::Tensor>& xs,
                                          const std::vector<Geometry>& geo,
                                          const std::vector<at::Tensor>* dxs) {
  std::vector<acq::cpu::BnLayer> layers(xs.size());
  int64_t cbase = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const Geometry& g = geo[i];
    layers[i] = {xs[i].data_ptr(), dxs ? (*dxs)[i].data_ptr() : nullptr, xs[i].scalar_type(),
                 g.N, g.C, g.S, g.sN, g.sC, g.sS, cbase};
    cbase += g.C;
  }
  return layers;
}

int64_t total_channels(const at::TensorList xs) {
  int64_t c = 0;
  for (const auto& x : xs) c += x.size(1);
  return c;
}

at::Tensor bn_stats_fwd_cpu(const at::TensorList xs_in) {
  check_inputs(xs_in, "bn_stats_fwd");
  std::vector<Geometry> geo;
  std::vector<at::Tensor> xs = prepare(xs_in, &geo);
  const int64_t total_c = total_channels(xs_in);
  at::Tensor out = at::empty({2, total_c}, xs_in[0].options().dtype(at::kDouble));
  double* p = out.data_ptr<double>();
  acq::cpu::bn_stats_forward(cpu_layers(xs, geo, nullptr), p, p + total_c);
  return all_double(xs_in) ? out : out.to(at::kFloat);
}

// Shared by the CPU and CUDA backward: checks coef, lays the inputs out and allocates their
// gradients in the same layout; returns the total channel count.
int64_t prepare_backward(const at::TensorList xs_in, const at::Tensor& coef,
                         std::vector<Geometry>* geo, std::vector<at::Tensor>* xs,
                         std::vector<at::Tensor>* dxs) {
  const int64_t total_c = total_channels(xs_in);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == 3 && coef.size(1) == total_c,
              "bn_stats_bwd: coef must have shape [3, ", total_c, "]");
  *xs = prepare(xs_in, geo);
  for (const auto& x : *xs) dxs->push_back(at::empty_like(x));
  for (size_t i = 0; i < xs->size(); ++i)
    TORCH_CHECK((*dxs)[i].strides() == (*xs)[i].strides(), "bn_stats_bwd: gradient layout mismatch");
  return total_c;
}

std::vector<at::Tensor> bn_stats_bwd_cpu(const at::TensorList xs_in, const at::Tensor& coef) {
  check_inputs(xs_in, "bn_stats_bwd");
  std::vector<Geometry> geo;
  std::vector<at::Tensor> xs, dxs;
  const int64_t total_c = prepare_backward(xs_in, coef, &geo, &xs, &dxs);
  at::Tensor c = coef.to(at::kDouble).contiguous();
  acq::cpu::bn_stats_backward(cpu_layers(xs, geo, &dxs), c.data_ptr<double>(), total_c);
  return dxs;
}

#if ACQ_WITH_CUDA
using namespace acq::cuda;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "bn_stats (cuda): unsupported dtype ", t, " (float64 runs on cpu)");
  }
  return 0;
}

// Pinned host memory for one layer table [L, kBnLayerFields]. Pinned, because torch refuses a
// pageable<->CUDA copy during a CUDA graph capture (and a pageable copy is a host sync); the
// caching host allocator keeps an uncaptured table's block from reuse until its copy has run.
// Inside a capture the copy becomes a graph node that every replay runs again from the same host
// address, so a captured table must stay (unchanged) for the process's life, and is best not
// allocated there (the host allocator may query CUDA events, which a capture forbids): captured
// tables are carved out of a per-device reserve that uncaptured calls keep ready, and kept.
constexpr int64_t kReserveLongs = 8192;  // 64 KiB
std::mutex g_table_mu;
std::map<int, std::pair<at::Tensor, int64_t>> g_reserve;  // device -> (buffer, longs used)
std::vector<at::Tensor> g_captured;                       // a few hundred bytes per captured call

at::Tensor pinned_table(int64_t L, int device, bool capturing) {
  const auto opts = at::TensorOptions().dtype(at::kLong).pinned_memory(true);
  const int64_t n = L * kBnLayerFields;
  const std::lock_guard<std::mutex> lock(g_table_mu);
  auto& r = g_reserve[device];
  if (!capturing) {
    if (!r.first.defined() || r.second > kReserveLongs / 2) r = {at::empty({kReserveLongs}, opts), 0};
    return at::empty({L, kBnLayerFields}, opts);
  }
  at::Tensor t;
  if (r.first.defined() && r.second + n <= kReserveLongs) {
    t = r.first.narrow(0, r.second, n).view({L, kBnLayerFields});
    r.second += (n + 1) / 2 * 2;  // 16-byte aligned
  } else {
    t = at::empty({L, kBnLayerFields}, opts);  // no uncaptured call came first, or a huge table
  }
  g_captured.push_back(t);
  return t;
}

// Host-built layer table (see bn_stats.cuh) copied to the device; returns tiles and slots.
// The table holds this call's data pointers, so it is uploaded on every call, asynchronously.
at::Tensor cuda_layer_table(const std::vector<at::Tensor>& xs, const std::vector<Geometry>& geo,
                            const std::vector<at::Tensor>* dxs, int64_t* n_tiles,
                            int64_t* n_slots) {
  const int64_t L = static_cast<int64_t>(xs.size());
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  at::Tensor host = pinned_table(L, xs[0].device().index(), capturing);
  int64_t* t = host.data_ptr<int64_t>();
  int64_t tiles = 0, slots = 0, cbase = 0;
  for (int64_t i = 0; i < L; ++i) {
    const Geometry& g = geo[i];
    int64_t* r = t + i * kBnLayerFields;
    const int64_t M = g.N * g.S;
    // Channel-inner walk when channels are contiguous and positions are one progression.
    int64_t rowstride = -1;
    if (g.sC == 1 && g.C > 1) {
      if (g.S == 1) rowstride = g.sN;
      else if (g.N == 1 || g.sN == g.S * g.sS) rowstride = g.sS;
    }
    r[kBnX] = reinterpret_cast<int64_t>(xs[i].data_ptr());
    r[kBnDx] = dxs ? reinterpret_cast<int64_t>((*dxs)[i].data_ptr()) : 0;
    r[kBnDtype] = dtype_code(xs[i].scalar_type());
    r[kBnKind] = rowstride >= 0 ? 1 : 0;
    r[kBnM] = M;
    r[kBnC] = g.C;
    r[kBnS] = g.S;
    r[kBnStrideN] = g.sN;
    r[kBnStrideC] = g.sC;
    r[kBnStrideS] = g.sS;
    r[kBnRowStride] = rowstride;
    r[kBnCBase] = cbase;
    r[kBnPBase] = slots;
    r[kBnTileBegin] = tiles;
    int64_t P;
    if (rowstride >= 0) {
      P = (M + kBnRowsPerTile - 1) / kBnRowsPerTile;
      tiles += P * ((g.C + kBnChanBlock - 1) / kBnChanBlock);
    } else {
      P = (M + kBnElemsPerTile - 1) / kBnElemsPerTile;
      tiles += P * g.C;
    }
    r[kBnP] = P;
    slots += P * g.C;
    cbase += g.C;
  }
  TORCH_CHECK(tiles < (int64_t(1) << 31), "bn_stats (cuda): too many tiles");
  *n_tiles = tiles;
  *n_slots = slots;
  return host.to(xs[0].device(), /*non_blocking=*/true);
}

at::Tensor bn_stats_fwd_cuda(const at::TensorList xs_in) {
  check_inputs(xs_in, "bn_stats_fwd");
  const c10::cuda::CUDAGuard guard(xs_in[0].device());
  std::vector<Geometry> geo;
  std::vector<at::Tensor> xs = prepare(xs_in, &geo);
  int64_t n_tiles = 0, n_slots = 0;
  at::Tensor table = cuda_layer_table(xs, geo, nullptr, &n_tiles, &n_slots);
  const int64_t total_c = total_channels(xs_in);
  auto opts = xs_in[0].options().dtype(at::kFloat);
  at::Tensor part = at::empty({3 * n_slots}, opts);
  at::Tensor out = at::empty({2, total_c}, opts);
  bn_stats_forward(table.data_ptr<int64_t>(), static_cast<int>(xs.size()), n_tiles,
                   part.data_ptr<float>(), n_slots, out.data_ptr<float>(), total_c,
                   c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> bn_stats_bwd_cuda(const at::TensorList xs_in, const at::Tensor& coef) {
  check_inputs(xs_in, "bn_stats_bwd");
  const c10::cuda::CUDAGuard guard(xs_in[0].device());
  std::vector<Geometry> geo;
  std::vector<at::Tensor> xs, dxs;
  const int64_t total_c = prepare_backward(xs_in, coef, &geo, &xs, &dxs);
  int64_t n_tiles = 0, n_slots = 0;
  at::Tensor table = cuda_layer_table(xs, geo, &dxs, &n_tiles, &n_slots);
  at::Tensor c = coef.to(at::kFloat).contiguous();
  bn_stats_backward(table.data_ptr<int64_t>(), static_cast<int>(xs.size()), n_tiles,
                    c.data_ptr<float>(), total_c, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dxs;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(acq_kernels_C, m) {
  m.def("bn_stats_fwd(Tensor[] xs) -> Tensor");
  m.def("bn_stats_bwd(Tensor[] xs, Tensor coef) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(acq_kernels_C, CPU, m) {
  m.impl("bn_stats_fwd", &bn_stats_fwd_cpu);
  m.impl("bn_stats_bwd", &bn_stats_bwd_cpu);
}

#if ACQ_WITH_CUDA
TORCH_LIBRARY_IMPL(acq_kernels_C, CUDA, m) {
  m.impl("bn_stats_fwd", &bn_stats_fwd_cuda);
  m.impl("bn_stats_bwd", &bn_stats_bwd_cuda);
}
#endif
