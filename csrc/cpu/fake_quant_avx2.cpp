// See fake_quant_avx2.h. Only explicit intrinsics here: no contraction can fuse a multiply
// and an add, so every operation rounds as in the portable loops.
#include "cpu/fake_quant_avx2.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ACQ_AVX2 __attribute__((target("avx2")))
#define ACQ_HAVE_AVX2_PATH 1
#else
#define ACQ_HAVE_AVX2_PATH 0
#endif

namespace acq::cpu::avx2 {

#if ACQ_HAVE_AVX2_PATH

bool available() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

// 8 fake-quantized elements and their in-range bits (bit k: element k).
struct Fq8 {
  __m256 sc, inv, zp, qmin, qmax, magic, exact, abs_mask;

  ACQ_AVX2 Fq8(float scale, float inv_scale, float zero_point, float quant_min, float quant_max)
      : sc(_mm256_set1_ps(scale)), inv(_mm256_set1_ps(inv_scale)),
        zp(_mm256_set1_ps(zero_point)), qmin(_mm256_set1_ps(quant_min)),
        qmax(_mm256_set1_ps(quant_max)), magic(_mm256_set1_ps(0x1.8p23f)),
        exact(_mm256_set1_ps(0x1p22f)),
        abs_mask(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))) {}

  ACQ_AVX2 inline unsigned operator()(const float* x, float* out) const {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x), inv);
    // rne(v): the magic-number round where |v| < 2^22, else v itself (NaN included)
    const __m256 r = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
    const __m256 small = _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), exact, _CMP_LT_OQ);
    const __m256 q = _mm256_add_ps(_mm256_blendv_ps(v, r, small), zp);
    // The portable clamps q < qmin ? qmin : q and then qc > qmax ? qmax : qc are exactly
    // MAXPS(qmin, q) and MINPS(qmax, qc) (each returns its second operand on NaN).
    const __m256 qc = _mm256_min_ps(qmax, _mm256_max_ps(qmin, q));
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_sub_ps(qc, zp), sc));
    // in range <=> the clamps changed nothing (NaN compares unequal): (q >= qmin) & (q <= qmax)
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(qc, q, _CMP_EQ_OQ)));
  }
};

ACQ_AVX2 int64_t fq_tensor_f32(const float* x, float* out, uint8_t* mask, int64_t n,
                               float scale, float inv_scale, float zero_point, float quant_min,
                               float quant_max) {
  const Fq8 fq(scale, inv_scale, zero_point, quant_min, quant_max);
  const int64_t full = n / 8;
  if (mask != nullptr) {
    for (int64_t j = 0; j < full; ++j) mask[j] = static_cast<uint8_t>(fq(x + 8 * j, out + 8 * j));
  } else {
    for (int64_t j = 0; j < full; ++j) fq(x + 8 * j, out + 8 * j);
  }
  return full * 8;
}

namespace {
// Byte k of kFlagBytes[b] is bit k of b: 8 in-range bits -> 8 flag bytes.
struct FlagTable {
  uint64_t v[256];
  constexpr FlagTable() : v() {
    for (unsigned b = 0; b < 256; ++b) {
      uint64_t u = 0;
      for (unsigned k = 0; k < 8; ++k) u |= static_cast<uint64_t>((b >> k) & 1u) << (8 * k);
      v[b] = u;
    }
  }
};
constexpr FlagTable kFlagBytes;
}  // namespace

ACQ_AVX2 int64_t fq_run_f32(const float* x, float* out, uint8_t* flags, int64_t n, float scale,
                            float inv_scale, float zero_point, float quant_min,
                            float quant_max) {
  const Fq8 fq(scale, inv_scale, zero_point, quant_min, quant_max);
  const int64_t full = n / 8;
  for (int64_t j = 0; j < full; ++j) {
    const uint64_t u = kFlagBytes.v[fq(x + 8 * j, out + 8 * j)];
    std::memcpy(flags + 8 * j, &u, 8);
  }
  return full * 8;
}

ACQ_AVX2 void mask_backward_f32(const float* grad, const uint8_t* mask, float* out,
                                int64_t nbytes) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t j = 0; j < nbytes; ++j) {
    const __m256i b = _mm256_and_si256(_mm256_set1_epi32(mask[j]), bit);
    // 1.0f where the bit is set, else 0.0f; then grad * that (not a select), as torch's
    // grad * mask, so NaN and -0 gradients behave the same
    const __m256 m = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(b, bit)), one);
    _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(_mm256_loadu_ps(grad + 8 * j), m));
  }
}

ACQ_AVX2 int64_t unpack_mask(const uint8_t* mask, uint8_t* out, int64_t nbytes) {
  // 4 mask bytes -> 32 output bytes: byte lane k takes mask byte k / 8 and tests bit k % 8
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i one = _mm256_set1_epi8(1);
  int64_t j = 0;
  for (; j + 4 <= nbytes; j += 4) {
    int32_t word;
    std::memcpy(&word, mask + j, 4);
    // vpshufb works within 128-bit lanes: bytes 0..3 are in both lanes after the broadcast
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(word), spread);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * j), _mm256_and_si256(set, one));
  }
  return j;
}

#else  // not x86-64 gcc/clang: the portable loops run

bool available() { return false; }
int64_t fq_tensor_f32(const float*, float*, uint8_t*, int64_t, float, float, float, float,
                      float) {
  return 0;
}
int64_t fq_run_f32(const float*, float*, uint8_t*, int64_t, float, float, float, float, float) {
  return 0;
}
void mask_backward_f32(const float*, const uint8_t*, float*, int64_t) {}
int64_t unpack_mask(const uint8_t*, uint8_t*, int64_t) { return 0; }

#endif

}  // namespace acq::cpu::avx2
