// Element-wise epilogues of the float32 CPU kernels, on raw row-major tiles.
//
// Each function makes one or two passes over a tile that a GEMM has just written, instead of the
// five to ten separate ATen element-wise ops (each a full pass over the tile, plus dispatch and
// temporaries) the kernels used before. simd.cpp has AVX-512 and AVX2+FMA versions (chosen at run time,
// the package is built for baseline x86-64) and a portable scalar version with the same arithmetic.
// No torch header is included here or in simd.cpp: code compiled for AVX-512 must not be able to
// end up in an inline torch function that the rest of the extension shares.
#pragma once

#include <cstdint>

namespace ibkd {
namespace cpu {
namespace simd {

// Which versions run: AVX-512 where the CPU has it, else AVX2+FMA, else scalar; set_cpu_tuning("simd", 0)
// (set_vector_enabled(false)) forces the scalar ones. epilogue_isa(): "avx512", "avx2+fma" or "scalar".
bool avx512_enabled();
bool avx2_enabled();
bool vector_enabled();
void set_vector_enabled(bool on);
const char* epilogue_isa();

// InfoNCE, one block of whole rows (`cols` = N logits per row, row stride `ld`).
// For every row i: lse[i] = log Σ_j exp(s_ij); pos[i] = s_i,(i+diag) (the positive logit, when
// 0 ≤ i + diag < cols); then the row is overwritten by the gradient w.r.t. the logits of
// w·(lse_i − s_i,i+diag): G_ij = w·exp(s_ij − lse_i) − w·δ_j,i+diag.
// Three passes per row (max; exp and sum; scale and positive), the row stays in L2 between them.
void infonce_rows_grad(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t diag, float w,
                       float* lse, float* pos);

// The same without the gradient (forward only): lse and pos, tile left unchanged.
void infonce_rows_lse(const float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t diag,
                      float* lse, float* pos);

// HSIC, one tile pair (I, J): gx, gz hold the Gram tiles X_I X_Jᵀ and Z_I Z_Jᵀ (ri × rj, stride ld).
// RBF (rbf = true): K_ij = exp(min(0, 2γx·gx_ij − γx·(sqx_i[i] + sqx_j[j]))), likewise L from gz;
// linear: K = gx, L = gz. On a diagonal tile pair (I == J, so ri == rj) the RBF exponent of entry
// (i, i) is exactly 0: K_ii = L_ii = 1, not exp of the expansion's rounding noise. Adds Σ K∘L, Σ K∘K, Σ L∘L of the tile to sums[0..2] (float64), the row
// sums of K and L to rowk[0..ri), rowl[0..ri), and, if colk is not null, the column sums to
// colk[0..rj), coll[0..rj). The tiles are left unchanged.
struct HsicTile {
  int64_t ri, rj, ld;
  const float *sqx_i, *sqx_j, *sqz_i, *sqz_j;  // squared row norms (RBF only)
  float gamma_x, gamma_z;
  bool rbf;
  bool diagonal;  // I == J: entry (i, i) of the tile is the diagonal of K and L
};
void hsic_tile_stats(const HsicTile& t, const float* gx, const float* gz, double* sums, float* rowk,
                     float* rowl, float* colk, float* coll);

// HSIC backward weights of one tile pair, in place: gx becomes W and gz becomes V,
//   W_ij = (grk_i[i] + grk_j[j] + 2·g0·L_ij + 4·g1·K_ij) · (K_ij for RBF, 1 for linear)
//   V_ij = (grl_i[i] + grl_j[j] + 2·g0·K_ij + 4·g2·L_ij) · (L_ij for RBF, 1 for linear)
// and (RBF only, when the pointers are not null) the row sums of W and V are added to roww/rowv
// and the column sums to colw/colv.
void hsic_tile_weights(const HsicTile& t, float* gx, float* gz, float g0, float g1, float g2,
                       const float* grk_i, const float* grk_j, const float* grl_i,
                       const float* grl_j, float* roww, float* rowv, float* colw, float* colv);

// Rounds a float32 tile (rows × cols, row stride lds) to bfloat16 bits in dst (row stride ldd): round
// to nearest even, as torch rounds; NaN stays NaN. The bf16 kernels' product GEMMs take their
// float32 weight tiles (InfoNCE's G, HSIC's W and V) this way. With errors = false the row sums of
// the rounded values are added to row_acc[0..rows) and the column sums to col_acc[0..cols); with
// errors = true the sums of (rounded − original) instead. Null accumulators are skipped. If dot is
// not null, Σ_ij src_ij·dot_with_ij (the unrounded values; dot_with has src's row stride) is added to
// *dot in float64.
void round_bf16(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows, int64_t cols,
                bool errors, float* row_acc, float* col_acc, const float* dot_with = nullptr,
                double* dot = nullptr);

}  // namespace simd
}  // namespace cpu
}  // namespace ibkd
