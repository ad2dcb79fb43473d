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

#if defined(__linux__) && defined(__x86_64__)
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define IBKD_BF16_GEMM_LOOKUP 1
#endif

#include <cmath>
#include <cstring>
#include <mutex>

namespace ibkd {
namespace cpu {

// Native bf16 arithmetic (AVX512-BF16 or AMX-BF16), as the OS exposes it. Without it oneDNN's
// dnnl_gemm_bf16bf16f32 falls back to a reference loop: 1.1 GFLOP/s on 2 threads of an AVX2-only AMD
// EPYC (Zen 3), against 130-160 for the upcast float32 GEMM (measured 2026-12-03, 1024×384 @ 384×1024),
// so the bf16 kernels upcast there. (CPUs with AVX-512 but no BF16 are not measured: they upcast too.)
bool cpu_has_native_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

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

// ---------------------------------------------------------------- bf16 × bf16 → float32 (oneDNN)
//
// The bf16 kernels want bf16 operands with float32 accumulation and a float32 result: the products
// of two bf16 numbers are exact in float32, so a Gram or logits tile from bf16 inputs is as exact as
// the float32 GEMM of the upcast inputs, at the bf16 rate (AVX512-BF16: ~400 GFLOP/s per core here,
// against ~200 for oneDNN's float32 GEMM). No exported entry point of torch does that on x86:
// mkldnn_matmul requires result dtype == input dtype (a bf16 result rounds the logits), cpublas'
// bf16→float32 gemm calls MKL's cblas_gemm_bf16bf16f32 (~90 GFLOP/s, no native bf16 on AMD), and
// oneDNN's own C API (dnnl_gemm_bf16bf16f32, the matmul primitive) is linked into libtorch_cpu.so
// with hidden visibility. The wheel keeps its full symbol table (.symtab), so the one function is
// looked up there: dnnl_gemm_bf16bf16f32(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C,
// ldc), row-major, C = alpha·op(A)·op(B) + beta·C (oneDNN's declaration, used by its own tests).
// Guards, any failing one leaves the bf16 kernels on the upcast float32 path: Linux x86-64; the
// library is found and has a .symtab; the same lookup resolves an exported torch symbol to the
// address dlsym gives (so the load-base arithmetic is right); a self-test of all four transpose
// combinations, beta ∈ {0, 1} (with NaN in C for beta = 0) and alpha ≠ 1 against a float64
// reference. bf16_gemm_status() says which guard failed.
using DnnlGemmBf16 = int (*)(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                             const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
                             float* C, int64_t ldc);

struct Bf16Gemm {
  DnnlGemmBf16 fn = nullptr;
  std::string status;
};

#ifdef IBKD_BF16_GEMM_LOOKUP
struct LoadedLibrary {
  std::string path;
  uintptr_t base = 0;
  bool found = false;
};

int find_torch_cpu(struct dl_phdr_info* info, size_t, void* data) {
  auto* lib = static_cast<LoadedLibrary*>(data);
  const char* name = info->dlpi_name;
  if (name == nullptr) return 0;
  const char* slash = std::strrchr(name, '/');
  const char* base = slash ? slash + 1 : name;
  if (std::strncmp(base, "libtorch_cpu.so", 15) != 0) return 0;
  lib->path = name;
  lib->base = info->dlpi_addr;
  lib->found = true;
  return 1;
}

// Addresses of the defined functions `names` in the .symtab of libtorch_cpu.so (0 where absent).
std::string lookup_symtab(const std::vector<const char*>& names, std::vector<uintptr_t>& addresses) {
  addresses.assign(names.size(), 0);
  LoadedLibrary lib;
  dl_iterate_phdr(find_torch_cpu, &lib);
  if (!lib.found) return "libtorch_cpu.so is not loaded";
  const int fd = open(lib.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "cannot open " + lib.path;
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < (off_t)sizeof(Elf64_Ehdr)) {
    close(fd);
    return "cannot stat " + lib.path;
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return "cannot map " + lib.path;
  std::string error;
  const char* p = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(p);
  bool have_symtab = false;
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
      eh->e_shoff == 0 || eh->e_shoff + (size_t)eh->e_shnum * sizeof(Elf64_Shdr) > size) {
    error = lib.path + " is not a readable 64-bit ELF file";
  } else {
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(p + eh->e_shoff);
    for (int s = 0; s < eh->e_shnum; ++s) {
      if (sh[s].sh_type != SHT_SYMTAB || sh[s].sh_link >= eh->e_shnum) continue;
      const Elf64_Shdr& strtab = sh[sh[s].sh_link];
      if (sh[s].sh_offset + sh[s].sh_size > size || strtab.sh_offset + strtab.sh_size > size) continue;
      have_symtab = true;
      const auto* syms = reinterpret_cast<const Elf64_Sym*>(p + sh[s].sh_offset);
      const size_t count = sh[s].sh_size / sizeof(Elf64_Sym);
      const char* str = p + strtab.sh_offset;
      for (size_t i = 0; i < count; ++i) {
        const Elf64_Sym& sym = syms[i];
        if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || sym.st_shndx == SHN_UNDEF || sym.st_value == 0 ||
            sym.st_name >= strtab.sh_size) {
          continue;
        }
        const char* name = str + sym.st_name;
        for (size_t n = 0; n < names.size(); ++n) {
          if (addresses[n] == 0 && std::strcmp(name, names[n]) == 0) addresses[n] = lib.base + sym.st_value;
        }
      }
    }
    if (!have_symtab) error = lib.path + " has no symbol table (.symtab; a stripped build)";
  }
  munmap(map, size);
  return error;
}

// C = beta·C + alpha·op(A)·op(B) against float64, all transpose combinations: empty when right.
std::string self_test(DnnlGemmBf16 fn) {
  const int64_t M = 7, N = 19, K = 45;
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      for (int b = 0; b < 2; ++b) {
        std::vector<uint16_t> A(M * K), B(K * N);
        std::vector<float> Af(M * K), Bf(K * N), C(M * N), C0(M * N);
        auto bf = [](float x, float& back) {  // exactly representable small values
          uint32_t bits;
          std::memcpy(&bits, &x, 4);
          bits &= 0xFFFF0000u;
          std::memcpy(&back, &bits, 4);
          return static_cast<uint16_t>(bits >> 16);
        };
        for (int64_t i = 0; i < M * K; ++i) A[i] = bf(std::sin(0.37f * i + ta) * 3.0f, Af[i]);
        for (int64_t i = 0; i < K * N; ++i) B[i] = bf(std::cos(0.53f * i + tb) * 2.0f, Bf[i]);
        for (int64_t i = 0; i < M * N; ++i) {
          C0[i] = 0.25f * (i % 5);
          C[i] = b ? C0[i] : std::nanf("");
        }
        const float alpha = 1.5f, beta = b ? 1.0f : 0.0f;
        // element (i, k) of op(A) and (k, j) of op(B) in the stored layouts
        auto a_at = [&](int64_t i, int64_t k) { return ta ? Af[k * M + i] : Af[i * K + k]; };
        auto b_at = [&](int64_t k, int64_t j) { return tb ? Bf[j * K + k] : Bf[k * N + j]; };
        const int st = fn(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A.data(), ta ? M : K, B.data(),
                          tb ? K : N, beta, C.data(), N);
        if (st != 0) return "self-test returned status " + std::to_string(st);
        for (int64_t i = 0; i < M; ++i) {
          for (int64_t j = 0; j < N; ++j) {
            double ref = b ? (double)C0[i * N + j] : 0.0, mag = std::fabs(ref);
            for (int64_t k = 0; k < K; ++k) {
              ref += (double)alpha * a_at(i, k) * b_at(k, j);
              mag += std::fabs((double)alpha * a_at(i, k) * b_at(k, j));
            }
            if (!(std::fabs(C[i * N + j] - ref) <= 1e-5 * mag + 1e-6)) {
              return "self-test mismatch (transa=" + std::to_string(ta) + ", transb=" + std::to_string(tb) +
                     ", beta=" + std::to_string(b) + ")";
            }
          }
        }
      }
    }
  }
  return "";
}
#endif

Bf16Gemm resolve_bf16_gemm() {
  Bf16Gemm g;
  if (!cpu_has_native_bf16()) {
    g.status = "this CPU has no native bf16 (AVX512-BF16 / AMX-BF16): oneDNN's bf16 GEMM would run its "
               "reference loop, so bf16 inputs are upcast to float32";
    return g;
  }
#ifdef IBKD_BF16_GEMM_LOOKUP
  const char* exported = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";
  std::vector<uintptr_t> addr;
  const std::string error = lookup_symtab({"dnnl_gemm_bf16bf16f32", exported}, addr);
  if (!error.empty()) {
    g.status = error;
    return g;
  }
  if (addr[0] == 0) {
    g.status = "dnnl_gemm_bf16bf16f32 is not in the symbol table of libtorch_cpu.so";
    return g;
  }
  if (mkldnn_matmul_fn() == nullptr || reinterpret_cast<uintptr_t>(mkldnn_matmul_fn()) != addr[1]) {
    g.status = "the symbol table of libtorch_cpu.so does not match the loaded library";
    return g;
  }
  auto fn = reinterpret_cast<DnnlGemmBf16>(addr[0]);
  const std::string failed = self_test(fn);
  if (!failed.empty()) {
    g.status = failed;
    return g;
  }
  g.fn = fn;
  g.status = "oneDNN dnnl_gemm_bf16bf16f32";
#else
  g.status = "needs Linux x86-64";
#endif
  return g;
}

const Bf16Gemm& bf16_gemm_impl() {
  static const Bf16Gemm g = resolve_bf16_gemm();
  return g;
}

// Layout of a 2-D view for a row-major BLAS call: 'N' (rows contiguous) or 'T' (a transposed
// row-major matrix), with its leading dimension; false if it is neither.
bool blas_layout(const Tensor& t, char& trans, int64_t& ld) {
  const int64_t r = t.size(0), c = t.size(1);
  if ((t.stride(1) == 1 || c == 1) && (r == 1 || t.stride(0) >= std::max<int64_t>(1, c))) {
    trans = 'N';
    ld = r == 1 ? std::max<int64_t>(1, c) : t.stride(0);
    return true;
  }
  if ((t.stride(0) == 1 || r == 1) && (c == 1 || t.stride(1) >= std::max<int64_t>(1, r))) {
    trans = 'T';
    ld = c == 1 ? std::max<int64_t>(1, r) : t.stride(1);
    return true;
  }
  return false;
}

}  // namespace

bool bf16_gemm_available() { return bf16_gemm_impl().fn != nullptr; }

std::string bf16_gemm_status() { return bf16_gemm_impl().status; }

bool bf16_gemm_active() {
  return tuning().bf16_gemm != 0 && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
         bf16_gemm_available();
}

void gemm_bf16(const Tensor& out, const Tensor& a, const Tensor& b, double beta, double alpha) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && a.scalar_type() == at::kBFloat16 &&
                  b.scalar_type() == at::kBFloat16,
              "gemm_bf16: float32 out and bfloat16 operands expected");
  const int64_t M = out.size(0), N = out.size(1), K = a.size(1);
  Tensor& o = const_cast<Tensor&>(out);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == 0.0) {
      o.zero_();
    } else {
      o.mul_(beta);
    }
    return;
  }
  const DnnlGemmBf16 fn = bf16_gemm_impl().fn;
  char ta, tb;
  int64_t lda, ldb;
  const bool out_ok = out.stride(1) == 1 && (M == 1 || out.stride(0) >= N);
  if (fn == nullptr || !out_ok || !blas_layout(a, ta, lda) || !blas_layout(b, tb, ldb)) {
    // exact float32 fallback (same products; only the speed differs)
    gemm(out, a.to(at::kFloat), b.to(at::kFloat), beta, alpha);
    return;
  }
  const int st = fn(ta, tb, M, N, K, static_cast<float>(alpha), a.data_ptr(), lda, b.data_ptr(), ldb,
                    static_cast<float>(beta), out.data_ptr<float>(), M == 1 ? std::max<int64_t>(1, N) : out.stride(0));
  TORCH_CHECK(st == 0, "gemm_bf16: dnnl_gemm_bf16bf16f32 returned status ", st);
}

namespace {

// at::native::mkldnn_matmul refuses float32 on CPUs without AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: it
// checks oneDNN's bf16 device support for float32 too ("mkldnn_matmul bf16 path needs the cpu support
// ..."), since ATen itself only calls it for float32 in its bf32 mode. An AVX2-only CPU (seen
// 2026-12-03: AMD EPYC Zen 3) raised that error from every fused float32 call. So the route is probed
// once, on a 2×3 @ 3×2 product with NaN in the output (beta = 0 must overwrite it), and any refusal or
// wrong result leaves the kernels on ATen's addmm (MKL), which is the right GEMM there anyway:
// oneDNN's float32 advantage was its AVX-512 code path.
std::string probe_onednn_float32() {
  try {
    const Tensor a = at::arange(6, at::kFloat).reshape({2, 3});
    const Tensor b = at::arange(6, at::kFloat).reshape({3, 2});
    Tensor out = at::full({2, 2}, std::nan(""), at::kFloat);
    mkldnn_matmul_fn()(a, b, out, 0.0f, 1.0f);
    if (!at::equal(out, at::mm(a, b))) return "oneDNN's float32 matmul gave a wrong result in its self-test";
  } catch (const std::exception& e) {
    std::string what = e.what();
    return "oneDNN's float32 matmul refused this CPU (" + what.substr(0, what.find('\n')) + ")";
  }
  return "";
}

const std::string& onednn_float32_probe() {
  static const std::string status = probe_onednn_float32();
  return status;
}

}  // namespace

std::string onednn_gemm_status() {
  if (mkldnn_matmul_fn() == nullptr) return "at::native::mkldnn_matmul is not exported by this torch";
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return "oneDNN is disabled in torch";
  const std::string& probe = onednn_float32_probe();
  return probe.empty() ? "oneDNN float32 matmul" : probe;
}

bool onednn_gemm_available() {
  if (mkldnn_matmul_fn() == nullptr || !at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) {
    return false;
  }
  if (!onednn_float32_probe().empty()) return false;
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
