// CUDA launchers of the fake-quantization family: raw pointers, sizes and a stream; no torch
// headers here (csrc/ops/fake_quant.cpp owns checks, allocation and error reporting).
//
// Elements are numbered in memory order; the channel of memory offset o is
// (o / inner) % channels (per-tensor: channels == 1, inner == n). Masks are bit-packed,
// LSB first; every launcher writes all ceil(n / 8) bytes. All math matches the CPU kernels
// bit for bit (explicit round-to-nearest intrinsics keep nvcc from contracting into FMAs).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace acq::cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct FqLayout {
  int64_t n = 0;
  int64_t inner = 1;     // memory stride of the channel axis, in elements
  int64_t channels = 1;  // 1 for per-tensor
  bool per_channel = false;  // axis >= 0 (torch treats zero points differently per mode)
};

// Fake quant with qparams read on the device. zero_point is int32 (q = rne(x/s) + zp) or
// float32: per-channel q = rne(x/s + zp); per-tensor clamp(rne(zp)) is used as an int zp.
void fq_forward(DType dt, const void* x, void* out, uint8_t* mask, const FqLayout& l,
                const float* scale, const void* zero_point, bool zp_is_float, int quant_min,
                int quant_max, cudaStream_t stream);

// out = grad * bit(mask)
void fq_mask_backward(DType dt, const void* grad, const uint8_t* mask, void* out, int64_t n,
                      cudaStream_t stream);

// Floats of workspace fq_learnable_backward needs.
size_t lsq_workspace_floats(const FqLayout& l);

// Backward of torch's learnable fake quant; zero_point is float32 (rounded/clamped inside as
// torch does: per-tensor trunc(clamp(zp + 0.5)), per-channel clamp(rne(zp))). Deterministic:
// fixed per-block partial sums, then one finishing launch.
void fq_learnable_backward(DType dt, const void* grad, const void* x, void* dx, float* dscale,
                           float* dzero_point, const float* scale, const float* zero_point,
                           const FqLayout& l, int quant_min, int quant_max, float grad_factor,
                           float* workspace, cudaStream_t stream);

// Floats of workspace fq_minmax_forward / fq_moving_average_forward need.
size_t minmax_workspace_floats(const FqLayout& l);

// Observer (min/max -> qparams as torch's _calculate_qparams), then the fake quant with them.
// scale [channels] float32, zero_point [channels] int32 are written on the device.
void fq_minmax_forward(DType dt, const void* x, void* out, uint8_t* mask, const FqLayout& l,
                       int quant_min, int quant_max, bool symmetric, float eps, float* scale,
                       int32_t* zero_point, float* workspace, cudaStream_t stream);

// Per-tensor moving-average observer update (in place on min_val/max_val/scale/zero_point)
// with the fake quant: partial min/max, one finishing block (buffers and qparams), fake quant;
// no host sync.
void fq_moving_average_forward(DType dt, const void* x, void* out, uint8_t* mask, int64_t n,
                               float* min_val, float* max_val, float* scale,
                               int32_t* zero_point, float averaging_constant, int quant_min,
                               int quant_max, bool symmetric, float eps, float* workspace,
                               cudaStream_t stream);

// fq_observe_forward (fake_quant_observe.cu): any min/max observer step (per tensor, or per
// channel when l.per_channel), the qparams and, when out != nullptr, the fake quant, in one
// kernel launch; min_val/max_val/scale/zero_point [channels] are updated in place on the
// device. Returns the launch's error (a cooperative launch for large inputs).
size_t observe_workspace_floats(DType dt, const FqLayout& l, const void* x, const void* out);
cudaError_t fq_observe_forward(DType dt, const void* x, void* out, uint8_t* mask,
                               const FqLayout& l, float* min_val, float* max_val, float* scale,
                               int32_t* zero_point, bool moving_average,
                               float averaging_constant, int quant_min, int quant_max,
                               bool symmetric, int symmetric_zero_point, float eps,
                               float* workspace, cudaStream_t stream);

}  // namespace acq::cuda
