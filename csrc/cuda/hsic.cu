// HSIC statistics kernels of the `cuda` backend (contract: ibkd/backend/base.py).
//
// K_ij = exp(−γ_x·‖x_i − x_j‖²) (rbf) or x_i·x_j (linear), L likewise from z.
//   stats     sums = (Σ K∘L, Σ K∘K, Σ L∘L), rowsum_k = K·1, rowsum_l = L·1
//   backward  W^x_ij = (2g₀·L_ij + 4g₁·K_ij + grk_i + grk_j)·(rbf ? K_ij : 1)
//             dx_i   = rbf ? −2γ_x·(x_i·Σ_j W^x_ij − Σ_j W^x_ij·x_j) : Σ_j W^x_ij·x_j
//             and for z with W^z_ij = (2g₀·K_ij + 4g₂·L_ij + grl_i + grl_j)·(rbf ? L_ij : 1).
//   (W is (G + Gᵀ)∘K of the contract, G_ij = g₀L_ij + 2g₁K_ij + grk_i, using K and L symmetric.)
//
// Both kernels: one CTA per 64-row block, looping over all 64-column blocks, so each CTA alone owns
// its rows' sums (no atomics). Squared distances come from the Gram tile, ‖x_i‖² + ‖x_j‖² − 2x_i·x_j
// clamped at 0 (exactly 0 on the diagonal). The three total sums are per-CTA partials in double,
// reduced in a fixed order by a second kernel: results are bitwise reproducible.
//
// Backward: the shared accumulator holds the CTA's 64 rows × a chunk of the concatenated
// [x columns (padded to 64) | z columns (padded to 64)], so each 64-column step reads only x or only
// z. If dx + dz does not fit the shared memory, grid.y splits the columns (each chunk recomputes
// the Gram tiles).
#include "api.cuh"
#include "tile_common.cuh"

namespace ibkd_cuda {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t kernel_value(acc_t gram, acc_t sq_i, acc_t sq_j, acc_t gamma, bool same, bool rbf) {
  if (!rbf) return gram;
  const acc_t dist2 = same ? acc_t(0) : fmax(sq_i + sq_j - acc_t(2) * gram, acc_t(0));
  return exp_acc(-gamma * dist2);
}

template <typename T> struct HsicKernelArgs {
  using acc_t = acc_of<T>;
  const T* x;
  const T* z;
  int n, dx, dz;
  bool x_vec, z_vec, rbf;
  const acc_t* gammas;
  const acc_t* sq_x;
  const acc_t* sq_z;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    hsic_stats_kernel(const HsicKernelArgs<T> p, acc_of<T>* __restrict__ rowsum_k, acc_of<T>* __restrict__ rowsum_l,
                      double* __restrict__ partials) {
  using L = TileLayout<T>;
  using acc_t = acc_of<T>;
  __shared__ __align__(128) unsigned char smem[L::kForwardBytes];
  __shared__ double reduce_scratch[kThreads / 32];
  T* stage = reinterpret_cast<T*>(smem);
  acc_t* s_tile = reinterpret_cast<acc_t*>(smem);  // aliases stage (see similarity_tile)

  const int r0 = blockIdx.x * kTile;
  const int row = threadIdx.x / kLanesPerRow, lane4 = threadIdx.x % kLanesPerRow;
  const int i = r0 + row;
  const bool row_valid = i < p.n;
  const acc_t gx = p.rbf ? p.gammas[0] : acc_t(0), gz = p.rbf ? p.gammas[1] : acc_t(0);
  const acc_t sqx_i = (p.rbf && row_valid) ? p.sq_x[i] : acc_t(0);
  const acc_t sqz_i = (p.rbf && row_valid) ? p.sq_z[i] : acc_t(0);

  double sum_kl = 0.0, sum_kk = 0.0, sum_ll = 0.0, row_k = 0.0, row_l = 0.0;
  for (int c0 = 0; c0 < p.n; c0 += kTile) {
    acc_t kv[kColsPerLane];
    similarity_tile<T>(p.x, r0, p.n, p.x_vec, p.x, c0, p.n, p.x_vec, p.dx, stage, s_tile);
#pragma unroll
    for (int t = 0; t < kColsPerLane; ++t) {
      const int col = lane4 + kLanesPerRow * t, j = c0 + col;
      const acc_t sq_j = (p.rbf && j < p.n) ? p.sq_x[j] : acc_t(0);
      kv[t] = kernel_value(s_tile[row * L::kLdS + col], sqx_i, sq_j, gx, i == j, p.rbf);
    }
    // the next similarity_tile starts with a barrier, so every thread has read s_tile by then
    similarity_tile<T>(p.z, r0, p.n, p.z_vec, p.z, c0, p.n, p.z_vec, p.dz, stage, s_tile);
    acc_t t_kl = 0, t_kk = 0, t_ll = 0, t_k = 0, t_l = 0;  // this tile's share, then folded into double
#pragma unroll
    for (int t = 0; t < kColsPerLane; ++t) {
      const int col = lane4 + kLanesPerRow * t, j = c0 + col;
      if (row_valid && j < p.n) {
        const acc_t sq_j = p.rbf ? p.sq_z[j] : acc_t(0);
        const acc_t lv = kernel_value(s_tile[row * L::kLdS + col], sqz_i, sq_j, gz, i == j, p.rbf);
        t_kl = fma(kv[t], lv, t_kl);
        t_kk = fma(kv[t], kv[t], t_kk);
        t_ll = fma(lv, lv, t_ll);
        t_k += kv[t];
        t_l += lv;
      }
    }
    sum_kl += t_kl;
    sum_kk += t_kk;
    sum_ll += t_ll;
    row_k += t_k;
    row_l += t_l;
  }
  row_k = row_group_sum(row_k);
  row_l = row_group_sum(row_l);
  if (lane4 == 0 && row_valid) {
    rowsum_k[i] = static_cast<acc_t>(row_k);
    rowsum_l[i] = static_cast<acc_t>(row_l);
  }
  const double totals[3] = {sum_kl, sum_kk, sum_ll};
#pragma unroll
  for (int v = 0; v < 3; ++v) {
    const double s = block_sum(totals[v], reduce_scratch);
    if (threadIdx.x == 0) partials[blockIdx.x * 3 + v] = s;
  }
}

template <typename T> struct HsicGradArgs {
  using acc_t = acc_of<T>;
  HsicKernelArgs<T> in;
  const acc_t* grad_sums;  // (3,)
  const acc_t* grad_rk;    // (n,)
  const acc_t* grad_rl;    // (n,)
  const acc_t* bounds;     // (2,) ≥ max|W^x|, max|W^z|
  int x_cols_padded;       // dx rounded up to 64: z columns start there in the concatenated space
  int total_cols_padded;
  int chunk_cols;
  T* dx_out;
  T* dz_out;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) hsic_grad_kernel(const HsicGradArgs<T> p) {
  using L = TileLayout<T>;
  using acc_t = acc_of<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ acc_t row_wx[kTile], row_wz[kTile];
  T* stage = reinterpret_cast<T*>(smem);
  acc_t* s_tile = reinterpret_cast<acc_t*>(smem);   // aliases stage
  T* other_chunk = reinterpret_cast<T*>(smem);      // aliases stage and s_tile
  T* wx_tile = reinterpret_cast<T*>(smem + L::kUnionBytes);
  T* wz_tile = reinterpret_cast<T*>(smem + L::kUnionBytes + L::kGRegionBytes);
  acc_t* acc = reinterpret_cast<acc_t*>(smem + L::kUnionBytes + 2 * L::kGRegionBytes);
  const int acc_ld = L::acc_ld(p.chunk_cols);
  const HsicKernelArgs<T> in = p.in;  // a copy: taking the address of a kernel parameter forces it to local memory

  const int r0 = blockIdx.x * kTile;
  const int col_begin = blockIdx.y * p.chunk_cols;
  const int col_end = min(col_begin + p.chunk_cols, p.total_cols_padded);
  const int row = threadIdx.x / kLanesPerRow, lane4 = threadIdx.x % kLanesPerRow;
  const int i = r0 + row;
  const bool row_valid = i < in.n;

  const acc_t gx = in.rbf ? in.gammas[0] : acc_t(0), gz = in.rbf ? in.gammas[1] : acc_t(0);
  const acc_t g0 = p.grad_sums[0], g1 = p.grad_sums[1], g2 = p.grad_sums[2];
  acc_t bound_x = p.bounds[0], bound_z = p.bounds[1];
  if (!(bound_x > acc_t(0))) bound_x = acc_t(1);
  if (!(bound_z > acc_t(0))) bound_z = acc_t(1);
  // W is stored divided by its bound (entries within [−1, 1]): 16-bit operands cannot overflow
  const acc_t inv_bx = acc_t(1) / bound_x, inv_bz = acc_t(1) / bound_z;
  const acc_t sqx_i = (in.rbf && row_valid) ? in.sq_x[i] : acc_t(0);
  const acc_t sqz_i = (in.rbf && row_valid) ? in.sq_z[i] : acc_t(0);
  const acc_t grk_i = row_valid ? p.grad_rk[i] : acc_t(0);
  const acc_t grl_i = row_valid ? p.grad_rl[i] : acc_t(0);

  for (int e = threadIdx.x; e < kTile * acc_ld; e += kThreads) acc[e] = acc_t(0);
  acc_t sum_wx = acc_t(0), sum_wz = acc_t(0);  // this thread's share of Σ_j W_ij / bound (rbf term)

  for (int c0 = 0; c0 < in.n; c0 += kTile) {
    acc_t kv[kColsPerLane];
    similarity_tile<T>(in.x, r0, in.n, in.x_vec, in.x, c0, in.n, in.x_vec, in.dx, stage, s_tile);
#pragma unroll
    for (int t = 0; t < kColsPerLane; ++t) {
      const int col = lane4 + kLanesPerRow * t, j = c0 + col;
      const acc_t sq_j = (in.rbf && j < in.n) ? in.sq_x[j] : acc_t(0);
      kv[t] = kernel_value(s_tile[row * L::kLdS + col], sqx_i, sq_j, gx, i == j, in.rbf);
    }
    similarity_tile<T>(in.z, r0, in.n, in.z_vec, in.z, c0, in.n, in.z_vec, in.dz, stage, s_tile);
#pragma unroll  // fully: kv[] must stay in registers
    for (int t = 0; t < kColsPerLane; ++t) {
      const int col = lane4 + kLanesPerRow * t, j = c0 + col;
      acc_t wx = acc_t(0), wz = acc_t(0);
      if (row_valid && j < in.n) {
        const acc_t sq_j = in.rbf ? in.sq_z[j] : acc_t(0);
        const acc_t lv = kernel_value(s_tile[row * L::kLdS + col], sqz_i, sq_j, gz, i == j, in.rbf);
        const acc_t k = kv[t];
        wx = acc_t(2) * g0 * lv + acc_t(4) * g1 * k + grk_i + p.grad_rk[j];
        wz = acc_t(2) * g0 * k + acc_t(4) * g2 * lv + grl_i + p.grad_rl[j];
        if (in.rbf) {
          wx *= k;
          wz *= lv;
        }
      }
      // The row sums use the stored (rounded, scaled) weights, so that for rbf
      // x_i·Σ_j W_ij − Σ_j W_ij·x_j = Σ_j W_ij·(x_i − x_j) holds for the very weights the product
      // uses: with 16-bit weights the two terms cancel, and mismatched roundings would not.
      const T wx_stored = from_acc<T>(wx * inv_bx), wz_stored = from_acc<T>(wz * inv_bz);
      sum_wx += to_acc(wx_stored);
      sum_wz += to_acc(wz_stored);
      wx_tile[row * L::kLdG + col] = wx_stored;
      wz_tile[row * L::kLdG + col] = wz_stored;
    }
    __syncthreads();  // s_tile fully read (other_chunk overwrites it); weight tiles complete

    for (int s0 = col_begin; s0 < col_end; s0 += kTile) {
      const bool is_x = s0 < p.x_cols_padded;
      const T* src = is_x ? in.x : in.z;
      load_tile<T, kTile, kTile, L::kLdOther>(other_chunk, src, c0, in.n, is_x ? s0 : s0 - p.x_cols_padded,
                                              is_x ? in.dx : in.dz, is_x ? in.x_vec : in.z_vec);
      __syncthreads();
      accumulate_product<T>(acc + (s0 - col_begin), acc_ld, is_x ? wx_tile : wz_tile, other_chunk);
      __syncthreads();  // other_chunk is reloaded next
    }
  }

  sum_wx = row_group_sum(sum_wx);
  sum_wz = row_group_sum(sum_wz);
  if (lane4 == 0) {
    row_wx[row] = sum_wx;
    row_wz[row] = sum_wz;
  }
  __syncthreads();  // row sums published; the tensor-core path wrote acc through warp fragments

  const int width = col_end - col_begin;
  for (int e = threadIdx.x; e < kTile * p.chunk_cols; e += kThreads) {
    const int r = e / p.chunk_cols, cl = e % p.chunk_cols;
    const int gi = r0 + r, s = col_begin + cl;
    if (cl >= width || gi >= in.n) continue;
    const bool is_x = s < p.x_cols_padded;
    const int col = is_x ? s : s - p.x_cols_padded;
    const int dim = is_x ? in.dx : in.dz;
    if (col >= dim) continue;
    const acc_t bound = is_x ? bound_x : bound_z;
    acc_t v = bound * acc[r * acc_ld + cl];  // Σ_j W_ij·a_j
    if (in.rbf) {
      const T* a = is_x ? in.x : in.z;
      const acc_t row_w = is_x ? row_wx[r] : row_wz[r];  // Σ_j W_ij / bound
      v = -acc_t(2) * (is_x ? gx : gz) * bound * (to_acc(a[(int64_t)gi * dim + col]) * row_w - acc[r * acc_ld + cl]);
    }
    (is_x ? p.dx_out : p.dz_out)[(int64_t)gi * dim + col] = from_acc<T>(v);
  }
}

template <typename T> HsicKernelArgs<T> kernel_args(const HsicArgs<T>& a) {
  HsicKernelArgs<T> k{};
  k.x = a.x;
  k.z = a.z;
  k.n = a.n;
  k.dx = a.dx;
  k.dz = a.dz;
  k.x_vec = vec_ok(a.x, a.dx, sizeof(T));
  k.z_vec = vec_ok(a.z, a.dz, sizeof(T));
  k.rbf = a.rbf;
  k.gammas = a.gammas;
  k.sq_x = a.sqnorm_x;
  k.sq_z = a.sqnorm_z;
  return k;
}

}  // namespace

template <typename T> cudaError_t launch_hsic_sqnorms(const HsicArgs<T>& a, cudaStream_t stream) {
  const int rows_per_cta = kThreads / 32;
  const int grid = (a.n + rows_per_cta - 1) / rows_per_cta;
  row_sqnorm_kernel<T><<<grid, kThreads, 0, stream>>>(a.x, a.n, a.dx, a.sqnorm_x);
  row_sqnorm_kernel<T><<<grid, kThreads, 0, stream>>>(a.z, a.n, a.dz, a.sqnorm_z);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_hsic_stats(const HsicArgs<T>& a, acc_of<T>* sums, acc_of<T>* rowsum_k, acc_of<T>* rowsum_l,
                              double* partials, cudaStream_t stream) {
  const int blocks = num_row_blocks(a.n);
  hsic_stats_kernel<T><<<blocks, kThreads, 0, stream>>>(kernel_args(a), rowsum_k, rowsum_l, partials);
  sum_partials_kernel<acc_of<T>><<<1, kThreads, 0, stream>>>(partials, blocks, 3, sums);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_hsic_backward(const HsicArgs<T>& a, const acc_of<T>* grad_sums, const acc_of<T>* grad_rowsum_k,
                                 const acc_of<T>* grad_rowsum_l, const acc_of<T>* bounds, T* dx_out, T* dz_out,
                                 cudaStream_t stream) {
  using L = TileLayout<T>;
  using acc_t = acc_of<T>;
  cudaError_t err = cudaSuccess;
  const int smem_bytes = smem_optin_bytes(&err);
  if (err != cudaSuccess) return err;
  HsicGradArgs<T> p{};
  p.in = kernel_args(a);
  p.grad_sums = grad_sums;
  p.grad_rk = grad_rowsum_k;
  p.grad_rl = grad_rowsum_l;
  p.bounds = bounds;
  p.x_cols_padded = (a.dx + kTile - 1) / kTile * kTile;
  p.total_cols_padded = p.x_cols_padded + (a.dz + kTile - 1) / kTile * kTile;
  const size_t fixed = L::kUnionBytes + 2 * L::kGRegionBytes;
  p.chunk_cols = backward_chunk_cols(p.total_cols_padded, fixed, sizeof(acc_t), L::kAccPad, smem_bytes);
  if (p.chunk_cols == 0) return cudaErrorInvalidConfiguration;
  p.dx_out = dx_out;
  p.dz_out = dz_out;
  const int chunks = (p.total_cols_padded + p.chunk_cols - 1) / p.chunk_cols;
  const size_t dyn_bytes = fixed + static_cast<size_t>(kTile) * L::acc_ld(p.chunk_cols) * sizeof(acc_t);
  err = cudaFuncSetAttribute(hsic_grad_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(dyn_bytes));
  if (err != cudaSuccess) return err;
  hsic_grad_kernel<T><<<dim3(num_row_blocks(a.n), chunks), kThreads, dyn_bytes, stream>>>(p);
  return cudaGetLastError();
}

#define IBKD_INSTANTIATE_HSIC(T)                                                                                   \
  template cudaError_t launch_hsic_sqnorms<T>(const HsicArgs<T>&, cudaStream_t);                                 \
  template cudaError_t launch_hsic_stats<T>(const HsicArgs<T>&, acc_of<T>*, acc_of<T>*, acc_of<T>*, double*,     \
                                            cudaStream_t);                                                        \
  template cudaError_t launch_hsic_backward<T>(const HsicArgs<T>&, const acc_of<T>*, const acc_of<T>*,           \
                                               const acc_of<T>*, const acc_of<T>*, T*, T*, cudaStream_t);

IBKD_INSTANTIATE_HSIC(float)
IBKD_INSTANTIATE_HSIC(double)
IBKD_INSTANTIATE_HSIC(__half)
IBKD_INSTANTIATE_HSIC(__nv_bfloat16)

}  // namespace ibkd_cuda
