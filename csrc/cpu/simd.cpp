// Element-wise epilogues of the float32 CPU kernels (see simd.h): AVX-512 or AVX2+FMA versions
// selected at run time, scalar versions otherwise (and for the bf16 rounding without AVX-512). Only standard headers here (see simd.h for why).
#include "simd.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

namespace ibkd {
namespace cpu {
namespace simd {
namespace {

// The vector epilogues are on unless set_cpu_tuning("simd", 0); which ones run depends on the CPU.
std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{true};
  return flag;
}

bool cpu_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") != 0;
  return yes;
}

bool cpu_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
  return yes;
}

// ------------------------------------------------------------------------------- scalar versions

inline float rbf_entry(float g, float sq_sum, float gamma, bool same) {
  // −γ‖a_i − a_j‖² = 2γ·a_i·a_j − γ(‖a_i‖² + ‖a_j‖²), clamped at 0 (rounding can make it positive);
  // for i == j (`same`) exactly 0: the expansion leaves noise ~u·‖a_i‖² there, which a large γ
  // turns into K_ii visibly below 1
  if (same) return 1.0f;
  return std::exp(std::min(0.0f, std::fma(2.0f * gamma, g, -gamma * sq_sum)));
}

void rows_scalar(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t diag, float w,
                 float* lse, float* pos, bool grad) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = tile + i * ld;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < cols; ++j) m = std::max(m, s[j]);
    const int64_t p = i + diag;
    if (p >= 0 && p < cols) pos[i] = s[p];
    float sum = 0.0f;
    for (int64_t j = 0; j < cols; ++j) {
      const float e = std::exp(s[j] - m);
      if (grad) s[j] = e;
      sum += e;
    }
    lse[i] = m + std::log(sum);
    if (!grad) continue;
    const float a = w / sum;
    for (int64_t j = 0; j < cols; ++j) s[j] *= a;
    if (p >= 0 && p < cols) s[p] -= w;
  }
}

void stats_scalar(const HsicTile& t, const float* gx, const float* gz, double* sums, float* rowk,
                  float* rowl, float* colk, float* coll) {
  for (int64_t i = 0; i < t.ri; ++i) {
    float kl = 0, kk = 0, ll = 0, rk = 0, rl = 0;
    for (int64_t j = 0; j < t.rj; ++j) {
      float k = gx[i * t.ld + j], l = gz[i * t.ld + j];
      if (t.rbf) {
        const bool same = t.diagonal && i == j;
        k = rbf_entry(k, t.sqx_i[i] + t.sqx_j[j], t.gamma_x, same);
        l = rbf_entry(l, t.sqz_i[i] + t.sqz_j[j], t.gamma_z, same);
      }
      kl += k * l;
      kk += k * k;
      ll += l * l;
      rk += k;
      rl += l;
      if (colk) {
        colk[j] += k;
        coll[j] += l;
      }
    }
    sums[0] += kl;
    sums[1] += kk;
    sums[2] += ll;
    rowk[i] += rk;
    rowl[i] += rl;
  }
}

void weights_scalar(const HsicTile& t, float* gx, float* gz, float g0, float g1, float g2,
                    const float* grk_i, const float* grk_j, const float* grl_i, const float* grl_j,
                    float* roww, float* rowv, float* colw, float* colv) {
  for (int64_t i = 0; i < t.ri; ++i) {
    float rw = 0, rv = 0;
    for (int64_t j = 0; j < t.rj; ++j) {
      float k = gx[i * t.ld + j], l = gz[i * t.ld + j];
      if (t.rbf) {
        const bool same = t.diagonal && i == j;
        k = rbf_entry(k, t.sqx_i[i] + t.sqx_j[j], t.gamma_x, same);
        l = rbf_entry(l, t.sqz_i[i] + t.sqz_j[j], t.gamma_z, same);
      }
      float wv = grk_i[i] + grk_j[j] + 2.0f * g0 * l + 4.0f * g1 * k;
      float vv = grl_i[i] + grl_j[j] + 2.0f * g0 * k + 4.0f * g2 * l;
      if (t.rbf) {
        wv *= k;
        vv *= l;
      }
      gx[i * t.ld + j] = wv;
      gz[i * t.ld + j] = vv;
      rw += wv;
      rv += vv;
      if (colw) {
        colw[j] += wv;
        colv[j] += vv;
      }
    }
    if (roww) {
      roww[i] += rw;
      rowv[i] += rv;
    }
  }
}

inline uint16_t bf16_round(float x, float& rounded) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    u = 0x7FC00000u;  // NaN
  } else {
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  }
  std::memcpy(&rounded, &u, 4);
  return static_cast<uint16_t>(u >> 16);
}

void round_bf16_scalar(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                       int64_t cols, bool errors, float* row_acc, float* col_acc, const float* dot_with,
                       double* dot) {
  for (int64_t i = 0; i < rows; ++i) {
    float r_sum = 0.0f, d_sum = 0.0f;
    for (int64_t j = 0; j < cols; ++j) {
      const float x = src[i * lds + j];
      if (dot) d_sum += x * dot_with[i * lds + j];
      float r;
      dst[i * ldd + j] = bf16_round(x, r);
      const float v = errors ? r - x : r;
      r_sum += v;
      if (col_acc) col_acc[j] += v;
    }
    if (row_acc) row_acc[i] += r_sum;
    if (dot) *dot += d_sum;
  }
}

// ------------------------------------------------------------------------------ AVX-512 versions

#define IBKD_AVX512 __attribute__((target("avx512f")))

// e^x for x ≤ 0 (larger x is clamped at 88): x = n·ln2 + r with |r| ≤ ln2/2 (Cody–Waite split of
// ln2), e^r by its Taylor polynomial of degree 7 (remainder ≤ r⁸/8! < 6e-9, below float32's
// half-ulp), times 2ⁿ. Arguments below −87.3 (where e^x leaves float32's normal range) give 0,
// which also keeps denormals out of the sums.
IBKD_AVX512 inline __m512 exp_ps(__m512 x) {
  const __m512 lo_limit = _mm512_set1_ps(-87.3f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo_limit, _CMP_GE_OQ);
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 high part
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);   // ln2 low part
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

IBKD_AVX512 inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1u);
}

IBKD_AVX512 void rows_avx512(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t diag,
                             float w, float* lse, float* pos, bool grad) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < rows; ++i) {
    float* s = tile + i * ld;
    // pass 1: row max (four independent accumulators hide the max latency)
    __m512 m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    int64_t j = 0;
    for (; j + 64 <= cols; j += 64) {
      m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
      m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
      m2 = _mm512_max_ps(m2, _mm512_loadu_ps(s + j + 32));
      m3 = _mm512_max_ps(m3, _mm512_loadu_ps(s + j + 48));
    }
    for (; j < cols; j += 16) m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(neg_inf, tail_mask(cols - j), s + j));
    const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    const int64_t p = i + diag;
    if (p >= 0 && p < cols) pos[i] = s[p];
    // pass 2: e = exp(s − m) (stored when the gradient follows) and Σ e
    const __m512 vm = _mm512_set1_ps(m);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (j = 0; j + 32 <= cols; j += 32) {
      const __m512 e0 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
      const __m512 e1 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), vm));
      if (grad) {
        _mm512_storeu_ps(s + j, e0);
        _mm512_storeu_ps(s + j + 16, e1);
      }
      a0 = _mm512_add_ps(a0, e0);
      a1 = _mm512_add_ps(a1, e1);
    }
    for (; j < cols; j += 16) {
      const __mmask16 k = tail_mask(cols - j);
      const __m512 e = _mm512_maskz_mov_ps(k, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vm)));
      if (grad) _mm512_mask_storeu_ps(s + j, k, e);
      a0 = _mm512_add_ps(a0, e);
    }
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    lse[i] = m + std::log(sum);
    if (!grad) continue;
    // pass 3: G = (w / Σ e)·e, then the positive's −w
    const __m512 va = _mm512_set1_ps(w / sum);
    for (j = 0; j < cols; j += 16) {
      const __mmask16 k = tail_mask(cols - j);
      _mm512_mask_storeu_ps(s + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), va));
    }
    if (p >= 0 && p < cols) s[p] -= w;
  }
}

// `same` marks the lane (if any) where i == j: its exponent is exactly 0 (see rbf_entry)
IBKD_AVX512 inline __m512 rbf_ps(__m512 g, __m512 sq_sum, __m512 two_gamma, __m512 neg_gamma, __mmask16 same) {
  const __m512 e = _mm512_min_ps(_mm512_setzero_ps(), _mm512_fmadd_ps(two_gamma, g, _mm512_mul_ps(neg_gamma, sq_sum)));
  return exp_ps(_mm512_mask_mov_ps(e, same, _mm512_setzero_ps()));
}

// The lane of columns [j, j + 16) that holds column i on a diagonal tile, as a mask (0 elsewhere):
// one compare per 16 entries, and nothing changes on the off-diagonal tiles.
IBKD_AVX512 inline __mmask16 diagonal_lane(bool diagonal, int64_t i, int64_t j) {
  return (diagonal && i >= j && i < j + 16) ? (__mmask16)(1u << (i - j)) : (__mmask16)0;
}

IBKD_AVX512 void stats_avx512(const HsicTile& t, const float* gx, const float* gz, double* sums,
                              float* rowk, float* rowl, float* colk, float* coll) {
  const __m512 tgx = _mm512_set1_ps(2.0f * t.gamma_x), ngx = _mm512_set1_ps(-t.gamma_x);
  const __m512 tgz = _mm512_set1_ps(2.0f * t.gamma_z), ngz = _mm512_set1_ps(-t.gamma_z);
  for (int64_t i = 0; i < t.ri; ++i) {
    __m512 vkl = _mm512_setzero_ps(), vkk = vkl, vll = vkl, vrk = vkl, vrl = vkl;
    const __m512 sxi = t.rbf ? _mm512_set1_ps(t.sqx_i[i]) : vkl;
    const __m512 szi = t.rbf ? _mm512_set1_ps(t.sqz_i[i]) : vkl;
    for (int64_t j = 0; j < t.rj; j += 16) {
      const __mmask16 m = tail_mask(t.rj - j);
      __m512 k = _mm512_maskz_loadu_ps(m, gx + i * t.ld + j);
      __m512 l = _mm512_maskz_loadu_ps(m, gz + i * t.ld + j);
      if (t.rbf) {
        const __mmask16 same = diagonal_lane(t.diagonal, i, j);
        k = _mm512_maskz_mov_ps(m, rbf_ps(k, _mm512_add_ps(sxi, _mm512_maskz_loadu_ps(m, t.sqx_j + j)), tgx, ngx, same));
        l = _mm512_maskz_mov_ps(m, rbf_ps(l, _mm512_add_ps(szi, _mm512_maskz_loadu_ps(m, t.sqz_j + j)), tgz, ngz, same));
      }
      vkl = _mm512_fmadd_ps(k, l, vkl);
      vkk = _mm512_fmadd_ps(k, k, vkk);
      vll = _mm512_fmadd_ps(l, l, vll);
      vrk = _mm512_add_ps(vrk, k);
      vrl = _mm512_add_ps(vrl, l);
      if (colk) {
        _mm512_mask_storeu_ps(colk + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, colk + j), k));
        _mm512_mask_storeu_ps(coll + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, coll + j), l));
      }
    }
    sums[0] += _mm512_reduce_add_ps(vkl);
    sums[1] += _mm512_reduce_add_ps(vkk);
    sums[2] += _mm512_reduce_add_ps(vll);
    rowk[i] += _mm512_reduce_add_ps(vrk);
    rowl[i] += _mm512_reduce_add_ps(vrl);
  }
}

IBKD_AVX512 void weights_avx512(const HsicTile& t, float* gx, float* gz, float g0, float g1, float g2,
                                const float* grk_i, const float* grk_j, const float* grl_i,
                                const float* grl_j, float* roww, float* rowv, float* colw, float* colv) {
  const __m512 tgx = _mm512_set1_ps(2.0f * t.gamma_x), ngx = _mm512_set1_ps(-t.gamma_x);
  const __m512 tgz = _mm512_set1_ps(2.0f * t.gamma_z), ngz = _mm512_set1_ps(-t.gamma_z);
  const __m512 c0 = _mm512_set1_ps(2.0f * g0), c1 = _mm512_set1_ps(4.0f * g1), c2 = _mm512_set1_ps(4.0f * g2);
  for (int64_t i = 0; i < t.ri; ++i) {
    __m512 vrw = _mm512_setzero_ps(), vrv = vrw;
    const __m512 sxi = t.rbf ? _mm512_set1_ps(t.sqx_i[i]) : vrw;
    const __m512 szi = t.rbf ? _mm512_set1_ps(t.sqz_i[i]) : vrw;
    const __m512 gki = _mm512_set1_ps(grk_i[i]), gli = _mm512_set1_ps(grl_i[i]);
    for (int64_t j = 0; j < t.rj; j += 16) {
      const __mmask16 m = tail_mask(t.rj - j);
      float* px = gx + i * t.ld + j;
      float* pz = gz + i * t.ld + j;
      __m512 k = _mm512_maskz_loadu_ps(m, px), l = _mm512_maskz_loadu_ps(m, pz);
      if (t.rbf) {
        const __mmask16 same = diagonal_lane(t.diagonal, i, j);
        k = rbf_ps(k, _mm512_add_ps(sxi, _mm512_maskz_loadu_ps(m, t.sqx_j + j)), tgx, ngx, same);
        l = rbf_ps(l, _mm512_add_ps(szi, _mm512_maskz_loadu_ps(m, t.sqz_j + j)), tgz, ngz, same);
      }
      __m512 wv = _mm512_add_ps(gki, _mm512_maskz_loadu_ps(m, grk_j + j));
      wv = _mm512_fmadd_ps(c0, l, wv);
      wv = _mm512_fmadd_ps(c1, k, wv);
      __m512 vv = _mm512_add_ps(gli, _mm512_maskz_loadu_ps(m, grl_j + j));
      vv = _mm512_fmadd_ps(c0, k, vv);
      vv = _mm512_fmadd_ps(c2, l, vv);
      if (t.rbf) {
        wv = _mm512_mul_ps(wv, k);
        vv = _mm512_mul_ps(vv, l);
      }
      wv = _mm512_maskz_mov_ps(m, wv);
      vv = _mm512_maskz_mov_ps(m, vv);
      _mm512_mask_storeu_ps(px, m, wv);
      _mm512_mask_storeu_ps(pz, m, vv);
      vrw = _mm512_add_ps(vrw, wv);
      vrv = _mm512_add_ps(vrv, vv);
      if (colw) {
        _mm512_mask_storeu_ps(colw + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, colw + j), wv));
        _mm512_mask_storeu_ps(colv + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, colv + j), vv));
      }
    }
    if (roww) {
      roww[i] += _mm512_reduce_add_ps(vrw);
      rowv[i] += _mm512_reduce_add_ps(vrv);
    }
  }
}

IBKD_AVX512 void round_bf16_avx512(const float* src, int64_t lds, uint16_t* dst, int64_t ldd,
                                   int64_t rows, int64_t cols, bool errors, float* row_acc,
                                   float* col_acc, const float* dot_with, double* dot) {
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u), qnan = _mm512_set1_epi32(0x7FC00000);
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * lds;
    uint16_t* d = dst + i * ldd;
    __m512 r_sum = _mm512_setzero_ps(), d_sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = cols - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - j)) - 1u);
      const __m512 x = _mm512_maskz_loadu_ps(m, s + j);
      if (dot) d_sum = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, dot_with + i * lds + j), d_sum);
      const __m512i u = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), high);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), qnan);
      _mm512_mask_cvtepi32_storeu_epi16(d + j, m, _mm512_srli_epi32(r, 16));
      __m512 v = _mm512_castsi512_ps(r);
      if (errors) v = _mm512_sub_ps(v, x);  // masked-off lanes: x = 0, rounded 0
      r_sum = _mm512_add_ps(r_sum, v);
      if (col_acc) {
        _mm512_mask_storeu_ps(col_acc + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, col_acc + j), v));
      }
    }
    if (row_acc) row_acc[i] += _mm512_reduce_add_ps(r_sum);
    if (dot) *dot += _mm512_reduce_add_ps(d_sum);
  }
}

#undef IBKD_AVX512

// --------------------------------------------------------------------------- AVX2 + FMA versions
//
// The AVX-512 arithmetic on 8 lanes, for CPUs without AVX-512 (AMD Zen 2/3, Intel before Skylake-SP):
// the same exp polynomial and clamps, tails through maskload / maskstore (masked lanes read as 0, are
// never written, and are zeroed before they reach a sum). Why: on the AVX2-only AMD EPYC (Zen 3) the
// scalar versions ran the epilogues (std::exp per entry) while every GEMM ran at MKL's AVX2 rate, and
// the fused InfoNCE at 16384 only tied torch.compile (benchmarks/README.md, the AVX2 machine).

#define IBKD_AVX2 __attribute__((target("avx2,fma")))

// e^x as exp_ps above: 2ⁿ is built in the exponent field (n ∈ [−126, 127] after the clamps, so n + 127
// is a normal exponent); lanes below −87.3 (and NaN) give +0.
IBKD_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(keep, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// lanes [0, remaining) set
IBKD_AVX2 inline __m256i tail8(int64_t remaining) {
  const int r = static_cast<int>(std::min<int64_t>(remaining, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

IBKD_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

IBKD_AVX2 inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

IBKD_AVX2 void rows_avx2(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t diag, float w,
                         float* lse, float* pos, bool grad) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < rows; ++i) {
    float* s = tile + i * ld;
    // pass 1: row max
    __m256 m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    int64_t j = 0;
    for (; j + 32 <= cols; j += 32) {
      m0 = _mm256_max_ps(m0, _mm256_loadu_ps(s + j));
      m1 = _mm256_max_ps(m1, _mm256_loadu_ps(s + j + 8));
      m2 = _mm256_max_ps(m2, _mm256_loadu_ps(s + j + 16));
      m3 = _mm256_max_ps(m3, _mm256_loadu_ps(s + j + 24));
    }
    for (; j < cols; j += 8) {
      const __m256i k = tail8(cols - j);
      m0 = _mm256_max_ps(m0, _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(s + j, k), _mm256_castsi256_ps(k)));
    }
    const float m = hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
    const int64_t p = i + diag;
    if (p >= 0 && p < cols) pos[i] = s[p];
    // pass 2: e = exp(s − m) (stored when the gradient follows) and Σ e
    const __m256 vm = _mm256_set1_ps(m);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (j = 0; j + 16 <= cols; j += 16) {
      const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
      const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), vm));
      if (grad) {
        _mm256_storeu_ps(s + j, e0);
        _mm256_storeu_ps(s + j + 8, e1);
      }
      a0 = _mm256_add_ps(a0, e0);
      a1 = _mm256_add_ps(a1, e1);
    }
    for (; j < cols; j += 8) {
      const __m256i k = tail8(cols - j);
      const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(k), exp8(_mm256_sub_ps(_mm256_maskload_ps(s + j, k), vm)));
      if (grad) _mm256_maskstore_ps(s + j, k, e);
      a0 = _mm256_add_ps(a0, e);
    }
    const float sum = hsum8(_mm256_add_ps(a0, a1));
    lse[i] = m + std::log(sum);
    if (!grad) continue;
    // pass 3: G = (w / Σ e)·e, then the positive's −w
    const __m256 va = _mm256_set1_ps(w / sum);
    for (j = 0; j + 8 <= cols; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), va));
    if (j < cols) {
      const __m256i k = tail8(cols - j);
      _mm256_maskstore_ps(s + j, k, _mm256_mul_ps(_mm256_maskload_ps(s + j, k), va));
    }
    if (p >= 0 && p < cols) s[p] -= w;
  }
}

// `same`: all-ones in the lane (if any) where i == j: its exponent is exactly 0 (see rbf_entry)
IBKD_AVX2 inline __m256 rbf8(__m256 g, __m256 sq_sum, __m256 two_gamma, __m256 neg_gamma, __m256 same) {
  const __m256 e = _mm256_min_ps(_mm256_setzero_ps(), _mm256_fmadd_ps(two_gamma, g, _mm256_mul_ps(neg_gamma, sq_sum)));
  return exp8(_mm256_andnot_ps(same, e));
}

IBKD_AVX2 inline __m256 diagonal_lane8(bool diagonal, int64_t i, int64_t j) {
  if (!diagonal || i < j || i >= j + 8) return _mm256_setzero_ps();
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_set1_epi32(static_cast<int>(i - j)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

IBKD_AVX2 void stats_avx2(const HsicTile& t, const float* gx, const float* gz, double* sums, float* rowk,
                          float* rowl, float* colk, float* coll) {
  const __m256 tgx = _mm256_set1_ps(2.0f * t.gamma_x), ngx = _mm256_set1_ps(-t.gamma_x);
  const __m256 tgz = _mm256_set1_ps(2.0f * t.gamma_z), ngz = _mm256_set1_ps(-t.gamma_z);
  for (int64_t i = 0; i < t.ri; ++i) {
    __m256 vkl = _mm256_setzero_ps(), vkk = vkl, vll = vkl, vrk = vkl, vrl = vkl;
    const __m256 sxi = t.rbf ? _mm256_set1_ps(t.sqx_i[i]) : vkl;
    const __m256 szi = t.rbf ? _mm256_set1_ps(t.sqz_i[i]) : vkl;
    for (int64_t j = 0; j < t.rj; j += 8) {
      const __m256i m = tail8(t.rj - j);
      const __m256 mf = _mm256_castsi256_ps(m);
      __m256 k = _mm256_maskload_ps(gx + i * t.ld + j, m);
      __m256 l = _mm256_maskload_ps(gz + i * t.ld + j, m);
      if (t.rbf) {
        const __m256 same = diagonal_lane8(t.diagonal, i, j);
        k = _mm256_and_ps(mf, rbf8(k, _mm256_add_ps(sxi, _mm256_maskload_ps(t.sqx_j + j, m)), tgx, ngx, same));
        l = _mm256_and_ps(mf, rbf8(l, _mm256_add_ps(szi, _mm256_maskload_ps(t.sqz_j + j, m)), tgz, ngz, same));
      }
      vkl = _mm256_fmadd_ps(k, l, vkl);
      vkk = _mm256_fmadd_ps(k, k, vkk);
      vll = _mm256_fmadd_ps(l, l, vll);
      vrk = _mm256_add_ps(vrk, k);
      vrl = _mm256_add_ps(vrl, l);
      if (colk) {
        _mm256_maskstore_ps(colk + j, m, _mm256_add_ps(_mm256_maskload_ps(colk + j, m), k));
        _mm256_maskstore_ps(coll + j, m, _mm256_add_ps(_mm256_maskload_ps(coll + j, m), l));
      }
    }
    sums[0] += hsum8(vkl);
    sums[1] += hsum8(vkk);
    sums[2] += hsum8(vll);
    rowk[i] += hsum8(vrk);
    rowl[i] += hsum8(vrl);
  }
}

IBKD_AVX2 void weights_avx2(const HsicTile& t, float* gx, float* gz, float g0, float g1, float g2,
                            const float* grk_i, const float* grk_j, const float* grl_i, const float* grl_j,
                            float* roww, float* rowv, float* colw, float* colv) {
  const __m256 tgx = _mm256_set1_ps(2.0f * t.gamma_x), ngx = _mm256_set1_ps(-t.gamma_x);
  const __m256 tgz = _mm256_set1_ps(2.0f * t.gamma_z), ngz = _mm256_set1_ps(-t.gamma_z);
  const __m256 c0 = _mm256_set1_ps(2.0f * g0), c1 = _mm256_set1_ps(4.0f * g1), c2 = _mm256_set1_ps(4.0f * g2);
  for (int64_t i = 0; i < t.ri; ++i) {
    __m256 vrw = _mm256_setzero_ps(), vrv = vrw;
    const __m256 sxi = t.rbf ? _mm256_set1_ps(t.sqx_i[i]) : vrw;
    const __m256 szi = t.rbf ? _mm256_set1_ps(t.sqz_i[i]) : vrw;
    const __m256 gki = _mm256_set1_ps(grk_i[i]), gli = _mm256_set1_ps(grl_i[i]);
    for (int64_t j = 0; j < t.rj; j += 8) {
      const __m256i m = tail8(t.rj - j);
      const __m256 mf = _mm256_castsi256_ps(m);
      float* px = gx + i * t.ld + j;
      float* pz = gz + i * t.ld + j;
      __m256 k = _mm256_maskload_ps(px, m), l = _mm256_maskload_ps(pz, m);
      if (t.rbf) {
        const __m256 same = diagonal_lane8(t.diagonal, i, j);
        k = rbf8(k, _mm256_add_ps(sxi, _mm256_maskload_ps(t.sqx_j + j, m)), tgx, ngx, same);
        l = rbf8(l, _mm256_add_ps(szi, _mm256_maskload_ps(t.sqz_j + j, m)), tgz, ngz, same);
      }
      __m256 wv = _mm256_add_ps(gki, _mm256_maskload_ps(grk_j + j, m));
      wv = _mm256_fmadd_ps(c0, l, wv);
      wv = _mm256_fmadd_ps(c1, k, wv);
      __m256 vv = _mm256_add_ps(gli, _mm256_maskload_ps(grl_j + j, m));
      vv = _mm256_fmadd_ps(c0, k, vv);
      vv = _mm256_fmadd_ps(c2, l, vv);
      if (t.rbf) {
        wv = _mm256_mul_ps(wv, k);
        vv = _mm256_mul_ps(vv, l);
      }
      wv = _mm256_and_ps(mf, wv);
      vv = _mm256_and_ps(mf, vv);
      _mm256_maskstore_ps(px, m, wv);
      _mm256_maskstore_ps(pz, m, vv);
      vrw = _mm256_add_ps(vrw, wv);
      vrv = _mm256_add_ps(vrv, vv);
      if (colw) {
        _mm256_maskstore_ps(colw + j, m, _mm256_add_ps(_mm256_maskload_ps(colw + j, m), wv));
        _mm256_maskstore_ps(colv + j, m, _mm256_add_ps(_mm256_maskload_ps(colv + j, m), vv));
      }
    }
    if (roww) {
      roww[i] += hsum8(vrw);
      rowv[i] += hsum8(vrv);
    }
  }
}

#undef IBKD_AVX2

}  // namespace

bool avx512_enabled() { return enabled_flag().load(std::memory_order_relaxed) && cpu_avx512(); }

bool avx2_enabled() { return enabled_flag().load(std::memory_order_relaxed) && !cpu_avx512() && cpu_avx2_fma(); }

bool vector_enabled() { return enabled_flag().load(std::memory_order_relaxed); }

void set_vector_enabled(bool on) { enabled_flag().store(on, std::memory_order_relaxed); }

const char* epilogue_isa() { return avx512_enabled() ? "avx512" : avx2_enabled() ? "avx2+fma" : "scalar"; }

void infonce_rows_grad(float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t diag, float w,
                       float* lse, float* pos) {
  if (avx512_enabled()) {
    rows_avx512(tile, rows, cols, ld, diag, w, lse, pos, true);
  } else if (avx2_enabled()) {
    rows_avx2(tile, rows, cols, ld, diag, w, lse, pos, true);
  } else {
    rows_scalar(tile, rows, cols, ld, diag, w, lse, pos, true);
  }
}

void infonce_rows_lse(const float* tile, int64_t rows, int64_t cols, int64_t ld, int64_t diag,
                      float* lse, float* pos) {
  // grad = false never writes to the tile
  float* t = const_cast<float*>(tile);
  if (avx512_enabled()) {
    rows_avx512(t, rows, cols, ld, diag, 0.0f, lse, pos, false);
  } else if (avx2_enabled()) {
    rows_avx2(t, rows, cols, ld, diag, 0.0f, lse, pos, false);
  } else {
    rows_scalar(t, rows, cols, ld, diag, 0.0f, lse, pos, false);
  }
}

void hsic_tile_stats(const HsicTile& t, const float* gx, const float* gz, double* sums, float* rowk,
                     float* rowl, float* colk, float* coll) {
  if (avx512_enabled()) {
    stats_avx512(t, gx, gz, sums, rowk, rowl, colk, coll);
  } else if (avx2_enabled()) {
    stats_avx2(t, gx, gz, sums, rowk, rowl, colk, coll);
  } else {
    stats_scalar(t, gx, gz, sums, rowk, rowl, colk, coll);
  }
}

void hsic_tile_weights(const HsicTile& t, float* gx, float* gz, float g0, float g1, float g2,
                       const float* grk_i, const float* grk_j, const float* grl_i,
                       const float* grl_j, float* roww, float* rowv, float* colw, float* colv) {
  if (avx512_enabled()) {
    weights_avx512(t, gx, gz, g0, g1, g2, grk_i, grk_j, grl_i, grl_j, roww, rowv, colw, colv);
  } else if (avx2_enabled()) {
    weights_avx2(t, gx, gz, g0, g1, g2, grk_i, grk_j, grl_i, grl_j, roww, rowv, colw, colv);
  } else {
    weights_scalar(t, gx, gz, g0, g1, g2, grk_i, grk_j, grl_i, grl_j, roww, rowv, colw, colv);
  }
}

void round_bf16(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows, int64_t cols,
                bool errors, float* row_acc, float* col_acc, const float* dot_with, double* dot) {
  if (avx512_enabled()) {
    round_bf16_avx512(src, lds, dst, ldd, rows, cols, errors, row_acc, col_acc, dot_with, dot);
  } else {
    round_bf16_scalar(src, lds, dst, ldd, rows, cols, errors, row_acc, col_acc, dot_with, dot);
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace ibkd
