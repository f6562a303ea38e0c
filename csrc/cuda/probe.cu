#include <cuda_runtime.h>
__global__ void acq_probe_kernel(float* x) { x[threadIdx.x] += 1.0f; }
