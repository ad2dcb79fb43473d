// Device building blocks shared by the CUDA kernels of the `cuda` backend.
//
// Every kernel here works on 64×64 tiles of a similarity matrix S = A·Bᵀ between two row blocks
// (A rows a0.., B rows b0..), computed over the feature dimension D in chunks of kTileK columns:
// tensor-core WMMA (fp32 accumulate) for half/bfloat16 inputs, plain FMA for float/double.
// The tile always lands in shared memory (in the accumulation type), so the elementwise phases
// (softmax statistics, kernel values, gradient tiles) share one simple thread mapping:
// 4 consecutive threads own one tile row, each reading 16 columns (lane4 + 4·t).
//
// This header has no torch dependency on purpose: the .cu files compile in seconds, and the
// CPU-only CI compiles them for sm_80 and sm_90 on every run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "api.cuh"

namespace ibkd_cuda {

constexpr int kThreads = 256;                        // 8 warps per CTA, every kernel
constexpr int kTile = 64;                            // rows of a tile in both directions
constexpr int kTileK = 32;                           // feature columns per similarity chunk
constexpr int kLanesPerRow = 4;                      // threads sharing a tile row (elementwise phase)
constexpr int kColsPerLane = kTile / kLanesPerRow;   // 16 columns each
static_assert(kThreads == kTile * kLanesPerRow, "elementwise mapping: 4 threads per tile row");

// Tensor-core path for the 16-bit types (sm_80+ for bfloat16 WMMA); FMA for float/double.
template <typename T> struct TileTraits {
  using acc_t = acc_of<T>;
  static constexpr bool kTensorCore = false;
};
template <> struct TileTraits<__half> {
  using acc_t = float;
  static constexpr bool kTensorCore = true;
};
template <> struct TileTraits<__nv_bfloat16> {
  using acc_t = float;
  static constexpr bool kTensorCore = true;
};
static_assert(kTile == kBlockRows, "api.cuh sizes the partial-sum workspaces with kBlockRows");

// Shared-memory leading dimensions. WMMA needs 16-byte multiples for 16-bit operands, a multiple of
// 4 floats for the fp32 accumulator and 32-byte aligned fragment pointers; the padding also spreads
// rows over banks. The FMA path pads by one element (conflict-free column walks).
template <typename T> struct TileLayout {
  static constexpr bool kTC = TileTraits<T>::kTensorCore;
  static constexpr int kLdStage = kTC ? kTileK + 8 : kTileK + 1;  // staged A/B chunks (T)
  static constexpr int kLdS = kTC ? kTile + 4 : kTile + 1;         // similarity tile (acc_t)
  static constexpr int kLdG = kTC ? kTile + 8 : kTile + 1;         // gradient-weight tile (T)
  static constexpr int kLdOther = kTC ? kTile + 8 : kTile + 1;     // 64×64 operand chunk (T)
  static constexpr int kAccPad = kTC ? 4 : 1;                      // padding of the accumulator rows

  using acc_t = typename TileTraits<T>::acc_t;
  static constexpr size_t kStageBytes = 2 * kTile * kLdStage * sizeof(T);
  static constexpr size_t kSBytes = kTile * kLdS * sizeof(acc_t);
  static constexpr size_t kOtherBytes = kTile * kLdOther * sizeof(T);
  static constexpr size_t kGBytes = kTile * kLdG * sizeof(T);

  static constexpr size_t round128(size_t b) { return (b + 127) / 128 * 128; }
  static constexpr size_t max2(size_t a, size_t b) { return a > b ? a : b; }
  // staging, the similarity tile and the operand chunk are live at different times: one union
  static constexpr size_t kUnionBytes = round128(max2(max2(kStageBytes, kSBytes), kOtherBytes));
  static constexpr size_t kForwardBytes = round128(max2(kStageBytes, kSBytes));
  static constexpr size_t kGRegionBytes = round128(kGBytes);
  __host__ __device__ static int acc_ld(int chunk_cols) { return chunk_cols + kAccPad; }
};

// ----------------------------------------------------------------------------- conversions

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

// from_acc<T>(v): the accumulation type back to the storage type (round to nearest)
template <typename T> __device__ __forceinline__ T from_acc(typename TileTraits<T>::acc_t v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

template <typename T> __device__ __forceinline__ T zero_value() {
  return from_acc<T>(typename TileTraits<T>::acc_t(0));
}

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }

// ----------------------------------------------------------------------------- reductions

// Sum over the 4 lanes that share a tile row. The xor butterfly gives all 4 lanes the bitwise same
// value (every lane adds the same pairs, and fp addition is commutative).
template <typename V> __device__ __forceinline__ V row_group_sum(V v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
template <typename V> __device__ __forceinline__ V row_group_max(V v) {
  v = fmax(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmax(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}

// Deterministic block sum (fixed shuffle tree, then warp totals in order); every thread must call
// it. The result is valid in thread 0. `scratch` holds kThreads/32 doubles.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// ----------------------------------------------------------------------------- tile loads

// Copies rows [row0, row0+kRows) × columns [col0, col0+kCols) of a row-major (nrows × ncols)
// matrix into shared memory (leading dimension kLd), writing zeros outside the matrix: ragged row
// blocks and a D that is not a multiple of the chunk contribute exact zeros to every product.
// `vec`: 16-byte loads are legal (ncols a multiple of 16/sizeof(T), base 16-byte aligned, col0 a
// multiple of 16/sizeof(T)); then a vector never straddles the end of a row.
template <typename T, int kRows, int kCols, int kLd>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int row0, int nrows,
                                          int col0, int ncols, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kCols % kVec == 0, "chunk width must be a multiple of the vector width");
  if (vec) {
    constexpr int kVecPerRow = kCols / kVec;
    for (int e = threadIdx.x; e < kRows * kVecPerRow; e += kThreads) {
      const int r = e / kVecPerRow, c = (e % kVecPerRow) * kVec;
      const int gr = row0 + r, gc = col0 + c;
      uint4 bits = make_uint4(0u, 0u, 0u, 0u);
      if (gr < nrows && gc < ncols) bits = *reinterpret_cast<const uint4*>(src + (int64_t)gr * ncols + gc);
      T* d = dst + r * kLd + c;
      if constexpr ((kLd * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<uint4*>(d) = bits;
      } else {
        T v[kVec];
        memcpy(v, &bits, sizeof(bits));  // not a pointer cast: that would break strict aliasing
#pragma unroll
        for (int i = 0; i < kVec; ++i) d[i] = v[i];
      }
    }
  } else {
    for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      const int gr = row0 + r, gc = col0 + c;
      dst[r * kLd + c] = (gr < nrows && gc < ncols) ? src[(int64_t)gr * ncols + gc] : zero_value<T>();
    }
  }
}

// ----------------------------------------------------------------------------- similarity tile

// s_out[r][c] = Σ_d A[a0+r][d]·B[b0+c][d] for the 64×64 tile (zeros outside the matrices).
// `stage` (kStageBytes) may alias `s_out`: the function synchronises before its first shared write
// (so earlier readers of either region are done) and after storing the tile (so callers may read it).
template <typename T>
__device__ __forceinline__ void similarity_tile(const T* __restrict__ a, int a0, int na, bool a_vec,
                                                const T* __restrict__ b, int b0, int nb, bool b_vec, int dim,
                                                T* stage, typename TileTraits<T>::acc_t* s_out) {
  using L = TileLayout<T>;
  using acc_t = typename TileTraits<T>::acc_t;
  T* stage_a = stage;
  T* stage_b = stage + kTile * L::kLdStage;
  if constexpr (TileTraits<T>::kTensorCore) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2, wn = warp % 2;  // warp owns rows 16·wm.. and columns 32·wn.. (two fragments)
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int k0 = 0; k0 < dim; k0 += kTileK) {
      __syncthreads();
      load_tile<T, kTile, kTileK, L::kLdStage>(stage_a, a, a0, na, k0, dim, a_vec);
      load_tile<T, kTile, kTileK, L::kLdStage>(stage_b, b, b0, nb, k0, dim, b_vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, stage_a + (wm * 16) * L::kLdStage + kk, L::kLdStage);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          // B(k, n) = stage_b[n][k]: the staged rows of B read as a column-major K×N operand
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, stage_b + (wn * 32 + f * 16) * L::kLdStage + kk, L::kLdStage);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
    }
    __syncthreads();  // staging reads done before the tile overwrites the aliased region
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(s_out + (wm * 16) * L::kLdS + wn * 32 + f * 16, acc[f], L::kLdS, wmma::mem_row_major);
    __syncthreads();
#else
    __trap();  // the host refuses devices below sm_80; this only keeps other -arch builds compiling
#endif
  } else {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // rows ty+16i, columns tx+16j
    acc_t acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
    for (int k0 = 0; k0 < dim; k0 += kTileK) {
      __syncthreads();
      load_tile<T, kTile, kTileK, L::kLdStage>(stage_a, a, a0, na, k0, dim, a_vec);
      load_tile<T, kTile, kTileK, L::kLdStage>(stage_b, b, b0, nb, k0, dim, b_vec);
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kTileK; ++kk) {
        acc_t av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = stage_a[(ty + 16 * i) * L::kLdStage + kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = stage_b[(tx + 16 * j) * L::kLdStage + kk];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s_out[(ty + 16 * i) * L::kLdS + tx + 16 * j] = acc[i][j];
    __syncthreads();
  }
}

// ----------------------------------------------------------------------------- weighted accumulate

// acc[r][c] += Σ_j w[r][j]·other[j][c] for a 64×64 block of the shared accumulator (row stride
// acc_ld), with w (64×64, kLdG) and other (64×64, kLdOther) in shared memory. Each thread (FMA
// path) or warp (WMMA path) owns fixed accumulator elements, so no two threads ever write the same
// element; callers synchronise only around the loads of `w` and `other`.
template <typename T>
__device__ __forceinline__ void accumulate_product(typename TileTraits<T>::acc_t* acc, int acc_ld, const T* w,
                                                   const T* other) {
  using L = TileLayout<T>;
  using acc_t = typename TileTraits<T>::acc_t;
  if constexpr (TileTraits<T>::kTensorCore) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2, wn = warp % 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::load_matrix_sync(c[f], acc + (wm * 16) * acc_ld + wn * 32 + f * 16, acc_ld, wmma::mem_row_major);
#pragma unroll
    for (int kk = 0; kk < kTile; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, w + (wm * 16) * L::kLdG + kk, L::kLdG);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, other + kk * L::kLdOther + wn * 32 + f * 16, L::kLdOther);
        wmma::mma_sync(c[f], fa, fb, c[f]);
      }
    }
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(acc + (wm * 16) * acc_ld + wn * 32 + f * 16, c[f], acc_ld, wmma::mem_row_major);
#else
    __trap();
#endif
  } else {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    acc_t r[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) r[i][j] = acc[(ty + 16 * i) * acc_ld + tx + 16 * j];
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      acc_t wv[4], ov[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) wv[i] = w[(ty + 16 * i) * L::kLdG + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) ov[j] = other[kk * L::kLdOther + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) r[i][j] = fma(wv[i], ov[j], r[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[(ty + 16 * i) * acc_ld + tx + 16 * j] = r[i][j];
  }
}

// Deterministic final sum of per-CTA partials: out[v] = Σ_b partials[b·nvals + v], one CTA.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const double* __restrict__ partials, int count,
                                                                int nvals, acc_t* __restrict__ out) {
  __shared__ double scratch[kThreads / 32];
  for (int v = 0; v < nvals; ++v) {
    double s = 0.0;
    for (int b = threadIdx.x; b < count; b += kThreads) s += partials[(int64_t)b * nvals + v];
    const double total = block_sum(s, scratch);
    if (threadIdx.x == 0) out[v] = static_cast<acc_t>(total);
  }
}

// Squared row norms ‖a_i‖² in the accumulation type (one warp per row, fixed shuffle tree).
template <typename T>
__global__ void __launch_bounds__(kThreads) row_sqnorm_kernel(const T* __restrict__ a, int n, int dim,
                                                              typename TileTraits<T>::acc_t* __restrict__ out) {
  using acc_t = typename TileTraits<T>::acc_t;
  const int row = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;  // whole warps exit together: the shuffles below stay warp-uniform
  acc_t s = acc_t(0);
  for (int d = lane; d < dim; d += 32) {
    const acc_t v = to_acc(a[(int64_t)row * dim + d]);
    s = fma(v, v, s);
  }
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
  if (lane == 0) out[row] = s;
}

// ----------------------------------------------------------------------------- host helpers

// 16-byte vector loads are legal for a row-major matrix with `cols` columns at `ptr`.
inline bool vec_ok(const void* ptr, int cols, size_t elem) {
  const int per_vec = static_cast<int>(16 / elem);
  return cols % per_vec == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Largest dynamic shared memory per block of the current device (opt-in limit).
inline int smem_optin_bytes(cudaError_t* err) {
  int device = 0, bytes = 0;
  *err = cudaGetDevice(&device);
  if (*err == cudaSuccess) *err = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return bytes;
}

// Feature-column chunk of a backward kernel's shared accumulator (64 rows × chunk, acc_elem bytes,
// rows padded by acc_pad): as wide as the shared memory allows after fixed_bytes (a multiple of 64),
// then evened out over the chunks that total_cols_padded needs. 0 if not even 64 columns fit.
inline int backward_chunk_cols(int total_cols_padded, size_t fixed_bytes, size_t acc_elem, int acc_pad,
                               int smem_bytes) {
  const long reserve = 2048;  // the kernels' static shared memory (reduction scratch, row sums)
  const long avail = static_cast<long>(smem_bytes) - reserve - static_cast<long>(fixed_bytes);
  if (avail <= 0) return 0;
  long max_cols = avail / (kTile * static_cast<long>(acc_elem)) - acc_pad;
  max_cols = max_cols / kTile * kTile;
  if (max_cols < kTile) return 0;
  const long units = total_cols_padded / kTile, max_units = max_cols / kTile;
  const long chunks = (units + max_units - 1) / max_units;
  const long per_chunk = (units + chunks - 1) / chunks;
  return static_cast<int>(per_chunk * kTile);
}

}  // namespace ibkd_cuda
