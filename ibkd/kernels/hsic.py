"""Fused HSIC kernels: tiles of both Gram matrices, never an n×n matrix in memory.

Statistics (``_stats_kernel``): one program per block of rows i walks every column block j, builds
the x- and z-Gram tiles over the full feature dimensions (BLOCK_D chunks; the squared row norms come
out of the same loads), turns them into kernel tiles — RBF ``exp(−γ·max(‖a_i‖² + ‖a_j‖² − 2a_i·a_j, 0))``, the exponent exactly 0
for i = j, or linear ``a_i·a_j`` — and accumulates, per row, Σ_j K∘L, Σ_j K∘K, Σ_j L∘L and the row sums of K and L
in one pass. The per-row partial sums are written out and summed on the host: deterministic and
independent of the autotuned tile sizes. The full square is walked (not only the upper triangle) so
every row sum belongs to exactly one program — no atomics.

Backward (``_grad_kernel``), from the contract in :mod:`ibkd.backend.base`: for the "own" input a
(x or z) with kernel A and partner kernel P (L or K),

    Gs_ij = G_ij + G_ji = 2·g0·P_ij + 4·g_self·A_ij + gr_i + gr_j      (A, P symmetric)
    RBF:    d a_i = −2γ_a · (Σ_j W_ij · a_i − Σ_j W_ij · a_j),  W = Gs∘A
    linear: d a_i = Σ_j Gs_ij · a_j

One program owns a block of rows and a BLOCK_DO-wide chunk of the output features; both Gram tiles are
recomputed per column block and W·a[:, chunk] accumulated in registers. For half inputs W is rounded
to the input type for the tensor cores, and the row sum Σ_j W_ij is taken of the *rounded* weights,
so the RBF difference Σ_j W_ij (a_i − a_j) stays consistent (no cancellation blow-up). The launch for
x and the launch for z are the same kernel with the roles swapped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, acc_type, dot_precision, dot_tile, mma, prune_configs, size_bucket

if INTERPRET:
    _STATS_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 32}, num_warps=1)]
    _GRAD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 32, "BLOCK_DO": 32}, num_warps=1)]
else:
    # Stage counts: on an H200 (Triton 3.6) three of the earlier configs gave wrong L row sums for
    # 16-bit inputs — a few % of rows off by up to 0.9, different rows on each run, so a race in the
    # software pipeline: (128, 64, 64) with 8 warps at 2 and 3 stages, (64, 128, 64) at 3 stages; the
    # same tiles at fewer stages, and every float32 config, matched float64 to ~3e-4 (n=2048, D=768/256;
    # benchmarks/results/gpu-nvidia-h200-20261204-2/hsic-config-sweep.log). Those stage counts are lowered
    # here; tests/test_triton_backend.py::test_gpu_hsic_every_config_is_race_free sweeps every config.
    _STATS_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bn, bd, w, s in [
            (128, 64, 64, 8, 1),
            (64, 64, 64, 4, 3),
            (128, 128, 32, 8, 3),
            (64, 128, 64, 4, 2),
            (64, 32, 64, 4, 3),
            (32, 64, 32, 4, 2),
        ]
    ]
    # the (128, 64, 64) tiles at one stage, as in the statistics kernel (not yet swept on a GPU)
    _GRAD_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DO": bo}, num_warps=w, num_stages=s)
        for bm, bn, bd, bo, w, s in [
            (128, 64, 64, 256, 8, 1),
            (64, 64, 64, 256, 8, 2),
            (64, 64, 64, 128, 4, 3),
            (128, 32, 32, 128, 4, 3),
            (64, 32, 64, 64, 4, 3),
            (32, 64, 32, 64, 4, 2),
        ]
    ]


@triton.jit
def _kernel_tile(a_ptr, rows, cols, row_mask, col_mask, D, stride, gamma,
                 RBF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr):
    gram, sq_r, sq_c = dot_tile(a_ptr, a_ptr, rows, cols, row_mask, col_mask, D, stride, stride,
                                BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION, RBF)
    if RBF:
        dist2 = tl.maximum(sq_r[:, None] + sq_c[None, :] - 2.0 * gram, 0.0)
        # exactly 0 on the diagonal: the expansion leaves rounding noise ~u·‖a_i‖² there, and for
        # large rows and a large γ that made K_ii visibly less than 1 (as in the reference backend)
        dist2 = tl.where(rows[:, None] == cols[None, :], 0.0, dist2)
        k = tl.exp(-gamma * dist2)
    else:
        k = gram
    return tl.where(row_mask[:, None] & col_mask[None, :], k, 0.0)


@triton.autotune(
    configs=_STATS_CONFIGS,
    key=["N_BUCKET", "DX", "DZ"],
    prune_configs_by={"early_config_prune": prune_configs(["DX", "DZ"], "N_BUCKET", "N_BUCKET")},
)
@triton.jit
def _stats_kernel(
    x_ptr,
    z_ptr,
    gammas_ptr,
    row_sums_ptr,
    rowsum_k_ptr,
    rowsum_l_ptr,
    N,
    DX,
    DZ,
    stride_x,
    stride_z,
    N_BUCKET,
    RBF: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    gamma_x = tl.load(gammas_ptr).to(ACC)
    gamma_z = tl.load(gammas_ptr + 1).to(ACC)
    kl = tl.zeros((BLOCK_M,), dtype=ACC)
    kk = tl.zeros((BLOCK_M,), dtype=ACC)
    ll = tl.zeros((BLOCK_M,), dtype=ACC)
    rk = tl.zeros((BLOCK_M,), dtype=ACC)
    rl = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        k = _kernel_tile(x_ptr, rows, cols, row_mask, col_mask, DX, stride_x, gamma_x,
                         RBF, BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        l = _kernel_tile(z_ptr, rows, cols, row_mask, col_mask, DZ, stride_z, gamma_z,  # noqa: E741
                         RBF, BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        kl += tl.sum(k * l, axis=1)
        kk += tl.sum(k * k, axis=1)
        ll += tl.sum(l * l, axis=1)
        rk += tl.sum(k, axis=1)
        rl += tl.sum(l, axis=1)
    base = row_sums_ptr + rows * 3
    tl.store(base, kl, mask=row_mask)
    tl.store(base + 1, kk, mask=row_mask)
    tl.store(base + 2, ll, mask=row_mask)
    tl.store(rowsum_k_ptr + rows, rk, mask=row_mask)
    tl.store(rowsum_l_ptr + rows, rl, mask=row_mask)


@triton.autotune(
    configs=_GRAD_CONFIGS,
    key=["N_BUCKET", "D_OWN", "D_PAR"],
    prune_configs_by={"early_config_prune": prune_configs(["D_OWN", "D_PAR"], "N_BUCKET", "N_BUCKET")},
)
@triton.jit
def _grad_kernel(
    own_ptr,
    par_ptr,
    out_ptr,
    gammas_ptr,
    grad_sums_ptr,
    grad_rowsum_ptr,
    N,
    D_OWN,
    D_PAR,
    stride_own,
    stride_par,
    stride_out,
    N_BUCKET,
    OWN_IDX: tl.constexpr,
    RBF: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    out_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_d_mask = out_d < D_OWN
    gamma_own = tl.load(gammas_ptr + OWN_IDX).to(ACC)
    gamma_par = tl.load(gammas_ptr + (1 - OWN_IDX)).to(ACC)
    coef_par = 2.0 * tl.load(grad_sums_ptr).to(ACC)
    coef_self = 4.0 * tl.load(grad_sums_ptr + 1 + OWN_IDX).to(ACC)
    gr_rows = tl.load(grad_rowsum_ptr + rows, mask=row_mask, other=0.0).to(ACC)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    w_rowsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        a = _kernel_tile(own_ptr, rows, cols, row_mask, col_mask, D_OWN, stride_own, gamma_own,
                         RBF, BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        p = _kernel_tile(par_ptr, rows, cols, row_mask, col_mask, D_PAR, stride_par, gamma_par,
                         RBF, BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION)
        gr_cols = tl.load(grad_rowsum_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        gs = coef_par * p + coef_self * a + gr_rows[:, None] + gr_cols[None, :]
        gs = tl.where(row_mask[:, None] & col_mask[None, :], gs, 0.0)
        own_cols = tl.load(
            own_ptr + cols.to(tl.int64)[:, None] * stride_own + out_d[None, :],
            mask=col_mask[:, None] & out_d_mask[None, :],
            other=0.0,
        )
        if RBF:
            w = (gs * a).to(own_cols.dtype)
            w_rowsum += tl.sum(w.to(ACC), axis=1)
        else:
            w = gs.to(own_cols.dtype)
        acc = mma(w, own_cols, acc, ACC, PRECISION)
    if RBF:
        own_rows = tl.load(
            own_ptr + rows.to(tl.int64)[:, None] * stride_own + out_d[None, :],
            mask=row_mask[:, None] & out_d_mask[None, :],
            other=0.0,
        ).to(ACC)
        out = -2.0 * gamma_own * (w_rowsum[:, None] * own_rows - acc)
    else:
        out = acc
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_out + out_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & out_d_mask[None, :],
    )


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def hsic_stats(x: torch.Tensor, z: torch.Tensor, gammas: torch.Tensor, kernel: str):
    """Kernel contract of :mod:`ibkd.backend.base`: (sums (3,), rowsum_k (n,), rowsum_l (n,)) in acc."""
    n, dx = x.shape
    dz = z.shape[1]
    acc = _acc(x.dtype)
    gammas = gammas.to(acc).contiguous()
    row_sums = torch.empty((n, 3), dtype=acc, device=x.device)
    rowsum_k = torch.empty(n, dtype=acc, device=x.device)
    rowsum_l = torch.empty(n, dtype=acc, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
    _stats_kernel[grid](
        x, z, gammas, row_sums, rowsum_k, rowsum_l, n, dx, dz, x.stride(0), z.stride(0), size_bucket(n),
        RBF=kernel == "rbf", ACC=acc_type(x.dtype), PRECISION=dot_precision(x.dtype),
    )
    return row_sums.sum(0), rowsum_k, rowsum_l


def _launch_grad(own, par, out, gammas, grad_sums, grad_rowsum, own_idx, kernel):
    n, d_own = own.shape
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d_own, meta["BLOCK_DO"]))  # noqa: E731
    _grad_kernel[grid](
        own, par, out, gammas, grad_sums, grad_rowsum, n, d_own, par.shape[1],
        own.stride(0), par.stride(0), out.stride(0), size_bucket(n),
        OWN_IDX=own_idx, RBF=kernel == "rbf", ACC=acc_type(own.dtype), PRECISION=dot_precision(own.dtype),
    )


def hsic_stats_backward(grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel, need_x=True, need_z=True):
    """Kernel contract of :mod:`ibkd.backend.base`: (dx, dz) in the input dtype, None where not needed
    (its launch is skipped)."""
    acc = _acc(x.dtype)
    gammas = gammas.to(acc).contiguous()
    grad_sums = grad_sums.to(acc).contiguous()
    dx = dz = None
    if need_x:
        dx = torch.empty_like(x)
        _launch_grad(x, z, dx, gammas, grad_sums, grad_rowsum_k.to(acc).contiguous(), 0, kernel)
    if need_z:
        dz = torch.empty_like(z)
        _launch_grad(z, x, dz, gammas, grad_sums, grad_rowsum_l.to(acc).contiguous(), 1, kernel)
    return dx, dz
