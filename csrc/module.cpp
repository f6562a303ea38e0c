// Python module for acq_kernels._C. Operators register themselves with the dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in csrc/ops/*.cpp) when this library loads;
// the module itself only reports how it was built.
#include <Python.h>
#include <torch/extension.h>

#include <generated/build_config.h>  // <>: the -I order picks this build's copy

#ifndef ACQ_CUDA_ARCHS
#define ACQ_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    py::dict d;
    d["with_cuda"] = static_cast<bool>(ACQ_WITH_CUDA);
    d["cuda_archs"] = std::string(ACQ_CUDA_ARCHS);
#ifdef ACQ_CUDA_VERSION
    d["cuda_version"] = std::string(ACQ_CUDA_VERSION);
#endif
#ifdef ACQ_TORCH_VERSION
    d["torch_version"] = std::string(ACQ_TORCH_VERSION);
#endif
    return d;
  });
}
