// Host-side launch helpers shared by the CUDA kernel files: the device's SM count (queried once
// per device, then cached) and small ceil-division / alignment helpers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace acq::cuda {

// Streaming multiprocessors of the current device (cached per device; 108 if the query fails).
inline int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return 108;
  if (cached[dev] == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = sms > 0 ? sms : 108;
  }
  return cached[dev];
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned_to(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1u)) == 0;
}

// Smallest power of two >= v, clamped to [lo, hi] (hi a power of two).
inline int pow2_at_least(int64_t v, int lo, int hi) {
  int p = lo;
  while (p < v && p < hi) p *= 2;
  return p;
}

}  // namespace acq::cuda
