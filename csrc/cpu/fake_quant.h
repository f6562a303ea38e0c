// CPU kernels of the fake-quantization family (raw pointers; the tensor-level checks and
// allocation live in csrc/ops/fake_quant.cpp).
//
// Elements are numbered in memory order; the channel of memory offset o is
// (o / inner) % channels (per-tensor: channels == 1). Masks are bit-packed, LSB first.
#pragma once

#include <cstdint>

namespace acq::cpu {

// Quantization parameters of one fake-quant pass, already resolved per channel.
// Torch's two zero-point conventions, chosen by the zero point's dtype:
//   int zero point:   q = rne(x * inv_scale) + zp      (fake_quantize_per_{tensor,channel}_affine)
//   float zero point: q = rne(x * inv_scale + zp)      (per-channel float zero point)
struct FqParams {
  const float* scale = nullptr;      // [channels]
  const float* inv_scale = nullptr;  // [channels], 1.0f / scale (IEEE division)
  const float* zero_point = nullptr; // [channels], integer-valued unless zp_before_round
  bool zp_before_round = false;
  // torch's per-tensor kernel rounds a float64 result through fp32 (its per-channel one does
  // not); no effect on the other dtypes.
  bool out_via_float = false;
  int64_t quant_min = 0;
  int64_t quant_max = 0;
  int64_t inner = 1;     // memory stride of the channel axis (in elements)
  int64_t channels = 1;  // 1 for per-tensor
};

// out[i] = fake_quant(x[i]); mask bit i = in_range (mask may be null: not saved).
template <typename T>
void fq_forward(const T* x, T* out, uint8_t* mask, int64_t n, const FqParams& p);

// out[i] = grad[i] * bit_i(mask)
template <typename T>
void fq_mask_backward(const T* grad, const uint8_t* mask, T* out, int64_t n);

// out[i] = bit_i(mask), one byte (0/1, a bool) per element
void unpack_mask(const uint8_t* mask, bool* out, int64_t n);

// Backward of torch's learnable (LSQ) fake quant. zero_point holds the zero point already
// rounded/clamped the way torch's backward does it; the sums are per channel, fp32 results
// (accumulated per block in fp32, blocks combined in fp64 in a fixed order: deterministic).
// fma: evaluate zp + x * inv and (xc - zp) * scale - x as fused multiply-adds, as torch's
// kernels compiled for AVX2/AVX512 do.
template <typename T>
void fq_learnable_backward(const T* grad, const T* x, T* dx, float* dscale, float* dzero_point,
                           int64_t n, const FqParams& p, float grad_factor, bool fma);

// The same with the per-element scale / zero-point gradients written out (x's dtype, memory
// order) instead of summed, so that the caller reduces them exactly as torch does.
template <typename T>
void fq_learnable_backward_elementwise(const T* grad, const T* x, T* dx, T* ds_el, T* dz_el,
                                       int64_t n, const FqParams& p, float grad_factor, bool fma);

// Per-channel min and max of x (NaN propagates like torch.aminmax). Channels with no
// elements get +inf / -inf.
template <typename T>
void minmax(const T* x, int64_t n, int64_t inner, int64_t channels, float* min_out,
            float* max_out);

// UniformQuantizationObserverBase._calculate_qparams (reduce_range=False) for one channel.
// Symmetric zero point: 0 for signed ranges (quant_min < 0), else (quant_min + quant_max) / 2.
void calculate_qparams(float min_val, float max_val, int64_t quant_min, int64_t quant_max,
                       bool symmetric, float eps, float* scale, int32_t* zero_point);
// The same with the symmetric scheme's zero point given (torch.ao picks 128 for quint8 without a
// customised range, 2^15 for uint16).
void calculate_qparams(float min_val, float max_val, int64_t quant_min, int64_t quant_max,
                       bool symmetric, int64_t symmetric_zero_point, float eps, float* scale,
                       int32_t* zero_point);

// One observer step per channel, in place: moving average (MovingAverage[PerChannel]MinMax-
// Observer; a channel at +inf/-inf takes the batch range) or running min/max
// ([PerChannel]MinMaxObserver).
void observe_update(const float* cur_min, const float* cur_max, float* min_val, float* max_val,
                    int64_t channels, float averaging_constant, bool moving_average);

}  // namespace acq::cpu
