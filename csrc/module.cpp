// Python module sigattn._C: importing it loads this library, which registers the op schemas (schemas.cpp) and
// the CPU kernels (cpu_ops.cpp). The only Python-visible function reports how the library was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "attention_cpu.h"

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = "0.1.0";
  info["torch"] = TORCH_VERSION;
  info["max_head_dim"] = sigattn::kMaxHeadDim;
  info["parallel"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sigattn C++ extension: sigattn:: op schemas and CPU kernels (see torch.ops.sigattn)";
  m.def("build_info", &build_info, "Version, torch version built against, max head dim, ATen parallel backend");
}
