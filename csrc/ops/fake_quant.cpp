// Tensor-level operators of the fake-quantization family (schemas + CPU/CUDA impls).
// The Python side validates arguments and raises ValueError/TypeError first; the checks here
// guard the kernels' assumptions. Elements are numbered in x's memory order (x is dense), so
// outputs made with empty_like(x) share the numbering and masks are bit-packed in that order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/fake_quant.h"
#include "generated/build_config.h"

#if ACQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/fake_quant.cuh"
#endif

namespace {

using at::Tensor;

constexpr int64_t kQMinLimit = -32768;  // quant ranges fit int16 or uint16
constexpr int64_t kQMaxLimit = 65535;

void check_x(const Tensor& x, const char* name) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              name, " must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(x.is_non_overlapping_and_dense(), name,
              " must be non-overlapping and dense (contiguous in some dimension order)");
}

void check_range(int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK(quant_min < quant_max, "quant_min (", quant_min, ") must be < quant_max (",
              quant_max, ")");
  TORCH_CHECK(quant_min >= kQMinLimit && quant_max <= kQMaxLimit,
              "quant_min/quant_max must lie within int16/uint16 range, got [", quant_min, ", ",
              quant_max, "]");
}

void check_axis(const Tensor& x, int64_t axis) {
  TORCH_CHECK(axis == -1 || (axis >= 0 && axis < x.dim()), "axis must be -1 or in [0, ",
              x.dim(), "), got ", axis);
}

void check_param(const Tensor& x, const Tensor& t, const char* name, int64_t expected) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a 1-D contiguous tensor");
  TORCH_CHECK(t.numel() == expected, name, " must have ", expected, " elements, got ", t.numel());
}

void check_qparams(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                   int64_t axis) {
  check_axis(x, axis);
  const int64_t expected = axis < 0 ? 1 : x.size(axis);
  check_param(x, scale, "scale", expected);
  check_param(x, zero_point, "zero_point", expected);
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "scale must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(zero_point.scalar_type() == at::kInt || zero_point.scalar_type() == at::kFloat,
              "zero_point must be int32 or float32, got ", zero_point.scalar_type());
}

// Argument checks shared by the CPU and CUDA fake-quant forward ops.
void check_fq_args(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                   int64_t quant_min, int64_t quant_max, int64_t axis) {
  check_x(x, "x");
  check_qparams(x, scale, zero_point, axis);
  check_range(quant_min, quant_max);
}

void check_scalar_buffer(const Tensor& x, const Tensor& t, const char* name, at::ScalarType st) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == st, name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1 && t.dim() <= 1, name, " must have shape [] or [1]");
}

// Channel of memory offset o is (o / inner) % channels.
struct Layout {
  int64_t inner;
  int64_t channels;
};

Layout channel_layout(const Tensor& x, int64_t axis) {
  const int64_t n = std::max<int64_t>(x.numel(), 1);
  if (axis < 0 || x.size(axis) <= 1) return {n, axis < 0 ? 1 : std::max<int64_t>(x.size(axis), 1)};
  return {x.stride(axis), x.size(axis)};
}

Tensor new_mask(const Tensor& x, bool save_mask) {
  const int64_t bytes = save_mask ? (x.numel() + 7) / 8 : 0;
  return at::empty({bytes}, x.options().dtype(at::kByte));
}

// Outputs of a min/max fake quant (shared by the CPU and CUDA ops): out like x, the optional
// packed mask, and one float scale / int32 zero point per channel (one per tensor: axis < 0).
std::tuple<Tensor, Tensor, Tensor, Tensor> new_minmax_outputs(const Tensor& x, int64_t axis,
                                                              bool save_mask) {
  const int64_t C = axis < 0 ? 1 : x.size(axis);
  return {at::empty_like(x), new_mask(x, save_mask), at::empty({C}, x.options().dtype(at::kFloat)),
          at::empty({C}, x.options().dtype(at::kInt))};
}

// ---------------------------------------------------------------------------------------- CPU

// Per-channel float arrays of the forward's qparams, resolved as torch does (see FqParams).
struct HostParams {
  std::vector<float> scale, inv, zp;
  acq::cpu::FqParams p;
};

HostParams host_params(const Tensor& scale, const Tensor& zero_point, const Layout& lay,
                       int64_t quant_min, int64_t quant_max, bool per_channel) {
  HostParams h;
  const int64_t C = scale.numel();
  h.scale.resize(C);
  h.inv.resize(C);
  h.zp.resize(C);
  const float* s = scale.const_data_ptr<float>();
  const bool zp_float = zero_point.scalar_type() == at::kFloat;
  for (int64_t c = 0; c < C; ++c) {
    h.scale[c] = s[c];
    h.inv[c] = 1.0f / s[c];
    if (!zp_float) {
      h.zp[c] = static_cast<float>(zero_point.const_data_ptr<int32_t>()[c]);
    } else if (per_channel) {
      h.zp[c] = zero_point.const_data_ptr<float>()[c];
    } else {  // torch's per-tensor float zero point: clamp(nearbyint(zp)) as an integer
      const float z = std::nearbyint(zero_point.const_data_ptr<float>()[c]);
      h.zp[c] = std::min(std::max(z, static_cast<float>(quant_min)), static_cast<float>(quant_max));
    }
  }
  h.p.scale = h.scale.data();
  h.p.inv_scale = h.inv.data();
  h.p.zero_point = h.zp.data();
  h.p.zp_before_round = zp_float && per_channel;
  h.p.out_via_float = !per_channel;
  h.p.quant_min = quant_min;
  h.p.quant_max = quant_max;
  h.p.inner = lay.inner;
  h.p.channels = lay.channels;
  return h;
}

void run_fq_cpu(const Tensor& x, Tensor& out, Tensor& mask, const acq::cpu::FqParams& p) {
  uint8_t* m = mask.numel() > 0 ? mask.mutable_data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fq_forward", [&] {
    acq::cpu::fq_forward<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                   m, x.numel(), p);
  });
}

std::tuple<Tensor, Tensor> fq_forward_cpu(const Tensor& x, const Tensor& scale,
                                          const Tensor& zero_point, int64_t quant_min,
                                          int64_t quant_max, int64_t axis, bool save_mask) {
  check_fq_args(x, scale, zero_point, quant_min, quant_max, axis);
  Tensor out = at::empty_like(x);
  Tensor mask = new_mask(x, save_mask);
  if (x.numel() == 0) return {out, mask};
  const HostParams h = host_params(scale, zero_point, channel_layout(x, axis), quant_min,
                                   quant_max, axis >= 0);
  run_fq_cpu(x, out, mask, h.p);
  return {out, mask};
}

// A packed mask of t's elements: on t's device, 1-D contiguous uint8, ceil(numel / 8) bytes.
void check_packed_mask(const Tensor& mask, const Tensor& t, const char* name) {
  TORCH_CHECK(mask.device() == t.device(), "mask must be on ", t.device());
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.is_contiguous(),
              "mask must be a 1-D contiguous uint8 tensor");
  TORCH_CHECK(mask.numel() == (t.numel() + 7) / 8, "mask must have ceil(", name,
              ".numel() / 8) = ", (t.numel() + 7) / 8, " bytes, got ", mask.numel());
}

void check_mask_backward(const Tensor& grad, const Tensor& mask) {
  check_x(grad, "grad");
  check_packed_mask(mask, grad, "grad");
}

Tensor fq_mask_backward_cpu(const Tensor& grad, const Tensor& mask) {
  check_mask_backward(grad, mask);
  Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fq_mask_backward", [&] {
    acq::cpu::fq_mask_backward<scalar_t>(grad.const_data_ptr<scalar_t>(),
                                         mask.const_data_ptr<uint8_t>(),
                                         out.mutable_data_ptr<scalar_t>(), grad.numel());
  });
  return out;
}

// The packed STE mask as one bool per element, laid out like `like` (the forward's output):
// what traced graphs keep, see ops.byte_mask.
Tensor fq_unpack_mask_cpu(const Tensor& mask, const Tensor& like) {
  TORCH_CHECK(like.is_non_overlapping_and_dense(), "like must be non-overlapping and dense");
  check_packed_mask(mask, like, "like");
  Tensor out = at::empty_like(like, like.options().dtype(at::kBool));
  acq::cpu::unpack_mask(mask.const_data_ptr<uint8_t>(), out.mutable_data_ptr<bool>(),
                        like.numel());
  return out;
}

// Checks the learnable backward's arguments; returns grad laid out like x (autograd may hand
// over e.g. an expanded gradient; the kernels walk grad and x in the same memory order).
Tensor check_learnable(const Tensor& grad, const Tensor& x, const Tensor& scale,
                       const Tensor& zero_point, int64_t axis, int64_t quant_min,
                       int64_t quant_max) {
  check_x(x, "x");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad must have x's dtype ",
              x.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), "grad must be on ", x.device());
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ",
              grad.sizes());
  check_qparams(x, scale, zero_point, axis);
  TORCH_CHECK(zero_point.scalar_type() == at::kFloat, "zero_point must be float32 here, got ",
              zero_point.scalar_type());
  check_range(quant_min, quant_max);
  if (grad.strides() == x.strides()) return grad;
  return at::empty_like(x).copy_(grad);
}

// Whether torch's CPU LSQ backward kernels, as dispatched here, use fused multiply-adds: they
// are compiled with FP contraction, which emits FMAs for the AVX2/AVX512 builds on x86 (the
// default build targets no FMA). Elsewhere the compilers' default contraction is assumed
// (aarch64 has FMA in its base ISA; not verified).
bool torch_lsq_uses_fma() {
#if defined(__x86_64__) || defined(_M_X64)
  // What torch.backends.cpu.get_cpu_capability() reports; fixed for the process.
  static const bool fma = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return fma;
#else
  return true;
#endif
}

std::tuple<Tensor, Tensor, Tensor> fq_learnable_backward_cpu(
    const Tensor& grad_in, const Tensor& x, const Tensor& scale, const Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, int64_t axis, double grad_factor) {
  const Tensor grad = check_learnable(grad_in, x, scale, zero_point, axis, quant_min, quant_max);
  Tensor dx = at::empty_like(x);
  Tensor dscale = at::zeros(scale.sizes(), scale.options());
  Tensor dzp = at::zeros(zero_point.sizes(), zero_point.options());
  if (x.numel() == 0) return {dx, dscale, dzp};
  const Layout lay = channel_layout(x, axis);
  HostParams h = host_params(scale, zero_point, lay, quant_min, quant_max, axis >= 0);
  // torch's backward resolves the float zero point differently from the forward:
  // per-tensor int64(clamp(zp + 0.5)), per-channel clamp(round(zp)).
  const float* z = zero_point.const_data_ptr<float>();
  const float lo = static_cast<float>(quant_min), hi = static_cast<float>(quant_max);
  for (int64_t c = 0; c < zero_point.numel(); ++c) {
    h.zp[c] = axis < 0 ? std::trunc(std::min(std::max(z[c] + 0.5f, lo), hi))
                       : std::min(std::max(std::nearbyint(z[c]), lo), hi);
  }
  const bool fma = torch_lsq_uses_fma();
  if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) {
    // torch's dtypes: per-element gradients reduced by the same sum torch's backward calls
    // (so dscale/dzero_point are bitwise torch's, not just close)
    Tensor ds_el = at::empty_like(x);
    Tensor dz_el = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fq_learnable_backward", [&] {
      acq::cpu::fq_learnable_backward_elementwise<scalar_t>(
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          dx.mutable_data_ptr<scalar_t>(), ds_el.mutable_data_ptr<scalar_t>(),
          dz_el.mutable_data_ptr<scalar_t>(), x.numel(), h.p, static_cast<float>(grad_factor),
          fma);
    });
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x.dim(); ++d) {
      if (d != axis) dims.push_back(d);
    }
    Tensor ds = axis < 0 ? ds_el.sum() : (dims.empty() ? ds_el : ds_el.sum(dims));
    Tensor dz = axis < 0 ? dz_el.sum() : (dims.empty() ? dz_el : dz_el.sum(dims));
    dscale.copy_(ds.reshape(scale.sizes()));
    dzp.copy_(dz.reshape(zero_point.sizes()));
    return {dx, dscale, dzp};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fq_learnable_backward", [&] {
    acq::cpu::fq_learnable_backward<scalar_t>(
        grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(), dscale.mutable_data_ptr<float>(),
        dzp.mutable_data_ptr<float>(), x.numel(), h.p, static_cast<float>(grad_factor), fma);
  });
  return {dx, dscale, dzp};
}

void check_observer(const Tensor& x, int64_t quant_min, int64_t quant_max, double eps) {
  check_x(x, "x");
  check_range(quant_min, quant_max);
  TORCH_CHECK(eps > 0.0, "eps must be positive, got ", eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fq_minmax_forward_cpu(const Tensor& x, int64_t axis,
                                                                 int64_t quant_min,
                                                                 int64_t quant_max,
                                                                 bool symmetric, double eps,
                                                                 bool save_mask) {
  check_observer(x, quant_min, quant_max, eps);
  check_axis(x, axis);
  auto [out, mask, scale, zp] = new_minmax_outputs(x, axis, save_mask);
  const int64_t C = scale.numel();
  const Layout lay = channel_layout(x, axis);
  std::vector<float> mn(C, std::numeric_limits<float>::infinity());
  std::vector<float> mx(C, -std::numeric_limits<float>::infinity());
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fq_minmax", [&] {
      acq::cpu::minmax<scalar_t>(x.const_data_ptr<scalar_t>(), x.numel(), lay.inner,
                                 lay.channels, mn.data(), mx.data());
    });
  }
  float* s = scale.mutable_data_ptr<float>();
  int32_t* z = zp.mutable_data_ptr<int32_t>();
  for (int64_t c = 0; c < C; ++c) {
    acq::cpu::calculate_qparams(mn[c], mx[c], quant_min, quant_max, symmetric,
                                static_cast<float>(eps), s + c, z + c);
  }
  if (x.numel() > 0) {
    const HostParams h = host_params(scale, zp, lay, quant_min, quant_max, axis >= 0);
    run_fq_cpu(x, out, mask, h.p);
  }
  return {out, mask, scale, zp};
}

// Argument checks shared by the CPU and CUDA moving-average ops.
void check_moving_average_args(const Tensor& x, const Tensor& min_val, const Tensor& max_val,
                               const Tensor& scale, const Tensor& zero_point, int64_t quant_min,
                               int64_t quant_max, double eps) {
  check_observer(x, quant_min, quant_max, eps);
  check_scalar_buffer(x, min_val, "min_val", at::kFloat);
  check_scalar_buffer(x, max_val, "max_val", at::kFloat);
  check_scalar_buffer(x, scale, "scale", at::kFloat);
  check_scalar_buffer(x, zero_point, "zero_point", at::kInt);
}

std::tuple<Tensor, Tensor> fq_moving_average_forward_cpu(
    const Tensor& x, Tensor& min_val, Tensor& max_val, Tensor& scale, Tensor& zero_point,
    double averaging_constant, int64_t quant_min, int64_t quant_max, bool symmetric, double eps,
    bool observe, bool save_mask) {
  check_moving_average_args(x, min_val, max_val, scale, zero_point, quant_min, quant_max, eps);
  Tensor out = at::empty_like(x);
  Tensor mask = new_mask(x, save_mask);
  if (x.numel() == 0) return {out, mask};  // nothing to observe or quantize
  if (observe) {
    float bmin = 0.0f, bmax = 0.0f;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fq_moving_average", [&] {
      acq::cpu::minmax<scalar_t>(x.const_data_ptr<scalar_t>(), x.numel(), x.numel(), 1, &bmin,
                                 &bmax);
    });
    float* pmin = min_val.mutable_data_ptr<float>();
    float* pmax = max_val.mutable_data_ptr<float>();
    constexpr float kInf = std::numeric_limits<float>::infinity();
    if (*pmin == kInf && *pmax == -kInf) {  // first observation copies the batch range
      *pmin = bmin;
      *pmax = bmax;
    } else {
      // min_val + c * (batch_min - min_val), each step rounded to fp32 like torch's tensor ops
      const float c = static_cast<float>(averaging_constant);
      const volatile float dmin = c * (bmin - *pmin);  // volatile: no FMA contraction
      const volatile float dmax = c * (bmax - *pmax);
      *pmin = *pmin + dmin;
      *pmax = *pmax + dmax;
    }
    acq::cpu::calculate_qparams(*pmin, *pmax, quant_min, quant_max, symmetric,
                                static_cast<float>(eps), scale.mutable_data_ptr<float>(),
                                zero_point.mutable_data_ptr<int32_t>());
  }
  const Tensor s1 = scale.reshape({1});
  const Tensor z1 = zero_point.reshape({1});
  const HostParams h = host_params(s1, z1, channel_layout(x, -1), quant_min, quant_max, false);
  run_fq_cpu(x, out, mask, h.p);
  return {out, mask};
}

void check_state_buffer(const Tensor& x, const Tensor& t, const char* name, at::ScalarType st,
                        int64_t expected) {
  check_param(x, t, name, expected);
  TORCH_CHECK(t.scalar_type() == st, name, " must be ", st, ", got ", t.scalar_type());
}

// Argument checks shared by the CPU and CUDA fq_observe_forward; returns the channel count.
int64_t check_observe_args(const Tensor& x, const Tensor& min_val, const Tensor& max_val,
                           const Tensor& scale, const Tensor& zero_point, int64_t axis,
                           int64_t quant_min, int64_t quant_max, double eps) {
  check_observer(x, quant_min, quant_max, eps);
  check_axis(x, axis);
  const int64_t C = axis < 0 ? 1 : x.size(axis);
  check_state_buffer(x, min_val, "min_val", at::kFloat, C);
  check_state_buffer(x, max_val, "max_val", at::kFloat, C);
  check_state_buffer(x, scale, "scale", at::kFloat, C);
  check_state_buffer(x, zero_point, "zero_point", at::kInt, C);
  return C;
}

// Any min/max observer step (per tensor or per channel) + qparams + fake quant; state in place.
std::tuple<Tensor, Tensor> fq_observe_forward_cpu(
    const Tensor& x, Tensor& min_val, Tensor& max_val, Tensor& scale, Tensor& zero_point,
    int64_t axis, double averaging_constant, bool moving_average, int64_t quant_min,
    int64_t quant_max, bool symmetric, int64_t symmetric_zero_point, double eps, bool quantize,
    bool save_mask) {
  const int64_t C = check_observe_args(x, min_val, max_val, scale, zero_point, axis, quant_min,
                                       quant_max, eps);
  Tensor out = quantize ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mask = new_mask(x, quantize && save_mask);
  if (x.numel() == 0) return {out, mask};  // nothing to observe or quantize
  const Layout lay = channel_layout(x, axis);
  std::vector<float> mn(C), mx(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fq_observe", [&] {
    acq::cpu::minmax<scalar_t>(x.const_data_ptr<scalar_t>(), x.numel(), lay.inner, lay.channels,
                               mn.data(), mx.data());
  });
  float* pmin = min_val.mutable_data_ptr<float>();
  float* pmax = max_val.mutable_data_ptr<float>();
  acq::cpu::observe_update(mn.data(), mx.data(), pmin, pmax, C,
                           static_cast<float>(averaging_constant), moving_average);
  float* s = scale.mutable_data_ptr<float>();
  int32_t* z = zero_point.mutable_data_ptr<int32_t>();
  for (int64_t c = 0; c < C; ++c) {
    acq::cpu::calculate_qparams(pmin[c], pmax[c], quant_min, quant_max, symmetric,
                                symmetric_zero_point, static_cast<float>(eps), s + c, z + c);
  }
  if (quantize) {
    const HostParams h = host_params(scale, zero_point, lay, quant_min, quant_max, axis >= 0);
    run_fq_cpu(x, out, mask, h.p);
  }
  return {out, mask};
}

// --------------------------------------------------------------------------------------- CUDA
#if ACQ_WITH_CUDA

acq::cuda::DType cuda_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return acq::cuda::DType::kFloat32;
    case at::kDouble: return acq::cuda::DType::kFloat64;
    case at::kHalf: return acq::cuda::DType::kFloat16;
    case at::kBFloat16: return acq::cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", x.scalar_type());
  }
}

acq::cuda::FqLayout cuda_layout(const Tensor& x, int64_t axis) {
  const Layout lay = channel_layout(x, axis);
  acq::cuda::FqLayout l;
  l.n = x.numel();
  l.inner = lay.inner;
  l.channels = lay.channels;
  l.per_channel = axis >= 0;
  return l;
}

uint8_t* mask_ptr(Tensor& mask) {
  return mask.numel() > 0 ? mask.mutable_data_ptr<uint8_t>() : nullptr;
}

std::tuple<Tensor, Tensor> fq_forward_cuda(const Tensor& x, const Tensor& scale,
                                           const Tensor& zero_point, int64_t quant_min,
                                           int64_t quant_max, int64_t axis, bool save_mask) {
  check_fq_args(x, scale, zero_point, quant_min, quant_max, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty_like(x);
  Tensor mask = new_mask(x, save_mask);
  if (x.numel() == 0) return {out, mask};
  acq::cuda::fq_forward(cuda_dtype(x), x.const_data_ptr(), out.mutable_data_ptr(),
                        mask_ptr(mask), cuda_layout(x, axis), scale.const_data_ptr<float>(),
                        zero_point.const_data_ptr(), zero_point.scalar_type() == at::kFloat,
                        static_cast<int>(quant_min), static_cast<int>(quant_max),
                        c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mask};
}

Tensor fq_mask_backward_cuda(const Tensor& grad, const Tensor& mask) {
  check_mask_backward(grad, mask);
  const c10::cuda::CUDAGuard guard(grad.device());
  Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) return out;
  acq::cuda::fq_mask_backward(cuda_dtype(grad), grad.const_data_ptr(),
                              mask.const_data_ptr<uint8_t>(), out.mutable_data_ptr(),
                              grad.numel(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<Tensor, Tensor, Tensor> fq_learnable_backward_cuda(
    const Tensor& grad_in, const Tensor& x, const Tensor& scale, const Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, int64_t axis, double grad_factor) {
  const Tensor grad = check_learnable(grad_in, x, scale, zero_point, axis, quant_min, quant_max);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = at::empty_like(x);
  if (x.numel() == 0) {
    return {dx, at::zeros(scale.sizes(), scale.options()),
            at::zeros(zero_point.sizes(), zero_point.options())};
  }
  Tensor dscale = at::empty(scale.sizes(), scale.options());
  Tensor dzp = at::empty(zero_point.sizes(), zero_point.options());
  const acq::cuda::FqLayout l = cuda_layout(x, axis);
  Tensor ws = at::empty({static_cast<int64_t>(acq::cuda::lsq_workspace_floats(l))},
                        x.options().dtype(at::kFloat));
  acq::cuda::fq_learnable_backward(cuda_dtype(x), grad.const_data_ptr(), x.const_data_ptr(),
                                   dx.mutable_data_ptr(), dscale.mutable_data_ptr<float>(),
                                   dzp.mutable_data_ptr<float>(), scale.const_data_ptr<float>(),
                                   zero_point.const_data_ptr<float>(), l,
                                   static_cast<int>(quant_min), static_cast<int>(quant_max),
                                   static_cast<float>(grad_factor), ws.mutable_data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dscale, dzp};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fq_minmax_forward_cuda(const Tensor& x, int64_t axis,
                                                                  int64_t quant_min,
                                                                  int64_t quant_max,
                                                                  bool symmetric, double eps,
                                                                  bool save_mask) {
  check_observer(x, quant_min, quant_max, eps);
  check_axis(x, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [out, mask, scale, zp] = new_minmax_outputs(x, axis, save_mask);
  if (x.numel() == 0) {  // nothing observed: torch's default qparams
    scale.fill_(1.0);
    zp.zero_();
    return {out, mask, scale, zp};
  }
  const acq::cuda::FqLayout l = cuda_layout(x, axis);
  Tensor ws = at::empty({static_cast<int64_t>(acq::cuda::minmax_workspace_floats(l))},
                        x.options().dtype(at::kFloat));
  acq::cuda::fq_minmax_forward(cuda_dtype(x), x.const_data_ptr(), out.mutable_data_ptr(),
                               mask_ptr(mask), l, static_cast<int>(quant_min),
                               static_cast<int>(quant_max), symmetric, static_cast<float>(eps),
                               scale.mutable_data_ptr<float>(), zp.mutable_data_ptr<int32_t>(),
                               ws.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mask, scale, zp};
}

std::tuple<Tensor, Tensor> fq_moving_average_forward_cuda(
    const Tensor& x, Tensor& min_val, Tensor& max_val, Tensor& scale, Tensor& zero_point,
    double averaging_constant, int64_t quant_min, int64_t quant_max, bool symmetric, double eps,
    bool observe, bool save_mask) {
  check_moving_average_args(x, min_val, max_val, scale, zero_point, quant_min, quant_max, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty_like(x);
  Tensor mask = new_mask(x, save_mask);
  if (x.numel() == 0) return {out, mask};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (observe) {
    const acq::cuda::FqLayout l = cuda_layout(x, -1);
    Tensor ws = at::empty({static_cast<int64_t>(acq::cuda::minmax_workspace_floats(l))},
                          x.options().dtype(at::kFloat));
    acq::cuda::fq_moving_average_forward(
        cuda_dtype(x), x.const_data_ptr(), out.mutable_data_ptr(), mask_ptr(mask), x.numel(),
        min_val.mutable_data_ptr<float>(), max_val.mutable_data_ptr<float>(),
        scale.mutable_data_ptr<float>(), zero_point.mutable_data_ptr<int32_t>(),
        static_cast<float>(averaging_constant), static_cast<int>(quant_min),
        static_cast<int>(quant_max), symmetric, static_cast<float>(eps),
        ws.mutable_data_ptr<float>(), stream);
  } else {
    acq::cuda::fq_forward(cuda_dtype(x), x.const_data_ptr(), out.mutable_data_ptr(),
                          mask_ptr(mask), cuda_layout(x, -1), scale.const_data_ptr<float>(),
                          zero_point.const_data_ptr(), false, static_cast<int>(quant_min),
                          static_cast<int>(quant_max), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mask};
}

// One kernel launch: observer step, qparams and fake quant (csrc/cuda/fake_quant_observe.cu).
std::tuple<Tensor, Tensor> fq_observe_forward_cuda(
    const Tensor& x, Tensor& min_val, Tensor& max_val, Tensor& scale, Tensor& zero_point,
    int64_t axis, double averaging_constant, bool moving_average, int64_t quant_min,
    int64_t quant_max, bool symmetric, int64_t symmetric_zero_point, double eps, bool quantize,
    bool save_mask) {
  const int64_t C = check_observe_args(x, min_val, max_val, scale, zero_point, axis, quant_min,
                                       quant_max, eps);
  // The kernel's task indices are 32-bit (a tensor dim this large is not a channel axis).
  TORCH_CHECK(C < (int64_t{1} << 31), "x.size(axis) must be < 2^31, got ", C);
  TORCH_CHECK(symmetric_zero_point >= std::numeric_limits<int32_t>::min() &&
                  symmetric_zero_point <= std::numeric_limits<int32_t>::max(),
              "symmetric_zero_point must fit int32, got ", symmetric_zero_point);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = quantize ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor mask = new_mask(x, quantize && save_mask);
  if (x.numel() == 0) return {out, mask};  // nothing to observe or quantize
  const acq::cuda::DType dt = cuda_dtype(x);
  const acq::cuda::FqLayout l = cuda_layout(x, axis);
  void* out_ptr = quantize ? out.mutable_data_ptr() : nullptr;
  // Partials from the caching allocator (stream-ordered, capturable); fully written by the
  // kernel before it reads them, so left uninitialised.
  Tensor ws = at::empty(
      {static_cast<int64_t>(acq::cuda::observe_workspace_floats(dt, l, x.const_data_ptr(), out_ptr))},
      x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(acq::cuda::fq_observe_forward(
      dt, x.const_data_ptr(), out_ptr, mask_ptr(mask), l, min_val.mutable_data_ptr<float>(),
      max_val.mutable_data_ptr<float>(), scale.mutable_data_ptr<float>(),
      zero_point.mutable_data_ptr<int32_t>(), moving_average,
      static_cast<float>(averaging_constant), static_cast<int>(quant_min),
      static_cast<int>(quant_max), symmetric, static_cast<int>(symmetric_zero_point),
      static_cast<float>(eps), ws.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {out, mask};
}

#endif  // ACQ_WITH_CUDA

}  // namespace

TORCH_LIBRARY_FRAGMENT(acq_kernels_C, m) {
  m.def("fq_forward(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
        "int axis, bool save_mask) -> (Tensor out, Tensor mask)");
  m.def("fq_mask_backward(Tensor grad, Tensor mask) -> Tensor");
  m.def("fq_unpack_mask(Tensor mask, Tensor like) -> Tensor");
  m.def("fq_learnable_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
        "int quant_min, int quant_max, int axis, float grad_factor) "
        "-> (Tensor dx, Tensor dscale, Tensor dzero_point)");
  m.def("fq_minmax_forward(Tensor x, int axis, int quant_min, int quant_max, bool symmetric, "
        "float eps, bool save_mask) -> (Tensor out, Tensor mask, Tensor scale, "
        "Tensor zero_point)");
  m.def("fq_moving_average_forward(Tensor x, Tensor(a!) min_val, Tensor(b!) max_val, "
        "Tensor(c!) scale, Tensor(d!) zero_point, float averaging_constant, int quant_min, "
        "int quant_max, bool symmetric, float eps, bool observe, bool save_mask) "
        "-> (Tensor out, Tensor mask)");
  // CPU: observer, qparams and fake quant in one call; CUDA: in one kernel launch.
  m.def("fq_observe_forward(Tensor x, Tensor(a!) min_val, Tensor(b!) max_val, Tensor(c!) scale, "
        "Tensor(d!) zero_point, int axis, float averaging_constant, bool moving_average, "
        "int quant_min, int quant_max, bool symmetric, int symmetric_zero_point, float eps, "
        "bool quantize, bool save_mask) -> (Tensor out, Tensor mask)");
}

TORCH_LIBRARY_IMPL(acq_kernels_C, CPU, m) {
  m.impl("fq_forward", &fq_forward_cpu);
  m.impl("fq_mask_backward", &fq_mask_backward_cpu);
  m.impl("fq_unpack_mask", &fq_unpack_mask_cpu);
  m.impl("fq_learnable_backward", &fq_learnable_backward_cpu);
  m.impl("fq_minmax_forward", &fq_minmax_forward_cpu);
  m.impl("fq_moving_average_forward", &fq_moving_average_forward_cpu);
  m.impl("fq_observe_forward", &fq_observe_forward_cpu);
}

#if ACQ_WITH_CUDA
TORCH_LIBRARY_IMPL(acq_kernels_C, CUDA, m) {
  m.impl("fq_forward", &fq_forward_cuda);
  m.impl("fq_mask_backward", &fq_mask_backward_cuda);
  m.impl("fq_learnable_backward", &fq_learnable_backward_cuda);
  m.impl("fq_minmax_forward", &fq_minmax_forward_cuda);
  m.impl("fq_moving_average_forward", &fq_moving_average_forward_cuda);
  m.impl("fq_observe_forward", &fq_observe_forward_cuda);
}
#endif
