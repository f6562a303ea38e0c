// Hand-vectorised AVX2 loops of the fp32 per-tensor fake quant and of the packed-mask backward,
// the two per-element passes of every activation FakeQuant in a QAT step. gcc's
// auto-vectorised versions of these loops spend most of their time turning 32-bit compare
// lanes into the 1-byte flags that are then packed; here the compares go straight to mask
// bytes (movemask) and mask bytes straight to lanes. Same arithmetic, same order, same
// results as the portable loops in fake_quant.cpp (tests compare both with torch).
#pragma once

#include <cstdint>

namespace acq::cpu::avx2 {

// Whether this CPU runs the functions below (checked once).
bool available();

// The first n / 8 * 8 elements of the per-tensor fake quant (q = rne(x * inv) + zp, clamped,
// (q - zp) * scale); mask byte j gets the in-range bits of elements 8j..8j+7 (mask may be
// null). Returns how many elements it did; the caller does the rest.
int64_t fq_tensor_f32(const float* x, float* out, uint8_t* mask, int64_t n, float scale,
                      float inv_scale, float zero_point, float quant_min, float quant_max);

// The same for a run of one channel, with in-range flags as 0/1 bytes (flags[i], element i),
// which the caller packs; for runs that do not start on a mask byte.
int64_t fq_run_f32(const float* x, float* out, uint8_t* flags, int64_t n, float scale,
                   float inv_scale, float zero_point, float quant_min, float quant_max);

// out[i] = grad[i] * bit_i(mask) for the 8 * nbytes elements of nbytes whole mask bytes.
void mask_backward_f32(const float* grad, const uint8_t* mask, float* out, int64_t nbytes);

// out[i] = bit_i(mask) as 0/1 bytes for the 8 * nbytes elements of nbytes whole mask bytes;
// returns how many whole bytes it did (a multiple of 4), the caller does the rest.
int64_t unpack_mask(const uint8_t* mask, uint8_t* out, int64_t nbytes);

}  // namespace acq::cpu::avx2
