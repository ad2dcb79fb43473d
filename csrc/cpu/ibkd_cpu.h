// Fused CPU kernels of ibkd (InfoNCE and HSIC) and the helpers they share.
//
// The kernel-level contract (argument meaning, shapes, accumulation dtype) is documented in
// ibkd/backend/base.py. Every kernel works on tiles of the B×N logit / n×n kernel matrices and never
// holds more than one tile per worker: extra memory is O((B+N)·D) (upcast copies, per-worker
// gradient accumulators) plus the tiles.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace ibkd {
namespace cpu {

using at::Tensor;

// Tile sizes (defaults chosen by reasoning about cache sizes; not yet swept, because the shared 2-core
// box was oversubscribed when this was written). Exposed to Python (ibkd._C.cpu_tuning() /
// set_cpu_tuning(name, value)) so benchmarks can sweep them and tests can force many small tiles;
// sweep them with a benchmark before changing the defaults.
struct Tuning {
  // InfoNCE: most rows per row block (the logits tile is rows × min(N, max_tile_cols)); the row
  // count is further capped so that one tile holds at most infonce_tile_kib KiB (see row_block).
  int64_t infonce_block_rows = 256;
  int64_t infonce_tile_kib = 16384;
  // InfoNCE: widest logits tile; wider rows are processed in column chunks (online log-sum-exp),
  // and the fused forward+backward then falls back to a forward pass plus a backward pass.
  int64_t infonce_max_tile_cols = 32768;
  // HSIC: side of the square Gram tiles. 512 ran as fast as 256 in one thread, and makes 4× fewer
  // tile GEMM calls: under the default (spinning) OpenMP wait policy on a machine where another
  // process holds a core, each call cost ~10 ms of waiting (a lock inside the GEMM library shared by
  // the two workers; measured 0.50 / 3.0 / 15 s for 3 / 36 / 136 tile pairs at n = 2048).
  int64_t hsic_block = 512;
  // Upper bound on the number of parallel workers that keep their own gradient accumulator
  // (O(N·D) each); more threads than this share the work in fewer, larger chunks.
  int64_t max_accumulators = 16;
  // 1: float32 tile GEMMs through oneDNN (gemm.cpp says why), 0: through ATen/MKL.
  int64_t onednn = 1;
  // 1: bfloat16 inputs use bf16 × bf16 → float32 tile GEMMs (oneDNN, gemm.cpp), 0: they are upcast
  // and take the float32 path (as before; for comparison and tests).
  int64_t bf16_gemm = 1;
};

Tuning& tuning();

inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A contiguous rows × cols view at the start of a flat scratch buffer.
inline Tensor tile_view(const Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// How a range [0, n) is cut into contiguous chunks for at::parallel_for: at most one chunk per
// thread and at most Tuning::max_accumulators chunks, because each chunk owns private accumulators
// (O(N·D) for the gradient kernels) that are summed in chunk order at the end.
struct ChunkPlan {
  int64_t per_chunk;
  int64_t count;
};

inline ChunkPlan plan_chunks(int64_t n) {
  const int64_t limit = std::max<int64_t>(
      1, std::min<int64_t>((int64_t)at::get_num_threads(), tuning().max_accumulators));
  const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(n, limit));
  const int64_t per_chunk = std::max<int64_t>(1, ceil_div(n, wanted));
  return {per_chunk, std::max<int64_t>(1, ceil_div(n, per_chunk))};
}

// Runs body(begin, end, chunk) for every chunk of the plan, in parallel. The chunk index (not the
// thread id) selects the accumulators, so results are deterministic for a given thread count.
// Inside at::parallel_for, BLAS and ATen ops run single-threaded (one tile per thread); a single
// chunk runs directly on the calling thread, where they may use every thread.
template <typename Body>
void parallel_chunks(int64_t n, const ChunkPlan& plan, const Body& body) {
  if (n <= 0) return;
  if (plan.count == 1) {
    body(0, n, 0);
    return;
  }
  at::parallel_for(0, plan.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * plan.per_chunk;
      if (begin < n) body(begin, std::min(n, begin + plan.per_chunk), c);
    }
  });
}

// out = beta·out + alpha·(a @ b) for 2-D (possibly transposed) views; see gemm.cpp.
void gemm(const Tensor& out, const Tensor& a, const Tensor& b, double beta, double alpha);
bool onednn_gemm_available();
std::string onednn_gemm_status();  // why oneDNN float32 is (not) used
bool onednn_gemm_active();

// out (float32) = beta·out + alpha·(a @ b) for bfloat16 a, b (2-D, possibly transposed views), float32
// accumulation; see gemm.cpp. bf16_gemm_active(): the bf16 kernels use it (else they upcast).
void gemm_bf16(const Tensor& out, const Tensor& a, const Tensor& b, double beta, double alpha);
bool bf16_gemm_available();
bool cpu_has_native_bf16();  // AVX512-BF16 or AMX-BF16
bool bf16_gemm_active();
std::string bf16_gemm_status();

// ----------------------------------------------------------------------------------- kernels

std::tuple<Tensor, Tensor> infonce_forward(const Tensor& q, const Tensor& k, const Tensor& inv_temp,
                                           bool symmetric);

// need_k false: dk is not computed (returned undefined: None in Python)
std::tuple<Tensor, Tensor, Tensor> infonce_backward(const Tensor& grad_rows, const Tensor& q,
                                                    const Tensor& k, const Tensor& inv_temp,
                                                    const Tensor& lse, bool symmetric, bool need_k = true);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> infonce_forward_backward(
    const Tensor& q, const Tensor& k, const Tensor& inv_temp, bool symmetric, double grad_weight,
    bool need_k = true);

// The side of the square Gram tiles the HSIC kernels use for n rows on `threads` threads.
int64_t hsic_tile_side(int64_t n, int64_t threads);

std::tuple<Tensor, Tensor, Tensor> hsic_stats(const Tensor& x, const Tensor& z,
                                              const Tensor& gammas, const std::string& kernel);

std::tuple<Tensor, Tensor> hsic_stats_backward(const Tensor& grad_sums, const Tensor& grad_rowsum_k,
                                               const Tensor& grad_rowsum_l, const Tensor& x,
                                               const Tensor& z, const Tensor& gammas,
                                               const std::string& kernel, bool need_x = true,
                                               bool need_z = true);

}  // namespace cpu
}  // namespace ibkd
