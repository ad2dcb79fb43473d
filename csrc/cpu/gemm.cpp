// The tile GEMM of the CPU kernels: out = beta·out + alpha·(a @ b).
//
// Why not simply at::addmm_out: on CPU, ATen sends float32 matmul to MKL's sgemm. On the AMD EPYC
// (Zen 5) this package is benchmarked on, MKL takes its AVX2 code path (~90-100 GFLOP/s per core),
// while oneDNN's float32 matmul uses AVX-512 and ran at ~200 GFLOP/s per core on the kernels' tile
// shapes (benchmarks/README.md, "GEMM rates"). ATen exports its oneDNN matmul
// (at::native::mkldnn_matmul) but ships no header for it, so it is looked up at run time: if this
// torch lacks the symbol, or oneDNN is disabled (torch.backends.mkldnn), or
// set_cpu_tuning("onednn", 0) was called, ATen's addmm is used. Both are exact float32 GEMMs
// (oneDNN's float32 matmul only drops to bf16/tf32 when torch's fp32 matmul precision is lowered,
// which is checked below). float64 always uses ATen (MKL dgemm).
#include "ibkd_cpu.h"

#include <ATen/Context.h>
#include <dlfcn.h>

namespace ibkd {
namespace cpu {
namespace {

using MkldnnMatmul = void (*)(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta,
                              float alpha);

MkldnnMatmul find_mkldnn_matmul() {
  // at::native::mkldnn_matmul(const Tensor&, const Tensor&, const Tensor&, float beta, float alpha)
  const char* symbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";
  void* fn = dlsym(RTLD_DEFAULT, symbol);
  if (fn == nullptr) {
    // libtorch_cpu is a dependency of this extension, so it is loaded; ask it directly in case it
    // was opened with RTLD_LOCAL
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) fn = dlsym(lib, symbol);
  }
  return reinterpret_cast<MkldnnMatmul>(fn);
}

MkldnnMatmul mkldnn_matmul_fn() {
  static const MkldnnMatmul fn = find_mkldnn_matmul();
  return fn;
}

}  // namespace

bool onednn_gemm_available() {
  if (mkldnn_matmul_fn() == nullptr || !at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) {
    return false;
  }
  // oneDNN may trade float32 exactness for speed (bf16/tf32) when torch's float32 matmul precision
  // is lowered; the kernels promise float32 GEMMs, so they use MKL then.
  const auto p = at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return p != at::Float32Precision::BF16 && p != at::Float32Precision::TF32;
}

bool onednn_gemm_active() { return tuning().onednn != 0 && onednn_gemm_available(); }

void gemm(const Tensor& out, const Tensor& a, const Tensor& b, double beta, double alpha) {
  if (out.scalar_type() == at::kFloat && onednn_gemm_active()) {
    mkldnn_matmul_fn()(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
    return;
  }
  if (beta == 0.0) {
    at::mm_out(const_cast<Tensor&>(out), a, b);
    if (alpha != 1.0) const_cast<Tensor&>(out).mul_(alpha);
  } else {
    const_cast<Tensor&>(out).addmm_(a, b, beta, alpha);
  }
}

}  // namespace cpu
}  // namespace ibkd
