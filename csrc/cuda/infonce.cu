// InfoNCE forward and backward kernels of the `cuda` backend (contract: ibkd/backend/base.py).
//
// With s_ij = c·q_i·k_j (c = 1/τ):
//   forward   lse_i = logsumexp_j s_ij, pos_i = s_ii; symmetric adds the column lse_j = logsumexp_i s_ij.
//   backward  G_ij  = w_i·(P_ij − δ_ij),                     P_ij = exp(s_ij − lse_i)
//             (symmetric: G_ij = ½w_i·P_ij + ½w_j·P^c_ij − δ_ij·w_i, P^c_ij = exp(s_ij − lse^c_j))
//             dq = c·G·k,  dk = c·Gᵀ·q,  dinv = Σ_ij G_ij·(q_i·k_j).
//
// Forward: one CTA per 64-row block of its "owner" matrix, looping over 64-row tiles of the other
// matrix with an online max / log-sum-exp per row (flash-attention style; nothing B×N is stored).
// The column log-sum-exps are the row log-sum-exps of k·qᵀ: the same kernel with the roles swapped.
//
// Backward: the same owner/other structure, once with owner q (→ dq, plus dinv partials) and once
// with owner k (→ dk). Each CTA recomputes a similarity tile, forms the gradient tile in shared
// memory from the saved log-sum-exps, and accumulates tile·other-rows into a shared-memory
// accumulator of its 64 owner rows × a chunk of the feature columns. When D does not fit the shared
// memory in one chunk, the grid's y dimension splits D into chunks (each chunk recomputes the
// similarity tiles). Each output element has exactly one owner thread: no atomics anywhere, and the
// temperature gradient is a per-CTA partial sum reduced in a fixed order by a second kernel, so
// every result is bitwise reproducible.
#include "api.cuh"
#include "tile_common.cuh"

namespace ibkd_cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    infonce_lse_kernel(const T* __restrict__ owner, int n_owner, bool owner_vec, const T* __restrict__ other,
                       int n_other, bool other_vec, int dim, const acc_of<T>* __restrict__ inv_temp,
                       acc_of<T>* __restrict__ lse, acc_of<T>* __restrict__ pos) {
  using L = TileLayout<T>;
  using acc_t = acc_of<T>;
  __shared__ __align__(128) unsigned char smem[L::kForwardBytes];
  T* stage = reinterpret_cast<T*>(smem);
  acc_t* s_tile = reinterpret_cast<acc_t*>(smem);  // aliases the staging buffers (see similarity_tile)

  const acc_t c = *inv_temp;
  const int r0 = blockIdx.x * kTile;
  const int row = threadIdx.x / kLanesPerRow, lane4 = threadIdx.x % kLanesPerRow;
  const int i = r0 + row;
  const acc_t neg_inf = acc_t(-INFINITY);

  acc_t run_max = neg_inf, run_sum = acc_t(0);
  for (int o0 = 0; o0 < n_other; o0 += kTile) {
    similarity_tile<T>(owner, r0, n_owner, owner_vec, other, o0, n_other, other_vec, dim, stage, s_tile);
    acc_t logit[kColsPerLane];
    acc_t tile_max = neg_inf;
#pragma unroll
    for (int t = 0; t < kColsPerLane; ++t) {
      const int col = lane4 + kLanesPerRow * t, j = o0 + col;
      const acc_t v = c * s_tile[row * L::kLdS + col];
      logit[t] = j < n_other ? v : neg_inf;
      tile_max = fmax(tile_max, logit[t]);
      if (pos != nullptr && j == i && i < n_owner) pos[i] = v;  // exactly one thread sees (i, i)
    }
    // Every tile holds at least one real column (o0 < n_other), so the new max is finite.
    const acc_t new_max = fmax(run_max, row_group_max(tile_max));
    acc_t tile_sum = acc_t(0);
#pragma unroll
    for (int t = 0; t < kColsPerLane; ++t) tile_sum += exp_acc(logit[t] - new_max);  // exp(−inf) = 0
    run_sum = run_sum * exp_acc(run_max - new_max) + row_group_sum(tile_sum);
    run_max = new_max;
  }
  if (lane4 == 0 && i < n_owner) lse[i] = run_max + log_acc(run_sum);
}

template <typename T> struct GradKernelArgs {
  using acc_t = acc_of<T>;
  const T* owner;
  int n_owner;
  bool owner_vec;
  const T* other;
  int n_other;
  bool other_vec;
  int dim;
  int chunk_cols;  // feature columns per CTA (multiple of 64); grid.y = number of chunks
  int B;           // number of queries
  bool symmetric;
  const acc_t* inv_temp;
  const acc_t* lse_row;  // (B,)
  const acc_t* lse_col;  // (B,) when symmetric
  const acc_t* w;        // (B,)
  const acc_t* w_absmax;
  T* out;                // (n_owner, dim)
  double* dinv_partials; // per row block, only for owner = q
};

// kOwnerIsKey = false: owner q (rows i), other k (columns j) → dq and the dinv partials.
// kOwnerIsKey = true:  owner k (rows j), other q (columns i) → dk.
template <typename T, bool kOwnerIsKey>
__global__ void __launch_bounds__(kThreads) infonce_grad_kernel(const GradKernelArgs<T> p) {
  using L = TileLayout<T>;
  using acc_t = acc_of<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ double reduce_scratch[kThreads / 32];
  T* stage = reinterpret_cast<T*>(smem);
  acc_t* s_tile = reinterpret_cast<acc_t*>(smem);          // aliases stage
  T* other_chunk = reinterpret_cast<T*>(smem);             // aliases stage and s_tile
  T* g_tile = reinterpret_cast<T*>(smem + L::kUnionBytes);
  acc_t* acc = reinterpret_cast<acc_t*>(smem + L::kUnionBytes + L::kGRegionBytes);
  const int acc_ld = L::acc_ld(p.chunk_cols);

  const acc_t c = *p.inv_temp;
  acc_t w_scale = *p.w_absmax;
  if (!(w_scale > acc_t(0))) w_scale = acc_t(1);  // all-zero weights: any scale works
  // The gradient tile is stored as G/max|w| (entries within [−2, 2]) so that 16-bit operands never
  // overflow, whatever the upstream gradient scale (e.g. a GradScaler's 2^16).
  const acc_t inv_w_scale = acc_t(1) / w_scale;
  const acc_t half = acc_t(0.5);

  const int r0 = blockIdx.x * kTile;
  const int col_begin = blockIdx.y * p.chunk_cols;
  const int col_end = min(col_begin + p.chunk_cols, (p.dim + kTile - 1) / kTile * kTile);
  const int row = threadIdx.x / kLanesPerRow, lane4 = threadIdx.x % kLanesPerRow;
  const int r_idx = r0 + row;
  const bool row_valid = r_idx < p.n_owner;

  // per-owner-row constants: the row statistics of q_i, or the column statistics of k_j
  acc_t own_lse = acc_t(0), own_w = acc_t(0);
  if (row_valid) {
    if (!kOwnerIsKey) {
      own_lse = p.lse_row[r_idx];
      own_w = p.w[r_idx];
    } else if (p.symmetric) {
      own_lse = p.lse_col[r_idx];
      own_w = p.w[r_idx];
    }
  }

  for (int e = threadIdx.x; e < kTile * acc_ld; e += kThreads) acc[e] = acc_t(0);
  double dinv_acc = 0.0;

  for (int o0 = 0; o0 < p.n_other; o0 += kTile) {
    // starts with a barrier: the previous tile's readers of other_chunk / g_tile are done
    similarity_tile<T>(p.owner, r0, p.n_owner, p.owner_vec, p.other, o0, p.n_other, p.other_vec, p.dim, stage,
                       s_tile);
#pragma unroll 4
    for (int t = 0; t < kColsPerLane; ++t) {
      const int col = lane4 + kLanesPerRow * t, o_idx = o0 + col;
      acc_t g = acc_t(0);
      if (row_valid && o_idx < p.n_other) {
        const acc_t s = s_tile[row * L::kLdS + col];
        const acc_t logit = c * s;
        const int i = kOwnerIsKey ? o_idx : r_idx;
        const int j = kOwnerIsKey ? r_idx : o_idx;
        const acc_t lse_i = kOwnerIsKey ? p.lse_row[i] : own_lse;
        const acc_t w_i = kOwnerIsKey ? p.w[i] : own_w;
        if (p.symmetric) {
          const acc_t lse_j = kOwnerIsKey ? own_lse : p.lse_col[j];
          const acc_t w_j = kOwnerIsKey ? own_w : p.w[j];
          g = half * w_i * exp_acc(logit - lse_i) + half * w_j * exp_acc(logit - lse_j);
        } else {
          g = w_i * exp_acc(logit - lse_i);
        }
        if (i == j) g -= w_i;
        if (!kOwnerIsKey) dinv_acc += static_cast<double>(g) * static_cast<double>(s);
      }
      g_tile[row * L::kLdG + col] = from_acc<T>(g * inv_w_scale);
    }
    __syncthreads();  // s_tile fully read (other_chunk overwrites it) and g_tile complete

    for (int d0 = col_begin; d0 < col_end; d0 += kTile) {
      load_tile<T, kTile, kTile, L::kLdOther>(other_chunk, p.other, o0, p.n_other, d0, p.dim, p.other_vec);
      __syncthreads();
      accumulate_product<T>(acc + (d0 - col_begin), acc_ld, g_tile, other_chunk);
      __syncthreads();  // other_chunk is reloaded next
    }
  }

  __syncthreads();  // the tensor-core path wrote acc through warp fragments
  const acc_t out_scale = c * w_scale;
  const int width = col_end - col_begin;
  for (int e = threadIdx.x; e < kTile * p.chunk_cols; e += kThreads) {
    const int r = e / p.chunk_cols, cl = e % p.chunk_cols;
    const int gi = r0 + r, d = col_begin + cl;
    if (cl < width && gi < p.n_owner && d < p.dim)
      p.out[(int64_t)gi * p.dim + d] = from_acc<T>(out_scale * acc[r * acc_ld + cl]);
  }

  if (!kOwnerIsKey && blockIdx.y == 0) {  // block-uniform condition: every thread enters block_sum
    const double total = block_sum(dinv_acc, reduce_scratch);
    if (threadIdx.x == 0) p.dinv_partials[blockIdx.x] = total;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_infonce_forward(const T* q, const T* k, int B, int N, int D, const acc_of<T>* inv_temp,
                                   bool symmetric, acc_of<T>* lse, acc_of<T>* pos, cudaStream_t stream) {
  const bool q_vec = vec_ok(q, D, sizeof(T)), k_vec = vec_ok(k, D, sizeof(T));
  infonce_lse_kernel<T><<<num_row_blocks(B), kThreads, 0, stream>>>(q, B, q_vec, k, N, k_vec, D, inv_temp, lse, pos);
  if (symmetric)  // column log-sum-exps = row log-sum-exps of k·qᵀ
    infonce_lse_kernel<T><<<num_row_blocks(N), kThreads, 0, stream>>>(k, N, k_vec, q, B, q_vec, D, inv_temp,
                                                                      lse + B, nullptr);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_infonce_backward(const InfoNCEBackwardArgs<T>& a, cudaStream_t stream) {
  using L = TileLayout<T>;
  using acc_t = acc_of<T>;
  cudaError_t err = cudaSuccess;
  const int smem_bytes = smem_optin_bytes(&err);
  if (err != cudaSuccess) return err;
  const int padded = (a.D + kTile - 1) / kTile * kTile;
  const size_t fixed = L::kUnionBytes + L::kGRegionBytes;
  const int chunk = backward_chunk_cols(padded, fixed, sizeof(acc_t), L::kAccPad, smem_bytes);
  if (chunk == 0) return cudaErrorInvalidConfiguration;
  const int chunks = (padded + chunk - 1) / chunk;
  const size_t dyn_bytes = fixed + static_cast<size_t>(kTile) * L::acc_ld(chunk) * sizeof(acc_t);

  const bool q_vec = vec_ok(a.q, a.D, sizeof(T)), k_vec = vec_ok(a.k, a.D, sizeof(T));
  GradKernelArgs<T> p{};
  p.dim = a.D;
  p.chunk_cols = chunk;
  p.B = a.B;
  p.symmetric = a.symmetric;
  p.inv_temp = a.inv_temp;
  p.lse_row = a.lse;
  p.lse_col = a.symmetric ? a.lse + a.B : nullptr;
  p.w = a.grad_rows;
  p.w_absmax = a.grad_absmax;

  GradKernelArgs<T> pq = p;  // owner q → dq, dinv partials
  pq.owner = a.q, pq.n_owner = a.B, pq.owner_vec = q_vec;
  pq.other = a.k, pq.n_other = a.N, pq.other_vec = k_vec;
  pq.out = a.dq, pq.dinv_partials = a.dinv_partials;
  GradKernelArgs<T> pk = p;  // owner k → dk
  pk.owner = a.k, pk.n_owner = a.N, pk.owner_vec = k_vec;
  pk.other = a.q, pk.n_other = a.B, pk.other_vec = q_vec;
  pk.out = a.dk, pk.dinv_partials = nullptr;

  err = cudaFuncSetAttribute(infonce_grad_kernel<T, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(dyn_bytes));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(infonce_grad_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(dyn_bytes));
  if (err != cudaSuccess) return err;

  infonce_grad_kernel<T, false><<<dim3(num_row_blocks(a.B), chunks), kThreads, dyn_bytes, stream>>>(pq);
  infonce_grad_kernel<T, true><<<dim3(num_row_blocks(a.N), chunks), kThreads, dyn_bytes, stream>>>(pk);
  sum_partials_kernel<acc_t><<<1, kThreads, 0, stream>>>(a.dinv_partials, num_row_blocks(a.B), 1, a.dinv);
  return cudaGetLastError();
}

#define IBKD_INSTANTIATE_INFONCE(T)                                                                             \
  template cudaError_t launch_infonce_forward<T>(const T*, const T*, int, int, int, const acc_of<T>*, bool,   \
                                                 acc_of<T>*, acc_of<T>*, cudaStream_t);                       \
  template cudaError_t launch_infonce_backward<T>(const InfoNCEBackwardArgs<T>&, cudaStream_t);

IBKD_INSTANTIATE_INFONCE(float)
IBKD_INSTANTIATE_INFONCE(double)
IBKD_INSTANTIATE_INFONCE(__half)
IBKD_INSTANTIATE_INFONCE(__nv_bfloat16)

}  // namespace ibkd_cuda
