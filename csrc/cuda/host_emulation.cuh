// TEST-ONLY host emulation of the CUDA features the kernels of this directory use, so that CPU-only
// CI can run the real kernel sources (tests/test_cuda_build.py::test_kernels_in_host_emulation).
// Not part of the extension (setup.py compiles only *.cu and *.cpp here).
//
// One std::thread per CUDA thread; blocks run one after another; __syncthreads is a std::barrier;
// warp shuffles go through per-warp slots; WMMA fragments are whole 16×16 tiles that every lane
// holds (lane 0 of each warp does the fragment work, fp32 fused multiply-add as the tensor cores
// accumulate; the other lanes' fragments are never stored).
// Dynamic shared memory and every output start filled with 0xFF bytes (NaN): unwritten elements show.
// The test rewrites `extern __shared__` declarations and `<<<...>>>` launches textually, then builds
//   #include "host_emulation.cuh"            (section 1: the emulated CUDA runtime)
//   #include <rewritten infonce.cu, hsic.cu>
//   #define IBKD_EMULATION_HARNESS
//   #include "host_emulation.cuh"            (section 2: main(), file-based input/output)
// with g++ -std=c++20 and the CUDA include directory (for cuda_fp16.h / cuda_bf16.h).
#ifndef IBKD_HOST_EMULATION_RUNTIME
#define IBKD_HOST_EMULATION_RUNTIME
// Host emulation of the CUDA features the ibkd kernels use: one std::thread per CUDA thread,
// blocks run one after the other, __syncthreads = std::barrier, warp shuffles via per-warp slots,
// WMMA fragments emulated as whole 16x16 tiles (computed redundantly by every lane, stored by lane 0).
#include <cuda_runtime_api.h>
#include <vector_types.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <thread>
#include <vector>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <memory>
using std::min; using std::max;
#define __global__
#define __launch_bounds__(...)
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
inline void __trap() { std::abort(); }
inline thread_local uint3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;
inline unsigned char* g_dyn_smem = nullptr;
inline std::unique_ptr<std::barrier<>> g_block_bar;
struct WarpCtx { std::barrier<> bar{32}; double slots[32]; };
inline WarpCtx g_warps[8];
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
template <class V> V __shfl_xor_sync(unsigned, V v, int m) {
  WarpCtx& w = g_warps[threadIdx.x / 32]; int lane = threadIdx.x % 32;
  w.slots[lane] = (double)v; w.bar.arrive_and_wait(); V r = (V)w.slots[lane ^ m]; w.bar.arrive_and_wait(); return r; }
template <class V> V __shfl_down_sync(unsigned, V v, int off) {
  WarpCtx& w = g_warps[threadIdx.x / 32]; int lane = threadIdx.x % 32;
  w.slots[lane] = (double)v; w.bar.arrive_and_wait(); V r = lane + off < 32 ? (V)w.slots[lane + off] : v; w.bar.arrive_and_wait(); return r; }
inline float emu_tof(float v) { return v; }
inline float emu_tof(__half v) { return __half2float(v); }
inline float emu_tof(__nv_bfloat16 v) { return __bfloat162float(v); }
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment { float x[256]; };
template <class Use, class T, class Layout> void load_matrix_sync(fragment<Use,16,16,16,T,Layout>& f, const T* p, unsigned ldm) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    f.x[r*16+c] = std::is_same<Layout,row_major>::value ? emu_tof(p[r*ldm+c]) : emu_tof(p[c*ldm+r]); }
inline void load_matrix_sync(fragment<accumulator,16,16,16,float,void>& f, const float* p, unsigned ldm, layout_t) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) f.x[r*16+c] = p[r*ldm+c]; }
inline void store_matrix_sync(float* p, const fragment<accumulator,16,16,16,float,void>& f, unsigned ldm, layout_t) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) p[r*ldm+c] = f.x[r*16+c]; }
inline void fill_fragment(fragment<accumulator,16,16,16,float,void>& f, float v) { for (auto& e : f.x) e = v; }
template <class T, class LA, class LB>
void mma_sync(fragment<accumulator,16,16,16,float,void>& d, const fragment<matrix_a,16,16,16,T,LA>& a,
              const fragment<matrix_b,16,16,16,T,LB>& b, const fragment<accumulator,16,16,16,float,void>& c) {
  if (threadIdx.x % 32 != 0) return;
  float out[256];
  for (int r = 0; r < 16; ++r) for (int n = 0; n < 16; ++n) { float s = c.x[r*16+n]; for (int k = 0; k < 16; ++k) s = std::fma(a.x[r*16+k], b.x[k*16+n], s); out[r*16+n] = s; }
  std::memcpy(d.x, out, sizeof out); }
}}
template <class F, class... Args>
void emu_launch(F kernel, dim3 grid, dim3 block, size_t dyn, cudaStream_t, Args... args) {
  gridDim = grid; blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::vector<unsigned char> buf(dyn + 256, 0xFF);  // poisoned dynamic shared memory
    g_dyn_smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(buf.data()) + 127) / 128 * 128);
    g_block_bar = std::make_unique<std::barrier<>>(block.x);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block.x; ++t) ts.emplace_back([&, t] { threadIdx = make_uint3(t,0,0); blockIdx = make_uint3(bx,by,0); kernel(args...); });
    for (auto& th : ts) th.join();
  }
}
extern "C" {
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = IBKD_EMU_SMEM_OPTIN; return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
}
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int v) { return v <= IBKD_EMU_SMEM_OPTIN ? cudaSuccess : cudaErrorInvalidValue; }

#undef __shared__
#define __shared__ static
#undef __device__
#define __device__
#undef __host__
#define __host__
#endif  // IBKD_HOST_EMULATION_RUNTIME

#if defined(IBKD_EMULATION_HARNESS) && !defined(IBKD_HOST_EMULATION_HARNESS_DONE)
#define IBKD_HOST_EMULATION_HARNESS_DONE
#include <cstdio>
#include <string>
#include <fstream>
using namespace ibkd_cuda;
template <class V> std::vector<V> rd(const std::string& f, size_t n) { std::vector<V> v(n); std::ifstream in(f, std::ios::binary); in.read((char*)v.data(), n*sizeof(V)); if (!in) { fprintf(stderr, "read %s\n", f.c_str()); exit(2);} return v; }
template <class V> void wr(const std::string& f, const std::vector<V>& v) { std::ofstream o(f, std::ios::binary); o.write((const char*)v.data(), v.size()*sizeof(V)); }
template <class V> std::vector<V> poisoned(size_t n) { std::vector<V> v(n); memset(v.data(), 0xFF, n*sizeof(V)); return v; }
template <class T> int run(int argc, char** argv) {
  using A = acc_of<T>;
  std::string op = argv[1], dir = argv[3];
  if (op == "infonce") {
    int B = atoi(argv[4]), N = atoi(argv[5]), D = atoi(argv[6]); bool sym = atoi(argv[7]);
    auto q = rd<T>(dir + "/q.bin", (size_t)B*D), k = rd<T>(dir + "/k.bin", (size_t)N*D);
    auto c = rd<A>(dir + "/c.bin", 1), w = rd<A>(dir + "/w.bin", B);
    auto lse = poisoned<A>(sym ? 2*B : B), pos = poisoned<A>(B);
    if (launch_infonce_forward<T>(q.data(), k.data(), B, N, D, c.data(), sym, lse.data(), pos.data(), nullptr)) return 3;
    A wmax = 0; for (A v : w) wmax = std::max(wmax, std::fabs(v));
    auto dq = poisoned<T>((size_t)B*D), dk = poisoned<T>((size_t)N*D); auto dinv = poisoned<A>(1);
    auto partials = poisoned<double>(num_row_blocks(B));
    InfoNCEBackwardArgs<T> a{}; a.q = q.data(); a.k = k.data(); a.B = B; a.N = N; a.D = D; a.inv_temp = c.data();
    a.lse = lse.data(); a.grad_rows = w.data(); a.grad_absmax = &wmax; a.symmetric = sym; a.dq = dq.data(); a.dk = dk.data();
    a.dinv = dinv.data(); a.dinv_partials = partials.data();
    cudaError_t e = launch_infonce_backward<T>(a, nullptr); if (e) { fprintf(stderr, "backward err %d\n", (int)e); return 3; }
    wr(dir + "/lse.out", lse); wr(dir + "/pos.out", pos); wr(dir + "/dq.out", dq); wr(dir + "/dk.out", dk); wr(dir + "/dinv.out", dinv);
  } else {
    int n = atoi(argv[4]), dx = atoi(argv[5]), dz = atoi(argv[6]); bool rbf = atoi(argv[7]);
    auto x = rd<T>(dir + "/x.bin", (size_t)n*dx), z = rd<T>(dir + "/z.bin", (size_t)n*dz);
    auto gam = rd<A>(dir + "/gammas.bin", 2), gs = rd<A>(dir + "/gsums.bin", 3), grk = rd<A>(dir + "/grk.bin", n), grl = rd<A>(dir + "/grl.bin", n);
    auto sqx = poisoned<A>(n), sqz = poisoned<A>(n);
    HsicArgs<T> a{}; a.x = x.data(); a.z = z.data(); a.n = n; a.dx = dx; a.dz = dz; a.gammas = gam.data(); a.rbf = rbf; a.sqnorm_x = sqx.data(); a.sqnorm_z = sqz.data();
    if (launch_hsic_sqnorms<T>(a, nullptr)) return 3;
    auto sums = poisoned<A>(3), rk = poisoned<A>(n), rl = poisoned<A>(n); auto partials = poisoned<double>(3*num_row_blocks(n));
    if (launch_hsic_stats<T>(a, sums.data(), rk.data(), rl.data(), partials.data(), nullptr)) return 3;
    A mk = 0, ml = 0, mx = 0, mz = 0; for (int i = 0; i < n; ++i) { mk = std::max(mk, std::fabs(grk[i])); ml = std::max(ml, std::fabs(grl[i])); mx = std::max(mx, sqx[i]); mz = std::max(mz, sqz[i]); }
    A g0 = std::fabs(gs[0]), g1 = std::fabs(gs[1]), g2 = std::fabs(gs[2]);
    std::vector<A> bounds = rbf ? std::vector<A>{2*g0 + 4*g1 + 2*mk, 2*g0 + 4*g2 + 2*ml} : std::vector<A>{2*g0*mz + 4*g1*mx + 2*mk, 2*g0*mx + 4*g2*mz + 2*ml};
    auto dxo = poisoned<T>((size_t)n*dx), dzo = poisoned<T>((size_t)n*dz);
    cudaError_t e = launch_hsic_backward<T>(a, gs.data(), grk.data(), grl.data(), bounds.data(), dxo.data(), dzo.data(), nullptr);
    if (e) { fprintf(stderr, "hsic backward err %d\n", (int)e); return 3; }
    wr(dir + "/sums.out", sums); wr(dir + "/rk.out", rk); wr(dir + "/rl.out", rl); wr(dir + "/dx.out", dxo); wr(dir + "/dz.out", dzo);
  }
  return 0;
}
int main(int argc, char** argv) {
  std::string dt = argv[2];
  if (dt == "float32") return run<float>(argc, argv);
  if (dt == "float64") return run<double>(argc, argv);
  if (dt == "float16") return run<__half>(argc, argv);
  return run<__nv_bfloat16>(argc, argv);
}
#endif  // IBKD_EMULATION_HARNESS
