// Fused InfoNCE kernels on the CPU.
//
// With s_ij = c·q_i·k_j (c = 1/τ) the B×N logits are processed in row blocks of `br` rows; each
// worker (at::parallel_for chunk) holds one br × bc logits tile, bc = min(N, max_tile_cols):
//
// * forward: tile = (c·Q_I) K_Jᵀ (one GEMM), online row log-sum-exp over column chunks and, when
//   symmetric, per-worker online column statistics (max, Σexp) merged at the end: 1 GEMM.
// * backward (given lse): recompute the tile, turn it in place into G = ∂loss/∂s (P from the saved
//   log-sum-exps, minus the positives), then dQ_I += c·G K_J and dK_J += c·Gᵀ Q_I: 3 GEMMs.
//   dK is accumulated in one N×D buffer per worker (summed in worker order at the end), which
//   keeps 3 GEMMs; a second pass over column blocks would avoid the buffers but needs a 4th GEMM
//   to recompute the tiles (not implemented; not benchmarked against).
// * fused forward+backward, non-symmetric, N ≤ max_tile_cols: one pass, the tile holds whole
//   rows, so the exact log-sum-exp is known before P is formed: 3 GEMMs in all. Symmetric needs the
//   column log-sum-exps of all rows before any gradient, so it is forward then backward: 4 GEMMs.
//
// dinv = Σ G∘S with S = Q Kᵀ equals Σ_i q_i·(G K)_i, so it comes from the dQ GEMM for free.
//
// float32 (and half inputs, upcast to float32): the tile GEMMs go through gemm() (oneDNN, see
// gemm.cpp) and the fused path's element-wise work (row max, exp, Σ, G = w·P − w·δ) is one
// vectorised sweep per row (simd.cpp) while the row is in L2, instead of six ATen ops over the tile.
//
// bfloat16 inputs (when gemm_bf16 is available, see gemm.cpp): the tile GEMMs take the bf16 inputs
// themselves, bf16 × bf16 → float32 at the bf16 rate: S = c·(Q_I K_Jᵀ) (alpha = c, so c·q is never
// rounded; bf16 products are exact in float32, so S is as exact as in the upcast float32 path). Every
// element-wise step (log-sum-exp, P, G) is float32 as before; G is then rounded to bf16 for the two
// gradient GEMMs, row by row right after its epilogue. That rounding (≤ 2⁻⁸ relative per entry) is the
// only extra error; its row and column sums e_i = Σ_j (G16 − G)_ij, e'_j = Σ_i (G16 − G)_ij are
// kept, and −e_i·mean(K) (dq) and −c·e'_j·mean(Q) (dk) cancel the part of it that a common offset
// of the keys / queries would otherwise amplify (G K = G (K − 1·k̄ᵀ) + (G1) k̄ᵀ: the rounding
// error times k̄ is pure error, the rest scales with the spread of K, not its offset). dinv = Σ G∘S/c
// is a sum of cancelling terms, so bf16 mode takes it from the float32 G and S in the rounding pass
// (S saved just before the epilogue overwrites it), not from q·(G16 K).
#include "ibkd_cpu.h"
#include "simd.h"

#include <cmath>
#include <limits>
#include <type_traits>

namespace ibkd {
namespace cpu {
namespace {

struct InfoNCEInputs {
  Tensor q, k;  // contiguous, accumulation dtype
  double c;     // 1/τ
  at::ScalarType dtype;
  int64_t B, N, D;
  // bf16 tile GEMMs: q16, k16 are the bf16 inputs (contiguous), qbar/kbar their column means (float32)
  bool bf16 = false;
  Tensor q16, k16, qbar, kbar;
  // false: nobody wants dK (the keys are a frozen teacher's vectors, as in distillation): its GEMM, its
  // per-worker N×D accumulators and their merge are skipped, a third of the gradient's GEMM work
  bool need_k = true;
};

InfoNCEInputs prepare(const char* fn, const Tensor& q, const Tensor& k, const Tensor& inv_temp,
                      bool symmetric) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && inv_temp.device().is_cpu(), fn,
              ": q, k and inv_temp must be CPU tensors, got ", q.device(), ", ", k.device(),
              " and ", inv_temp.device());
  TORCH_CHECK(q.dim() == 2, fn, ": q must be 2-D (B, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, fn, ": k must be 2-D (N, D), got shape ", k.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), fn, ": q must be a floating tensor, got ",
              q.scalar_type());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), fn, ": q and k must have the same dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(q.size(1) == k.size(1), fn, ": q and k must have the same feature dimension, got ",
              q.size(1), " and ", k.size(1));
  TORCH_CHECK(q.size(0) >= 1, fn, ": q must have at least one row");
  TORCH_CHECK(k.size(0) >= q.size(0), fn, ": k needs at least as many rows as q (N >= B), got N=",
              k.size(0), " < B=", q.size(0));
  TORCH_CHECK(!symmetric || k.size(0) == q.size(0), fn,
              ": symmetric needs as many key rows as query rows, got B=", q.size(0),
              ", N=", k.size(0));
  TORCH_CHECK(inv_temp.numel() == 1, fn, ": inv_temp must be a 0-dim tensor, got shape ",
              inv_temp.sizes());
  const double c = inv_temp.detach().to(at::kDouble).item<double>();
  TORCH_CHECK(std::isfinite(c) && c > 0, fn, ": inv_temp (1/temperature) must be positive and finite, got ", c);
  const auto acc = accumulation_dtype(q.scalar_type());
  // The upcast copies are O((B+N)·D); for float32/float64 these are the inputs themselves.
  InfoNCEInputs in{q.detach().contiguous().to(acc), k.detach().contiguous().to(acc), c, q.scalar_type(),
                   q.size(0), k.size(0), q.size(1)};
  if (q.scalar_type() == at::kBFloat16 && bf16_gemm_active()) {
    in.bf16 = true;
    in.q16 = q.detach().contiguous();
    in.k16 = k.detach().contiguous();
    in.qbar = in.q.mean(0);
    in.kbar = in.k.mean(0);
  }
  return in;
}

// The logits tile t = c·Q_I K_Jᵀ: bf16 mode from the bf16 inputs with alpha = c, else from qc = c·Q_I.
void logits_tile(const InfoNCEInputs& in, const Tensor& t, const Tensor& qc, int64_t i0, int64_t rows,
                 int64_t j0, int64_t cols) {
  if (in.bf16) {
    gemm_bf16(t, in.q16.narrow(0, i0, rows), in.k16.narrow(0, j0, cols).t(), 0.0, in.c);
  } else {
    gemm(t, qc, in.k.narrow(0, j0, cols).t(), 0.0, 1.0);
  }
}

// c·Q_I into qc, the float32 path's GEMM operand (bf16 mode has no use for it).
void scaled_queries(const InfoNCEInputs& in, Tensor& qc, int64_t i0, int64_t rows) {
  if (!in.bf16) qc.copy_(in.q.narrow(0, i0, rows)).mul_(in.c);
}

// bf16 mode: rows [r0, r1) of the gradient tile t (float32, stride ld) into g16 (bf16, same shape),
// their rounding errors' row sums into err_row[r0..r1) and column sums into err_col[0..cols), and
// Σ G_ij·s_ij over those rows into *gs (`logits` points at the logits of row r0, same stride as t).
void round_gradient_rows(const Tensor& t, Tensor& g16, int64_t r0, int64_t r1, float* err_row,
                         float* err_col, const float* logits, double* gs) {
  const int64_t cols = t.size(1);
  simd::round_bf16(t.data_ptr<float>() + r0 * cols, cols,
                   reinterpret_cast<uint16_t*>(g16.data_ptr<at::BFloat16>()) + r0 * cols, cols, r1 - r0,
                   cols, /*errors=*/true, err_row + r0, err_col, logits, gs);
}

// gk = gk_beta·gk + G K_J and dk_J += c·Gᵀ Q_I for the gradient tile G = t. bf16 mode: G was rounded
// into g16 (round_gradient_rows) and the GEMMs take it with the bf16 inputs.
void gradient_gemms(const InfoNCEInputs& in, const Tensor& t, const Tensor& g16, const Tensor& gk,
                    double gk_beta, const Tensor& dk_j, const Tensor& qc, int64_t i0, int64_t rows,
                    int64_t j0, int64_t cols) {
  if (in.bf16) {
    gemm_bf16(gk, g16, in.k16.narrow(0, j0, cols), gk_beta, 1.0);
    if (in.need_k) gemm_bf16(dk_j, g16.t(), in.q16.narrow(0, i0, rows), 1.0, in.c);
  } else {
    gemm(gk, t, in.k.narrow(0, j0, cols), gk_beta, 1.0);
    if (in.need_k) gemm(dk_j, t.t(), qc, 1.0, 1.0);
  }
}

// Rows per block: at most Tuning::infonce_block_rows, at most as many as keep one rows × cols tile
// within Tuning::infonce_tile_kib, and a multiple-of-workers block count so every worker gets the
// same number of rows. More rows make the dK GEMM's inner dimension larger (its N×D accumulator is
// read and written once per block): at N = 16384, 256 rows (16 MiB tile) ran 7.6 % faster than 128
// (8 MiB) in one thread. The tile need not stay in the L3: each GEMM streams it once and the
// epilogue works row by row in L2, ~1 GB/s of DRAM traffic per worker.
int64_t row_block(int64_t B, int64_t cols, int64_t elem_size) {
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>((int64_t)at::get_num_threads(), tuning().max_accumulators));
  const int64_t by_bytes = std::max<int64_t>(1, tuning().infonce_tile_kib * 1024 / std::max<int64_t>(1, cols * elem_size));
  const int64_t br_max = std::max<int64_t>(1, std::min<int64_t>(tuning().infonce_block_rows, by_bytes));
  const int64_t blocks = std::min<int64_t>(B, workers * ceil_div(B, workers * br_max));
  return ceil_div(B, blocks);
}

// out[i] = tile[i − i0, i − j0] for the rows i of the tile whose positive column lies in it.
template <typename scalar_t>
void read_diagonal(const Tensor& tile, int64_t i0, int64_t j0, scalar_t* out) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  const scalar_t* t = tile.data_ptr<scalar_t>();
  for (int64_t i = std::max(i0, j0); i < std::min(i0 + rows, j0 + cols); ++i) {
    out[i] = t[(i - i0) * cols + (i - j0)];
  }
}

// tile[i − i0, i − j0] −= w[i]: the "− s_ii" term of the loss in the gradient.
template <typename scalar_t>
void subtract_diagonal(Tensor& tile, int64_t i0, int64_t j0, const scalar_t* w) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  scalar_t* t = tile.data_ptr<scalar_t>();
  for (int64_t i = std::max(i0, j0); i < std::min(i0 + rows, j0 + cols); ++i) {
    t[(i - i0) * cols + (i - j0)] -= w[i];
  }
}

// Per-worker gradient state: dK accumulator (N×D; undefined without need_k) and the partial Σ G∘S.
struct GradSlot {
  bool used = false;
  Tensor dk;
  double dinv = 0.0;
  Tensor err_col;  // bf16 mode: Σ_i (G16 − G)_ij of this worker's tiles (N,)
};

// Finishes row block I after its G tiles were multiplied into gk = Σ_J G_IJ K_J:
// dq_I = c·gk (input dtype), and (float32 path) Σ_i q_i·gk_i into dinv.
void finish_row_block(const InfoNCEInputs& in, Tensor& gk, int64_t i0, int64_t rows, Tensor& dq,
                      GradSlot& slot, const Tensor& err_row = Tensor()) {
  // bf16 mode: gk −= e ⊗ k̄ removes the offset part of G's rounding error, and dinv came from the
  // rounding pass (see the file comment)
  if (in.bf16) {
    gk.sub_(at::outer(err_row.narrow(0, 0, rows), in.kbar));
  } else {
    const Tensor q_i = in.q.narrow(0, i0, rows);
    slot.dinv += at::dot(q_i.reshape({-1}), gk.reshape({-1})).item<double>();
  }
  gk.mul_(in.c);
  dq.narrow(0, i0, rows).copy_(gk);
}

std::tuple<Tensor, Tensor> merge_grad_slots(std::vector<GradSlot>& slots, const InfoNCEInputs& in) {
  Tensor dk, err_col;
  double dinv = 0.0;
  for (auto& s : slots) {  // in chunk order: deterministic
    if (!s.used) continue;
    dinv += s.dinv;
    if (!in.need_k) continue;
    if (!dk.defined()) {
      dk = s.dk;
      err_col = s.err_col;
    } else {
      dk.add_(s.dk);
      if (in.bf16) err_col.add_(s.err_col);
    }
    s.dk = Tensor();
  }
  const Tensor dinv_t = at::scalar_tensor(dinv, in.q.options());
  if (!in.need_k) return {Tensor(), dinv_t};
  // bf16 mode: dk −= c·e' ⊗ q̄ (see the file comment)
  if (in.bf16) dk.sub_(at::outer(err_col, in.qbar), in.c);
  return {dk.to(in.dtype), dinv_t};
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> forward_impl(const InfoNCEInputs& in, bool symmetric) {
  const int64_t B = in.B, N = in.N, D = in.D;
  const auto opts = in.q.options();
  const int64_t bc = std::min<int64_t>(N, std::max<int64_t>(1, tuning().infonce_max_tile_cols));
  const int64_t br = row_block(B, bc, sizeof(scalar_t));
  const int64_t nblocks = ceil_div(B, br);
  const ChunkPlan plan = plan_chunks(nblocks);
  const double inf = std::numeric_limits<double>::infinity();
  Tensor lse_row = at::empty({B}, opts), pos = at::empty({B}, opts);
  scalar_t* pos_ptr = pos.data_ptr<scalar_t>();
  std::vector<Tensor> col_max(plan.count), col_sum(plan.count);

  parallel_chunks(nblocks, plan, [&](int64_t b0, int64_t b1, int64_t slot) {
    Tensor tile_buf = at::empty({br * bc}, opts);
    Tensor tile2_buf = symmetric ? at::empty({br * bc}, opts) : Tensor();
    Tensor qc_buf = at::empty({in.bf16 ? 0 : br * D}, opts);
    if (symmetric) {
      col_max[slot] = at::full({N}, -inf, opts);
      col_sum[slot] = at::zeros({N}, opts);
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * br, rows = std::min(br, B - i0);
      Tensor qc = tile_view(qc_buf, in.bf16 ? 0 : rows, D);
      scaled_queries(in, qc, i0, rows);
      Tensor m_run = at::full({rows}, -inf, opts), s_run = at::zeros({rows}, opts);
      for (int64_t j0 = 0; j0 < N; j0 += bc) {
        const int64_t cols = std::min(bc, N - j0);
        Tensor t = tile_view(tile_buf, rows, cols);
        logits_tile(in, t, qc, i0, rows, j0, cols);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (!symmetric && cols == N) {  // whole rows: the exact log-sum-exp in one vectorised sweep
            simd::infonce_rows_lse(t.data_ptr<float>(), rows, N, N, i0, lse_row.data_ptr<float>() + i0,
                                   pos_ptr + i0);
            m_run.reset();
            break;
          }
        }
        read_diagonal<scalar_t>(t, i0, j0, pos_ptr);
        if (symmetric) {  // online column statistics of this worker
          Tensor cmax = col_max[slot].narrow(0, j0, cols), csum = col_sum[slot].narrow(0, j0, cols);
          Tensor new_cmax = at::maximum(cmax, at::amax(t, {0}));
          Tensor t2 = tile_view(tile2_buf, rows, cols);
          at::sub_out(t2, t, new_cmax.unsqueeze(0));
          t2.exp_();
          csum.mul_((cmax - new_cmax).exp_()).add_(t2.sum(0));
          cmax.copy_(new_cmax);
        }
        Tensor new_m = at::maximum(m_run, at::amax(t, {1}));
        t.sub_(new_m.unsqueeze(1)).exp_();
        s_run.mul_((m_run - new_m).exp_()).add_(t.sum(1));
        m_run = new_m;
      }
      if (m_run.defined()) lse_row.narrow(0, i0, rows).copy_(m_run + s_run.log());
    }
  });

  if (!symmetric) return {lse_row - pos, lse_row};
  Tensor gmax;
  for (const auto& m : col_max) {
    if (m.defined()) gmax = gmax.defined() ? at::maximum(gmax, m) : m.clone();
  }
  Tensor gsum = at::zeros({N}, opts);
  for (size_t s = 0; s < col_max.size(); ++s) {
    if (col_max[s].defined()) gsum.add_(col_sum[s] * (col_max[s] - gmax).exp_());
  }
  Tensor lse_col = gmax + gsum.log();
  return {(lse_row + lse_col - 2 * pos) * 0.5, at::cat({lse_row, lse_col})};
}

// Gradients of Σ_i w_i·row_loss_i given the saved log-sum-exps: 3 GEMMs per tile.
template <typename scalar_t>
void backward_impl(const InfoNCEInputs& in, const Tensor& w, const Tensor& lse, bool symmetric,
                   Tensor& dq, Tensor& dk, Tensor& dinv) {
  const int64_t B = in.B, N = in.N, D = in.D;
  const auto opts = in.q.options();
  const int64_t bc = std::min<int64_t>(N, std::max<int64_t>(1, tuning().infonce_max_tile_cols));
  const int64_t br = row_block(B, bc, sizeof(scalar_t));
  const int64_t nblocks = ceil_div(B, br);
  const ChunkPlan plan = plan_chunks(nblocks);
  const scalar_t* w_ptr = w.data_ptr<scalar_t>();
  const Tensor lse_row = lse.narrow(0, 0, B);
  // Symmetric: G_ij = (w_i/2)·exp(s_ij − lse_row_i) + (w_j/2)·exp(s_ij − lse_col_j) − w_i·δ_ij.
  const Tensor row_weight = symmetric ? w * 0.5 : w;
  const Tensor lse_col = symmetric ? lse.narrow(0, B, B) : Tensor();
  std::vector<GradSlot> slots(plan.count);

  parallel_chunks(nblocks, plan, [&](int64_t b0, int64_t b1, int64_t slot_index) {
    GradSlot& slot = slots[slot_index];
    slot.used = true;
    if (in.need_k) slot.dk = at::zeros({N, D}, opts);
    Tensor tile_buf = at::empty({br * bc}, opts);
    Tensor tile2_buf = symmetric ? at::empty({br * bc}, opts) : Tensor();
    Tensor qc_buf = at::empty({in.bf16 ? 0 : br * D}, opts), gk_buf = at::empty({br * D}, opts);
    Tensor g16_buf, err_row, s_buf;
    if (in.bf16) {
      g16_buf = at::empty({br * bc}, opts.dtype(at::kBFloat16));
      s_buf = at::empty({br * bc}, opts);  // the logits, kept for Σ G∘S
      slot.err_col = at::zeros({N}, opts);
      err_row = at::empty({br}, opts);
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * br, rows = std::min(br, B - i0);
      Tensor qc = tile_view(qc_buf, in.bf16 ? 0 : rows, D), gk = tile_view(gk_buf, rows, D);
      scaled_queries(in, qc, i0, rows);
      gk.zero_();
      if (in.bf16) err_row.zero_();
      double gs = 0.0;
      const Tensor lse_i = lse_row.narrow(0, i0, rows).unsqueeze(1);
      const Tensor a_i = row_weight.narrow(0, i0, rows).unsqueeze(1);
      for (int64_t j0 = 0; j0 < N; j0 += bc) {
        const int64_t cols = std::min(bc, N - j0);
        Tensor t = tile_view(tile_buf, rows, cols);
        logits_tile(in, t, qc, i0, rows, j0, cols);
        Tensor s_saved;
        if (in.bf16) s_saved = tile_view(s_buf, rows, cols).copy_(t);
        if (symmetric) {
          Tensor t2 = tile_view(tile2_buf, rows, cols);
          at::sub_out(t2, t, lse_col.narrow(0, j0, cols).unsqueeze(0));
          t2.exp_().mul_(row_weight.narrow(0, j0, cols).unsqueeze(0));
          t.sub_(lse_i).exp_().mul_(a_i).add_(t2);
        } else {
          t.sub_(lse_i).exp_().mul_(a_i);
        }
        subtract_diagonal<scalar_t>(t, i0, j0, w_ptr);
        Tensor g16;
        if (in.bf16) {
          g16 = tile_view(g16_buf, rows, cols);
          round_gradient_rows(t, g16, 0, rows, err_row.data_ptr<float>(), slot.err_col.data_ptr<float>() + j0,
                              s_saved.data_ptr<float>(), &gs);
        }
        gradient_gemms(in, t, g16, gk, 1.0, in.need_k ? slot.dk.narrow(0, j0, cols) : Tensor(), qc, i0, rows, j0,
                       cols);
      }
      slot.dinv += gs / in.c;
      finish_row_block(in, gk, i0, rows, dq, slot, err_row);
    }
  });
  std::tie(dk, dinv) = merge_grad_slots(slots, in);
}

// One pass, non-symmetric, whole rows in the tile (N ≤ max_tile_cols): exact log-sum-exp, then
// the gradient of grad_weight·Σ_i row_loss_i from the same tile: 3 GEMMs.
template <typename scalar_t>
void fused_impl(const InfoNCEInputs& in, double grad_weight, Tensor& row_loss, Tensor& lse,
                Tensor& dq, Tensor& dk, Tensor& dinv) {
  const int64_t B = in.B, N = in.N, D = in.D;
  const auto opts = in.q.options();
  const int64_t br = row_block(B, N, sizeof(scalar_t));
  const int64_t nblocks = ceil_div(B, br);
  const ChunkPlan plan = plan_chunks(nblocks);
  Tensor pos = at::empty({B}, opts);
  lse = at::empty({B}, opts);
  scalar_t* pos_ptr = pos.data_ptr<scalar_t>();
  const Tensor w = at::full({B}, grad_weight, opts);
  const scalar_t* w_ptr = w.data_ptr<scalar_t>();
  std::vector<GradSlot> slots(plan.count);

  parallel_chunks(nblocks, plan, [&](int64_t b0, int64_t b1, int64_t slot_index) {
    GradSlot& slot = slots[slot_index];
    slot.used = true;
    if (in.need_k) slot.dk = at::zeros({N, D}, opts);
    Tensor tile_buf = at::empty({br * N}, opts);
    Tensor qc_buf = at::empty({in.bf16 ? 0 : br * D}, opts), gk_buf = at::empty({br * D}, opts);
    Tensor g16_buf, err_row;
    std::vector<float> s_row;  // bf16 mode: one row of logits, kept for Σ G∘S
    if (in.bf16) {
      g16_buf = at::empty({br * N}, opts.dtype(at::kBFloat16));
      slot.err_col = at::zeros({N}, opts);
      err_row = at::empty({br}, opts);
      s_row.resize(N);
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * br, rows = std::min(br, B - i0);
      Tensor qc = tile_view(qc_buf, in.bf16 ? 0 : rows, D), gk = tile_view(gk_buf, rows, D);
      scaled_queries(in, qc, i0, rows);
      Tensor t = tile_view(tile_buf, rows, N);
      logits_tile(in, t, qc, i0, rows, 0, N);
      Tensor g16;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (in.bf16) {
          // the epilogue and the rounding to bf16 row by row, while the row is in L2
          g16 = tile_view(g16_buf, rows, N);
          err_row.zero_();
          double gs = 0.0;
          for (int64_t r = 0; r < rows; ++r) {
            float* row = t.data_ptr<float>() + r * N;
            std::copy(row, row + N, s_row.data());
            simd::infonce_rows_grad(row, 1, N, N, i0 + r, static_cast<float>(grad_weight),
                                    lse.data_ptr<float>() + i0 + r, pos_ptr + i0 + r);
            round_gradient_rows(t, g16, r, r + 1, err_row.data_ptr<float>(), slot.err_col.data_ptr<float>(),
                                s_row.data(), &gs);
          }
          slot.dinv += gs / in.c;
        } else {
          // one vectorised epilogue, row by row while the row is in L2: max, exp and Σ, G = w·P − w·δ
          simd::infonce_rows_grad(t.data_ptr<float>(), rows, N, N, i0, static_cast<float>(grad_weight),
                                  lse.data_ptr<float>() + i0, pos_ptr + i0);
        }
      } else {
        read_diagonal<scalar_t>(t, i0, 0, pos_ptr);
        Tensor m = at::amax(t, {1});
        t.sub_(m.unsqueeze(1)).exp_();
        Tensor s = t.sum(1);
        lse.narrow(0, i0, rows).copy_(m + s.log());
        t.mul_(s.reciprocal().mul_(grad_weight).unsqueeze(1));  // G = w·P
        subtract_diagonal<scalar_t>(t, i0, 0, w_ptr);              // − w·δ_ij
      }
      gradient_gemms(in, t, g16, gk, 0.0, slot.dk, qc, i0, rows, 0, N);
      finish_row_block(in, gk, i0, rows, dq, slot, err_row);
    }
  });
  row_loss = lse - pos;
  std::tie(dk, dinv) = merge_grad_slots(slots, in);
}

}  // namespace

std::tuple<Tensor, Tensor> infonce_forward(const Tensor& q, const Tensor& k, const Tensor& inv_temp,
                                           bool symmetric) {
  at::NoGradGuard no_grad;
  const InfoNCEInputs in = prepare("infonce_forward", q, k, inv_temp, symmetric);
  return AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ibkd_infonce_forward",
                                    [&] { return forward_impl<scalar_t>(in, symmetric); });
}

std::tuple<Tensor, Tensor, Tensor> infonce_backward(const Tensor& grad_rows, const Tensor& q,
                                                    const Tensor& k, const Tensor& inv_temp,
                                                    const Tensor& lse, bool symmetric, bool need_k) {
  at::NoGradGuard no_grad;
  InfoNCEInputs in = prepare("infonce_backward", q, k, inv_temp, symmetric);
  in.need_k = need_k;
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B,
              "infonce_backward: grad_rows must have shape (B,) = (", in.B, "), got ", grad_rows.sizes());
  const int64_t lse_len = symmetric ? 2 * in.B : in.B;
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == lse_len, "infonce_backward: lse must have shape (",
              lse_len, ",), got ", lse.sizes());
  const Tensor w = grad_rows.detach().to(in.q.scalar_type()).contiguous();
  const Tensor l = lse.detach().to(in.q.scalar_type()).contiguous();
  Tensor dq = at::empty({in.B, in.D}, in.q.options().dtype(in.dtype)), dk, dinv;
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ibkd_infonce_backward",
                             [&] { backward_impl<scalar_t>(in, w, l, symmetric, dq, dk, dinv); });
  return {dq, dk, dinv};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> infonce_forward_backward(
    const Tensor& q, const Tensor& k, const Tensor& inv_temp, bool symmetric, double grad_weight, bool need_k) {
  at::NoGradGuard no_grad;
  InfoNCEInputs in = prepare("infonce_forward_backward", q, k, inv_temp, symmetric);
  in.need_k = need_k;
  Tensor row_loss, lse, dk, dinv;
  Tensor dq = at::empty({in.B, in.D}, in.q.options().dtype(in.dtype));
  const bool one_pass = !symmetric && in.N <= tuning().infonce_max_tile_cols;
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ibkd_infonce_forward_backward", [&] {
    if (one_pass) {
      fused_impl<scalar_t>(in, grad_weight, row_loss, lse, dq, dk, dinv);
    } else {
      std::tie(row_loss, lse) = forward_impl<scalar_t>(in, symmetric);
      const Tensor w = at::full({in.B}, grad_weight, in.q.options());
      backward_impl<scalar_t>(in, w, lse, symmetric, dq, dk, dinv);
    }
  });
  return {row_loss, lse, dq, dk, dinv};
}

}  // namespace cpu
}  // namespace ibkd
