// Batched BatchNorm statistics on CUDA: all layers in one reduction launch + one combine launch,
// and one grouped elementwise launch for the backward. Torch-free (raw pointers + a stream).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace acq {
namespace cuda {

// Per-layer table, int64 fields (row-major [L, kBnLayerFields]), built by csrc/ops/bn_stats.cpp.
enum BnLayerField : int {
  kBnX = 0,         // input data pointer
  kBnDx,            // gradient data pointer (backward only)
  kBnDtype,         // 0 float32, 1 float16, 2 bfloat16
  kBnKind,          // 0 generic (m -> (n, s)), 1 channel-inner rows (channels contiguous)
  kBnM,             // elements per channel (N * S)
  kBnC,             // channels
  kBnS,             // spatial positions per sample
  kBnStrideN,
  kBnStrideC,
  kBnStrideS,
  kBnRowStride,     // kind 1: stride between consecutive positions m
  kBnCBase,         // first channel of this layer in the packed [sum C] outputs
  kBnPBase,         // first partial slot of this layer (partials are [P, C] per layer)
  kBnP,             // partials per channel
  kBnTileBegin,     // first tile (block) of this layer
  kBnLayerFields
};

constexpr int kBnThreads = 256;
constexpr int kBnChanBlock = 32;   // kind 1: channels per tile (one warp's width)
constexpr int kBnRowsPerTile = 256;  // kind 1: rows (positions) per tile
constexpr int kBnElemsPerTile = 8192;  // kind 0: elements per tile

// Partials: [3, n_slots] float (count, mean, M2). Output: [2, total_c] float (mean, var).
void bn_stats_forward(const int64_t* layers_dev, int n_layers, int64_t n_tiles, float* partials,
                      int64_t n_slots, float* out, int64_t total_c, cudaStream_t stream);

// dx = coef[0][c] + coef[1][c] * (x - coef[2][c]), coef [3, total_c] float; dx has x's strides.
void bn_stats_backward(const int64_t* layers_dev, int n_layers, int64_t n_tiles,
                       const float* coef, int64_t total_c, cudaStream_t stream);

}  // namespace cuda
}  // namespace acq
