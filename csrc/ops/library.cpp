// Declares the operator namespace once; each op family adds its schemas with
// TORCH_LIBRARY_FRAGMENT(acq_kernels_C, m) in its own csrc/ops/<family>.cpp.
#include <torch/library.h>

TORCH_LIBRARY(acq_kernels_C, m) {}
