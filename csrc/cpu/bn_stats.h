// Batched BatchNorm statistics on the CPU: at::parallel_for over (layer, channel-block) items.
#pragma once
#include <cstdint>
#include <vector>

#include <c10/core/ScalarType.h>

namespace acq {
namespace cpu {

// One layer viewed as [N, C, S] with element strides (S = product of the trailing dims, which
// must merge into one stride; the op makes a contiguous copy otherwise).
struct BnLayer {
  const void* x;
  void* dx;            // backward only; same strides as x
  c10::ScalarType dtype;
  int64_t N, C, S;
  int64_t sN, sC, sS;
  int64_t cbase;       // first channel of the layer in the packed [sum C] vectors
};

// mean/var: [sum C] doubles. Shifted sums (shift = the channel's first element) accumulated in
// double: stable for large means, and the loops vectorise without reassociation flags.
void bn_stats_forward(const std::vector<BnLayer>& layers, double* mean, double* var);

// dx = a[c] + b[c] * (x - k[c]) with a, b, k = coef rows ([3, sum C] doubles).
void bn_stats_backward(const std::vector<BnLayer>& layers, const double* coef, int64_t total_c);

}  // namespace cpu
}  // namespace acq
