// Tensor-level operators of the spatial-attention family (CPU and CUDA implementations).
//   attention_map_fwd(feat, p)
//     -> (amap [N,H,W], anorm [N,HW], center [N,2], a32 [N,HW], stats [N,4])
//   attention_feat_bwd(feat, grad_map [N,HW], p) -> dfeat
//   attention_map_bwd(feat, a32, stats, grad_amap?, grad_anorm?, grad_center?, p) -> dfeat
//     (dL/dA assembled from the output grads in one small pass, then the dfeat pass)
// Addressing rules mirror acq_kernels/attention/layout.py exactly, so that the Python side's
// fake (meta) outputs have the same strides as these.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "cpu/attention.h"
#include "generated/build_config.h"

#if ACQ_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/attention.cuh"
#endif

namespace {

using acq::cpu::AttnLayout;
using acq::cpu::AttnShape;

// ps with offset(h, w) = (h*W + w) * ps for all pixels, if any.
std::optional<int64_t> pixel_stride(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  if (H * W == 1) return 0;
  if (W == 1) return t.stride(2);
  if (H == 1) return t.stride(3);
  if (t.stride(2) == W * t.stride(3)) return t.stride(3);
  return std::nullopt;
}

std::optional<AttnLayout> feature_layout(const at::Tensor& t) {
  const int64_t C = t.size(1), HW = t.size(2) * t.size(3);
  const auto ps = pixel_stride(t);
  if (!ps) return std::nullopt;
  const int64_t sn = t.stride(0), sc = t.stride(1);
  if (sc == 1 && C > 1) return AttnLayout{true, sn, 1, *ps};
  if (*ps == 1 || HW == 1) return AttnLayout{false, sn, sc, 1};
  if (C == 1) return AttnLayout{true, sn, 1, *ps};
  return std::nullopt;
}

// The tensor the kernels read (feat, or a contiguous copy) and its layout.
std::pair<at::Tensor, AttnLayout> input_layout(const at::Tensor& feat) {
  if (auto lay = feature_layout(feat)) return {feat, *lay};
  at::Tensor c = feat.contiguous();
  return {c, *feature_layout(c)};
}

// dF: channels_last when F is read channels-contiguous, else contiguous NCHW.
std::pair<at::Tensor, AttnLayout> empty_grad(const at::Tensor& feat) {
  const int64_t C = feat.size(1), HW = feat.size(2) * feat.size(3);
  const auto lay = feature_layout(feat);
  if (lay && lay->channels_last) {
    return {at::empty(feat.sizes(), feat.options().memory_format(at::MemoryFormat::ChannelsLast)),
            AttnLayout{true, C * HW, 1, C}};
  }
  return {at::empty(feat.sizes(), feat.options().memory_format(at::MemoryFormat::Contiguous)),
          AttnLayout{false, C * HW, HW, 1}};
}

void check_feat(const at::Tensor& feat, double p) {
  TORCH_CHECK_VALUE(feat.dim() == 4, "feat must be [N, C, H, W], got rank ", feat.dim());
  TORCH_CHECK_VALUE(feat.size(1) > 0 && feat.size(2) > 0 && feat.size(3) > 0,
                    "feat needs C, H, W >= 1");
  TORCH_CHECK_TYPE(at::isFloatingType(feat.scalar_type()), "feat must be a float tensor");
  TORCH_CHECK_VALUE(p > 0, "p must be > 0, got ", p);
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

using MapOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

MapOut alloc_map_outputs(const at::Tensor& x) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  auto opt = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto acc = opt.dtype(acc_type(x.scalar_type()));
  return {at::empty({N, H, W}, opt), at::empty({N, H * W}, opt), at::empty({N, 2}, opt),
          at::empty({N, H * W}, acc), at::empty({N, 4}, acc)};
}

MapOut map_fwd_cpu(const at::Tensor& feat, double p) {
  check_feat(feat, p);
  auto [x, lay] = input_layout(feat);
  MapOut out = alloc_map_outputs(x);
  auto& [amap, anorm, center, a32, stats] = out;
  const AttnShape sh{x.size(0), x.size(1), x.size(2), x.size(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_map_fwd",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    acq::cpu::attention_map_fwd<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), sh, lay, p, a32.mutable_data_ptr<acc_t>(),
        amap.mutable_data_ptr<scalar_t>(), anorm.mutable_data_ptr<scalar_t>(),
        center.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>());
  });
  return out;
}

void check_grad_map(const at::Tensor& feat, const at::Tensor& grad_map) {
  const int64_t N = feat.size(0), HW = feat.size(2) * feat.size(3);
  TORCH_CHECK_VALUE(grad_map.dim() == 2 && grad_map.size(0) == N && grad_map.size(1) == HW,
                    "grad_map must be [N, H*W] = [", N, ", ", HW, "], got ", grad_map.sizes());
  TORCH_CHECK_VALUE(grad_map.device() == feat.device(), "grad_map must be on feat's device");
}

at::Tensor feat_bwd_cpu(const at::Tensor& feat, const at::Tensor& grad_map, double p) {
  check_feat(feat, p);
  check_grad_map(feat, grad_map);
  auto [x, lay] = input_layout(feat);
  auto [df, out_lay] = empty_grad(feat);
  const AttnShape sh{x.size(0), x.size(1), x.size(2), x.size(3)};
  if (df.numel() == 0) return df;
  const at::Tensor dA = grad_map.to(acc_type(x.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_feat_bwd",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    acq::cpu::attention_feat_bwd<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(),
                                                  dA.const_data_ptr<acc_t>(),
                                                  df.mutable_data_ptr<scalar_t>(), sh, lay,
                                                  out_lay, p);
  });
  return df;
}

// Optional output grad as a contiguous [rows, cols] tensor of the accumulation dtype.
at::Tensor grad_arg(const std::optional<at::Tensor>& g, int64_t rows, int64_t cols,
                    at::ScalarType acc, const char* name) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(g->numel() == rows * cols, name, " must have ", rows * cols,
                    " elements, got ", g->sizes());
  return g->reshape({rows, cols}).to(acc).contiguous();
}

template <typename Acc>
const Acc* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<Acc>() : nullptr;
}

// dL/dA [N, HW] in the accumulation dtype, on the CPU.
at::Tensor map_grad_cpu(const at::Tensor& feat, const at::Tensor& a32, const at::Tensor& stats,
                        const std::optional<at::Tensor>& grad_amap,
                        const std::optional<at::Tensor>& grad_anorm,
                        const std::optional<at::Tensor>& grad_center) {
  const int64_t N = feat.size(0), HW = feat.size(2) * feat.size(3);
  const auto acc = acc_type(feat.scalar_type());
  TORCH_CHECK_VALUE(a32.numel() == N * HW && stats.numel() == N * 4,
                    "a32/stats do not match feat");
  const at::Tensor a = a32.to(acc).contiguous(), st = stats.to(acc).contiguous();
  const at::Tensor ga = grad_arg(grad_amap, N, HW, acc, "grad_amap");
  const at::Tensor gn = grad_arg(grad_anorm, N, HW, acc, "grad_anorm");
  const at::Tensor gc = grad_arg(grad_center, N, 2, acc, "grad_center");
  at::Tensor dA = at::empty({N, HW}, a.options());
  const AttnShape sh{N, feat.size(1), feat.size(2), feat.size(3)};
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_map_grad", [&] {
    acq::cpu::attention_map_grad<scalar_t>(a.const_data_ptr<scalar_t>(),
                                           st.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(ga),
                                           ptr_or_null<scalar_t>(gn), ptr_or_null<scalar_t>(gc), sh,
                                           dA.mutable_data_ptr<scalar_t>());
  });
  return dA;
}

at::Tensor map_bwd_cpu(const at::Tensor& feat, const at::Tensor& a32, const at::Tensor& stats,
                       const std::optional<at::Tensor>& grad_amap,
                       const std::optional<at::Tensor>& grad_anorm,
                       const std::optional<at::Tensor>& grad_center, double p) {
  check_feat(feat, p);
  return feat_bwd_cpu(feat, map_grad_cpu(feat, a32, stats, grad_amap, grad_anorm, grad_center),
                      p);
}

#if ACQ_WITH_CUDA
acq::cuda::AttnDtype cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return acq::cuda::AttnDtype::kFloat32;
    case at::kHalf: return acq::cuda::AttnDtype::kFloat16;
    case at::kBFloat16: return acq::cuda::AttnDtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "feat: the CUDA kernels take float32/float16/bfloat16, got ",
                              t.scalar_type());
  }
  return acq::cuda::AttnDtype::kFloat32;
}

acq::cuda::AttnGeom cuda_geom(const at::Tensor& x, const AttnLayout& lay) {
  TORCH_CHECK_VALUE(x.size(1) < (int64_t{1} << 31) && x.size(2) * x.size(3) < (int64_t{1} << 31),
                    "feat: C and H*W must fit in int32");
  return acq::cuda::AttnGeom{x.size(0), x.size(1), x.size(2), x.size(3), lay.channels_last,
                             lay.stride_n, lay.stride_c, lay.stride_s};
}

MapOut map_fwd_cuda(const at::Tensor& feat, double p) {
  check_feat(feat, p);
  const auto dt = cuda_dtype(feat);
  const c10::cuda::CUDAGuard guard(feat.device());
  auto [x, lay] = input_layout(feat);
  MapOut out = alloc_map_outputs(x);
  auto& [amap, anorm, center, a32, stats] = out;
  C10_CUDA_CHECK(acq::cuda::attention_map_fwd(
      x.const_data_ptr(), dt, cuda_geom(x, lay), static_cast<float>(p),
      a32.mutable_data_ptr<float>(), amap.mutable_data_ptr(), anorm.mutable_data_ptr(),
      center.mutable_data_ptr(), stats.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream(feat.device().index()).stream()));
  return out;
}

at::Tensor feat_bwd_cuda(const at::Tensor& feat, const at::Tensor& grad_map, double p) {
  check_feat(feat, p);
  check_grad_map(feat, grad_map);
  const auto dt = cuda_dtype(feat);
  const c10::cuda::CUDAGuard guard(feat.device());
  auto [x, lay] = input_layout(feat);
  auto [df, out_lay] = empty_grad(feat);
  if (df.numel() == 0) return df;
  const at::Tensor dA = grad_map.to(at::kFloat).contiguous();
  C10_CUDA_CHECK(acq::cuda::attention_feat_bwd(
      x.const_data_ptr(), dt, dA.const_data_ptr<float>(), df.mutable_data_ptr(),
      cuda_geom(x, lay), out_lay.stride_n, out_lay.stride_c, out_lay.stride_s,
      static_cast<float>(p), c10::cuda::getCurrentCUDAStream(feat.device().index()).stream()));
  return df;
}

at::Tensor map_bwd_cuda(const at::Tensor& feat, const at::Tensor& a32, const at::Tensor& stats,
                        const std::optional<at::Tensor>& grad_amap,
                        const std::optional<at::Tensor>& grad_anorm,
                        const std::optional<at::Tensor>& grad_center, double p) {
  check_feat(feat, p);
  const c10::cuda::CUDAGuard guard(feat.device());
  const int64_t N = feat.size(0), HW = feat.size(2) * feat.size(3);
  TORCH_CHECK_VALUE(a32.numel() == N * HW && stats.numel() == N * 4,
                    "a32/stats do not match feat");
  const at::Tensor a = a32.to(at::kFloat).contiguous(), st = stats.to(at::kFloat).contiguous();
  const at::Tensor ga = grad_arg(grad_amap, N, HW, at::kFloat, "grad_amap");
  const at::Tensor gn = grad_arg(grad_anorm, N, HW, at::kFloat, "grad_anorm");
  const at::Tensor gc = grad_arg(grad_center, N, 2, at::kFloat, "grad_center");
  at::Tensor dA = at::empty({N, HW}, a.options());
  C10_CUDA_CHECK(acq::cuda::attention_map_grad(
      a.const_data_ptr<float>(), st.const_data_ptr<float>(), ptr_or_null<float>(ga),
      ptr_or_null<float>(gn), ptr_or_null<float>(gc), N, feat.size(2), feat.size(3),
      dA.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream(feat.device().index()).stream()));
  return feat_bwd_cuda(feat, dA, p);
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(acq_kernels_C, m) {
  m.def("attention_map_fwd(Tensor feat, float p) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_feat_bwd(Tensor feat, Tensor grad_map, float p) -> Tensor");
  m.def("attention_map_bwd(Tensor feat, Tensor a32, Tensor stats, Tensor? grad_amap, "
        "Tensor? grad_anorm, Tensor? grad_center, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(acq_kernels_C, CPU, m) {
  m.impl("attention_map_fwd", &map_fwd_cpu);
  m.impl("attention_feat_bwd", &feat_bwd_cpu);
  m.impl("attention_map_bwd", &map_bwd_cpu);
}

#if ACQ_WITH_CUDA
TORCH_LIBRARY_IMPL(acq_kernels_C, CUDA, m) {
  m.impl("attention_map_fwd", &map_fwd_cuda);
  m.impl("attention_feat_bwd", &feat_bwd_cuda);
  m.impl("attention_map_bwd", &map_bwd_cuda);
}
#endif
