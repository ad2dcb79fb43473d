// The pybind11 module ibkd._C: the fused CPU kernels (always) and, when built with IBKD_WITH_CUDA,
// the CUDA kernels registered by csrc/cuda/bindings.cpp.
#include "ibkd_cpu.h"
#include "simd.h"

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

pybind11::dict cpu_gemm_info() {
  pybind11::dict d;
  d["onednn_available"] = ibkd::cpu::onednn_gemm_available();
  d["onednn_active"] = ibkd::cpu::onednn_gemm_active();
  d["onednn"] = ibkd::cpu::onednn_gemm_status();
  d["avx512_epilogues"] = ibkd::cpu::simd::avx512_enabled();
  d["epilogues"] = std::string(ibkd::cpu::simd::epilogue_isa());
  d["native_bf16"] = ibkd::cpu::cpu_has_native_bf16();
  d["bf16_gemm_available"] = ibkd::cpu::bf16_gemm_available();
  d["bf16_gemm_active"] = ibkd::cpu::bf16_gemm_active();
  d["bf16_gemm"] = ibkd::cpu::bf16_gemm_status();
  // whether the tile loops (at::parallel_for, a header template) were compiled parallel: setup.py's
  // openmp_flags says why this matters
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

// The kernels' own tile GEMM (out = beta·out + alpha·a@b), so benchmarks can measure its rate.
void tile_gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2, "tile_gemm: 2-D tensors expected");
  TORCH_CHECK(out.size(0) == a.size(0) && out.size(1) == b.size(1) && a.size(1) == b.size(0),
              "tile_gemm: shapes do not match: out ", out.sizes(), ", a ", a.sizes(), ", b ", b.sizes());
  TORCH_CHECK(out.is_contiguous(), "tile_gemm: out must be contiguous");
  if (a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kFloat) {
    ibkd::cpu::gemm_bf16(out, a, b, beta, alpha);  // the bf16 kernels' tile GEMM (bf16 × bf16 → float32)
    return;
  }
  TORCH_CHECK(out.scalar_type() == a.scalar_type() && a.scalar_type() == b.scalar_type(),
              "tile_gemm: one dtype expected (or bfloat16 a, b with a float32 out)");
  ibkd::cpu::gemm(out, a, b, beta, alpha);
}

pybind11::dict cpu_tuning() {
  const auto& t = ibkd::cpu::tuning();
  pybind11::dict d;
  d["infonce_block_rows"] = t.infonce_block_rows;
  d["infonce_max_tile_cols"] = t.infonce_max_tile_cols;
  d["hsic_block"] = t.hsic_block;
  d["max_accumulators"] = t.max_accumulators;
  d["infonce_tile_kib"] = t.infonce_tile_kib;
  d["onednn"] = t.onednn;
  d["bf16_gemm"] = t.bf16_gemm;
  d["simd"] = (int64_t)ibkd::cpu::simd::vector_enabled();
  return d;
}

void set_cpu_tuning(const std::string& name, int64_t value) {
  auto& t = ibkd::cpu::tuning();
  if (name == "onednn" || name == "simd" || name == "bf16_gemm") {  // switches: 0 or 1
    TORCH_CHECK(value == 0 || value == 1, "set_cpu_tuning: ", name, " must be 0 or 1, got ", value);
    if (name == "onednn") {
      t.onednn = value;
    } else if (name == "bf16_gemm") {
      t.bf16_gemm = value;
    } else {
      ibkd::cpu::simd::set_vector_enabled(value != 0);
    }
    return;
  }
  TORCH_CHECK(value >= 1, "set_cpu_tuning: ", name, " must be >= 1, got ", value);
  if (name == "infonce_block_rows") {
    t.infonce_block_rows = value;
  } else if (name == "infonce_max_tile_cols") {
    t.infonce_max_tile_cols = value;
  } else if (name == "hsic_block") {
    t.hsic_block = value;
  } else if (name == "max_accumulators") {
    t.max_accumulators = value;
  } else if (name == "infonce_tile_kib") {
    t.infonce_tile_kib = value;
  } else {
    TORCH_CHECK(false, "set_cpu_tuning: unknown setting \"", name,
                "\"; expected infonce_block_rows, infonce_max_tile_cols, infonce_tile_kib, hsic_block, "
                "max_accumulators, onednn, bf16_gemm or simd");
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
        py::arg("symmetric"), py::arg("need_k") = true, py::call_guard<py::gil_scoped_release>());
  m.def("infonce_forward_backward", &infonce_forward_backward,
        "InfoNCE forward plus the gradients of grad_weight·Σ row_loss: (row_loss, lse, dq, dk, dinv_temp)",
        py::arg("q"), py::arg("k"), py::arg("inv_temp"), py::arg("symmetric"), py::arg("grad_weight"),
        py::arg("need_k") = true, py::call_guard<py::gil_scoped_release>());
  m.def("hsic_stats", &hsic_stats, "HSIC statistics: (sums (3,), rowsum_k, rowsum_l)", py::arg("x"),
        py::arg("z"), py::arg("gammas"), py::arg("kernel"), py::call_guard<py::gil_scoped_release>());
  m.def("hsic_stats_backward", &hsic_stats_backward,
        "VJP of hsic_stats: (dx, dz); a gradient not asked for (need_x / need_z false) is None",
        py::arg("grad_sums"), py::arg("grad_rowsum_k"), py::arg("grad_rowsum_l"), py::arg("x"),
        py::arg("z"), py::arg("gammas"), py::arg("kernel"), py::arg("need_x") = true, py::arg("need_z") = true,
        py::call_guard<py::gil_scoped_release>());
  m.def("hsic_tile_side", &hsic_tile_side, "side of the HSIC kernels' Gram tiles for n rows on `threads` threads",
        py::arg("n"), py::arg("threads"));
  m.def("cpu_tuning", &cpu_tuning, "current tile sizes of the CPU kernels");
  m.def("cpu_gemm_info", &cpu_gemm_info, "which GEMM and epilogue implementations the CPU kernels use");
  m.def("tile_gemm", &tile_gemm, "the CPU kernels' tile GEMM: out = beta*out + alpha*a@b (benchmarks)",
        py::arg("out"), py::arg("a"), py::arg("b"), py::arg("beta") = 0.0, py::arg("alpha") = 1.0,
        py::call_guard<py::gil_scoped_release>());
  m.def("set_cpu_tuning", &set_cpu_tuning, "set one tile size of the CPU kernels (benchmarks)",
        py::arg("name"), py::arg("value"));

#ifdef IBKD_WITH_CUDA
  m.attr("with_cuda") = true;
  register_cuda_bindings(m);
#else
  m.attr("with_cuda") = false;
#endif
}
