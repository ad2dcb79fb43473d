// The pybind11 module ibkd._C: the fused CPU kernels (always) and, when built with IBKD_WITH_CUDA,
// the CUDA kernels registered by csrc/cuda/bindings.cpp.
#include "ibkd_cpu.h"

#ifdef IBKD_WITH_CUDA
void register_cuda_bindings(pybind11::module_& m);
#endif

namespace ibkd {
namespace cpu {

Tuning& tuning() {
  static Tuning instance;
  return instance;
}

}  // namespace cpu
}  // namespace ibkd

namespace {

pybind11::dict cpu_tuning() {
  const auto& t = ibkd::cpu::tuning();
  pybind11::dict d;
  d["infonce_block_rows"] = t.infonce_block_rows;
  d["infonce_max_tile_cols"] = t.infonce_max_tile_cols;
  d["hsic_block"] = t.hsic_block;
  d["max_accumulators"] = t.max_accumulators;
  return d;
}

void set_cpu_tuning(const std::string& name, int64_t value) {
  TORCH_CHECK(value >= 1, "set_cpu_tuning: ", name, " must be >= 1, got ", value);
  auto& t = ibkd::cpu::tuning();
  if (name == "infonce_block_rows") {
    t.infonce_block_rows = value;
  } else if (name == "infonce_max_tile_cols") {
    t.infonce_max_tile_cols = value;
  } else if (name == "hsic_block") {
    t.hsic_block = value;
  } else if (name == "max_accumulators") {
    t.max_accumulators = value;
  } else {
    TORCH_CHECK(false, "set_cpu_tuning: unknown setting \"", name,
                "\"; expected infonce_block_rows, infonce_max_tile_cols, hsic_block or max_accumulators");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace ibkd::cpu;
  m.doc() = "ibkd compiled kernels: fused InfoNCE and HSIC (CPU; CUDA when built with it)";

  m.def("infonce_forward", &infonce_forward, "InfoNCE forward: (row_loss, lse)", py::arg("q"),
        py::arg("k"), py::arg("inv_temp"), py::arg("symmetric"),
        py::call_guard<py::gil_scoped_release>());
  m.def("infonce_backward", &infonce_backward, "InfoNCE backward: (dq, dk, dinv_temp)",
        py::arg("grad_rows"), py::arg("q"), py::arg("k"), py::arg("inv_temp"), py::arg("lse"),
        py::arg("symmetric"), py::call_guard<py::gil_scoped_release>());
  m.def("infonce_forward_backward", &infonce_forward_backward,
        "InfoNCE forward plus the gradients of grad_weight·Σ row_loss: (row_loss, lse, dq, dk, dinv_temp)",
        py::arg("q"), py::arg("k"), py::arg("inv_temp"), py::arg("symmetric"), py::arg("grad_weight"),
        py::call_guard<py::gil_scoped_release>());
  m.def("hsic_stats", &hsic_stats, "HSIC statistics: (sums (3,), rowsum_k, rowsum_l)", py::arg("x"),
        py::arg("z"), py::arg("gammas"), py::arg("kernel"), py::call_guard<py::gil_scoped_release>());
  m.def("hsic_stats_backward", &hsic_stats_backward, "VJP of hsic_stats: (dx, dz)",
        py::arg("grad_sums"), py::arg("grad_rowsum_k"), py::arg("grad_rowsum_l"), py::arg("x"),
        py::arg("z"), py::arg("gammas"), py::arg("kernel"), py::call_guard<py::gil_scoped_release>());
  m.def("cpu_tuning", &cpu_tuning, "current tile sizes of the CPU kernels");
  m.def("set_cpu_tuning", &set_cpu_tuning, "set one tile size of the CPU kernels (benchmarks)",
        py::arg("name"), py::arg("value"));

#ifdef IBKD_WITH_CUDA
  m.attr("with_cuda") = true;
  register_cuda_bindings(m);
#else
  m.attr("with_cuda") = false;
#endif
}
