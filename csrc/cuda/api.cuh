// Host-side interface of the CUDA kernels: plain C++ (no device code, no torch), so the torch glue in
// bindings.cpp (compiled by the host compiler) and the kernels (compiled by nvcc) share it.
//
// Pointers are device pointers to contiguous row-major arrays. T is one of float, double, __half,
// __nv_bfloat16; acc_t is double for double and float otherwise. Every launcher enqueues its
// kernels on `stream` and returns the first CUDA API error it met (cudaSuccess otherwise); the
// caller checks kernel launches itself.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace ibkd_cuda {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_of = typename AccOf<T>::type;

constexpr int kBlockRows = 64;  // rows per CTA in every kernel (sizes of the partial-sum workspaces)
inline int num_row_blocks(int rows) { return (rows + kBlockRows - 1) / kBlockRows; }

// ------------------------------------------------------------------------------------ InfoNCE

// lse[0:B] = row log-sum-exps of c·q·kᵀ, pos[i] = c·q_i·k_i; symmetric (N == B) also writes the
// column log-sum-exps to lse[B:2B].
template <typename T>
cudaError_t launch_infonce_forward(const T* q, const T* k, int B, int N, int D, const acc_of<T>* inv_temp,
                                   bool symmetric, acc_of<T>* lse, acc_of<T>* pos, cudaStream_t stream);

template <typename T> struct InfoNCEBackwardArgs {
  using acc_t = acc_of<T>;
  const T* q;
  const T* k;
  int B, N, D;
  const acc_t* inv_temp;     // 0-dim: c = 1/τ
  const acc_t* lse;          // (B,) or, symmetric, (2B,) rows then columns
  const acc_t* grad_rows;    // (B,) weights w_i of the row losses
  const acc_t* grad_absmax;  // 0-dim max_i |w_i| (scales the 16-bit tensor-core operands)
  bool symmetric;
  T* dq;                     // (B, D)
  T* dk;                     // (N, D)
  acc_t* dinv;               // 0-dim
  double* dinv_partials;     // num_row_blocks(B) doubles of workspace
};
template <typename T> cudaError_t launch_infonce_backward(const InfoNCEBackwardArgs<T>& args, cudaStream_t stream);

// ------------------------------------------------------------------------------------ HSIC

template <typename T> struct HsicArgs {
  using acc_t = acc_of<T>;
  const T* x;  // (n, dx)
  const T* z;  // (n, dz)
  int n, dx, dz;
  const acc_t* gammas;  // (2,) = (γ_x, γ_z); unused for the linear kernel
  bool rbf;             // else linear
  acc_t* sqnorm_x;      // (n,) filled by launch_hsic_sqnorms
  acc_t* sqnorm_z;      // (n,)
};

template <typename T> cudaError_t launch_hsic_sqnorms(const HsicArgs<T>& args, cudaStream_t stream);

// sums = (Σ K∘L, Σ K∘K, Σ L∘L), rowsum_k = K·1, rowsum_l = L·1. Needs the squared norms (rbf).
// partials: 3·num_row_blocks(n) doubles of workspace.
template <typename T>
cudaError_t launch_hsic_stats(const HsicArgs<T>& args, acc_of<T>* sums, acc_of<T>* rowsum_k, acc_of<T>* rowsum_l,
                              double* partials, cudaStream_t stream);

// Vector-Jacobian product of the statistics. bounds (2,) bound |W| of the x and z weight tiles (see
// hsic.cu); they scale the 16-bit tensor-core operands into range. Needs the squared norms.
template <typename T>
cudaError_t launch_hsic_backward(const HsicArgs<T>& args, const acc_of<T>* grad_sums, const acc_of<T>* grad_rowsum_k,
                                 const acc_of<T>* grad_rowsum_l, const acc_of<T>* bounds, T* dx_out, T* dz_out,
                                 cudaStream_t stream);

}  // namespace ibkd_cuda
