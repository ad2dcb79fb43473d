"""Fused InfoNCE kernels: the B×N logit matrix is only ever held tile by tile in registers.

Forward (``_lse_kernel``): one program per block of rows of ``a``; it walks the rows of ``b`` in
BLOCK_N tiles, forms ``c·a·bᵀ`` (D looped in BLOCK_D chunks) and keeps an online max / sum-of-exp per
row; the positive logit (the diagonal) is picked from the tile that holds it. Row log-sum-exps come
from (a, b) = (q, k). The symmetric column log-sum-exps come from a second launch of the same kernel
with (a, b) = (k, q) — the column LSE of q·kᵀ is the row LSE of k·qᵀ. That costs a second GEMM pass but
needs neither atomics nor cross-program partial buffers (correctness first).

Backward (``_grad_kernel``): gradient of Σ_i w_i·loss_i. With P = exp(c·S − lse) the gradient w.r.t.
the logits is, in "owner" orientation (owner = the matrix whose gradient the launch computes):

    G[a, b] = sA·wA[a]·exp(c·S[a,b] − lseA[a]) + sB·wB[b]·exp(c·S[a,b] − lseB[b]) − [a = b < B]·w[a]

    d owner[a] = c · Σ_b G[a, b] · other[b],        d c = Σ_ab G[a, b] · S[a, b]

dq: owner q, other k, A-term (lse_row, w), plus the B-term (lse_col, w) when symmetric (both halved).
dk: owner k, other q, B-term (lse_row, w), plus the A-term (lse_col, w) when symmetric (both halved).
One program owns a block of owner rows and one BLOCK_DO-wide chunk of the output features, walks all
other rows, recomputes the S tile over the full D and accumulates G·other[:, chunk] in registers: each
output element is written once by one program — deterministic, no atomics, nothing B×N in memory. For
D wider than BLOCK_DO the S tile is recomputed once per output chunk (the price of keeping the
accumulator in registers for D up to 1024+). The temperature gradient is accumulated per owner row by
the chunk-0 programs of the dq launch and summed on the host (deterministic, independent of the
autotuned tile sizes).

``infonce_forward_backward`` is the forward followed by the backward (the default of
:class:`ibkd.backend.base.Backend`); a fused single-pass variant was not written — without a GPU here
it could not be measured against this one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, acc_type, dot_precision, dot_tile, mma, prune_configs, size_bucket

if INTERPRET:
    _LSE_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 32}, num_warps=1)]
    _GRAD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 32, "BLOCK_DO": 32}, num_warps=1)]
else:  # Ampere / Hopper tile shapes; autotuned per (size bucket, D, dtype)
    _LSE_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bn, bd, w, s in [
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 3),
            (64, 128, 64, 4, 3),
            (64, 64, 64, 4, 4),
            (128, 64, 32, 4, 4),
            (64, 64, 32, 4, 2),
        ]
    ]
    _GRAD_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DO": bo}, num_warps=w, num_stages=s)
        for bm, bn, bd, bo, w, s in [
            (128, 64, 64, 256, 8, 2),
            (128, 64, 64, 128, 8, 3),
            (64, 64, 64, 256, 8, 2),
            (64, 64, 64, 128, 4, 3),
            (64, 32, 64, 256, 4, 2),
            (128, 32, 32, 128, 4, 3),
            (64, 64, 32, 64, 4, 3),
            (32, 64, 32, 64, 4, 2),
        ]
    ]


@triton.autotune(
    configs=_LSE_CONFIGS,
    key=["M_A_BUCKET", "M_B_BUCKET", "D"],
    prune_configs_by={"early_config_prune": prune_configs(["D"], "M_A_BUCKET", "M_B_BUCKET")},
)
@triton.jit
def _lse_kernel(
    a_ptr,
    b_ptr,
    inv_temp_ptr,
    lse_ptr,
    pos_ptr,
    M_A,
    M_B,
    D,
    stride_a,
    stride_b,
    M_A_BUCKET,
    M_B_BUCKET,
    WANT_POS: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M_A
    c = tl.load(inv_temp_ptr).to(ACC)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    run_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    pos = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, M_B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < M_B
        s, _sq_a, _sq_b = dot_tile(
            a_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_a, stride_b,
            BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION, False,
        )
        logits = tl.where(col_mask[None, :], s * c, float("-inf"))
        # every tile holds at least one valid column, so new_max is finite
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
        if WANT_POS:
            on_diag = (rows[:, None] == cols[None, :]) & col_mask[None, :]
            pos += tl.sum(tl.where(on_diag, logits, 0.0), axis=1)
    tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=row_mask)
    if WANT_POS:
        tl.store(pos_ptr + rows, pos, mask=row_mask)


@triton.autotune(
    configs=_GRAD_CONFIGS,
    key=["M_OWN_BUCKET", "M_OTH_BUCKET", "D"],
    prune_configs_by={"early_config_prune": prune_configs(["D"], "M_OWN_BUCKET", "M_OTH_BUCKET")},
)
@triton.jit
def _grad_kernel(
    own_ptr,
    oth_ptr,
    out_ptr,
    inv_temp_ptr,
    lse_a_ptr,
    w_a_ptr,
    lse_b_ptr,
    w_b_ptr,
    w_diag_ptr,
    dtemp_rows_ptr,
    g_scale_ptr,
    M_OWN,
    M_OTH,
    N_DIAG,
    D,
    stride_own,
    stride_oth,
    stride_out,
    scale_a,
    scale_b,
    M_OWN_BUCKET,
    M_OTH_BUCKET,
    HAS_A: tl.constexpr,
    HAS_B: tl.constexpr,
    WANT_DTEMP: tl.constexpr,
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
    row_mask = rows < M_OWN
    out_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_d_mask = out_d < D
    c = tl.load(inv_temp_ptr).to(ACC)
    g_scale = tl.load(g_scale_ptr).to(ACC)  # a power of two: dividing by it is exact
    if HAS_A:
        lse_a = tl.load(lse_a_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        coef_a = tl.load(w_a_ptr + rows, mask=row_mask, other=0.0).to(ACC) * scale_a
    w_diag = tl.load(w_diag_ptr + rows, mask=row_mask & (rows < N_DIAG), other=0.0).to(ACC)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    dtemp = tl.zeros((BLOCK_M,), dtype=ACC)
    oth_rows_base = oth_ptr + out_d[None, :]
    for n0 in range(0, M_OTH, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < M_OTH
        s, _sq_a, _sq_b = dot_tile(
            own_ptr, oth_ptr, rows, cols, row_mask, col_mask, D, stride_own, stride_oth,
            BLOCK_M, BLOCK_N, BLOCK_D, ACC, PRECISION, False,
        )
        logits = s * c
        g = tl.where((rows[:, None] == cols[None, :]), -w_diag[:, None], 0.0)
        if HAS_A:
            g += coef_a[:, None] * tl.exp(logits - lse_a[:, None])
        if HAS_B:
            lse_b = tl.load(lse_b_ptr + cols, mask=col_mask, other=0.0).to(ACC)
            coef_b = tl.load(w_b_ptr + cols, mask=col_mask, other=0.0).to(ACC) * scale_b
            g += coef_b[None, :] * tl.exp(logits - lse_b[None, :])
        g = tl.where(col_mask[None, :] & row_mask[:, None], g, 0.0)
        if WANT_DTEMP:
            dtemp += tl.sum(g * s, axis=1)
        oth = tl.load(
            oth_rows_base + cols.to(tl.int64)[:, None] * stride_oth,
            mask=col_mask[:, None] & out_d_mask[None, :],
            other=0.0,
        )
        # half inputs: G rounded to the input type so the tensor cores take it (fp32 accumulation),
        # divided by g_scale first so its entries (≤ 2·max|w| in size) sit near 1 and not among
        # float16's subnormals, where a mean's weights of ~1/B put them
        acc = mma((g / g_scale).to(oth.dtype), oth, acc, ACC, PRECISION)
    out = acc * (c * g_scale)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_out + out_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & out_d_mask[None, :],
    )
    if WANT_DTEMP:
        tl.store(dtemp_rows_ptr + rows, dtemp, mask=row_mask & (pid_d == 0))


def _launch_lse(a, b, inv_temp, lse, pos):
    m_a, d = a.shape
    m_b = b.shape[0]
    want_pos = pos is not None
    grid = lambda meta: (triton.cdiv(m_a, meta["BLOCK_M"]),)  # noqa: E731
    _lse_kernel[grid](
        a, b, inv_temp, lse, pos if want_pos else lse,
        m_a, m_b, d, a.stride(0), b.stride(0), size_bucket(m_a), size_bucket(m_b),
        WANT_POS=want_pos, ACC=acc_type(a.dtype), PRECISION=dot_precision(a.dtype),
    )


def infonce_forward(q: torch.Tensor, k: torch.Tensor, inv_temp: torch.Tensor, symmetric: bool):
    """Kernel contract of :mod:`ibkd.backend.base`: (row_loss (B,), lse (B,) or (2B,)) in acc dtype."""
    b = q.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    inv_temp = inv_temp.to(acc).contiguous()
    lse_row = torch.empty(b, dtype=acc, device=q.device)
    pos = torch.empty(b, dtype=acc, device=q.device)
    _launch_lse(q, k, inv_temp, lse_row, pos)
    if not symmetric:
        return lse_row - pos, lse_row
    lse_col = torch.empty(b, dtype=acc, device=q.device)
    _launch_lse(k, q, inv_temp, lse_col, None)
    return (lse_row + lse_col) * 0.5 - pos, torch.cat([lse_row, lse_col])


def _gradient_tile_scale(w: torch.Tensor) -> torch.Tensor:
    """2^floor(log2 max|w|) (1 for w = 0), on w's device without a host sync: every entry of G is at
    most 2·max|w| in size, so G divided by this lies within (−4, 4) and its rounding to float16 keeps
    11 bits wherever it is not negligible against the largest entry."""
    wmax = w.abs().amax()
    return torch.exp2(torch.where(wmax > 0, torch.floor(torch.log2(wmax)), torch.zeros_like(wmax))).reshape(1)


def _launch_grad(own, oth, out, inv_temp, lse_a, w_a, scale_a, lse_b, w_b, scale_b, w_diag, n_diag, dtemp_rows,
                 g_scale):
    m_own, d = own.shape
    m_oth = oth.shape[0]
    grid = lambda meta: (triton.cdiv(m_own, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DO"]))  # noqa: E731
    dummy = w_diag
    _grad_kernel[grid](
        own, oth, out, inv_temp,
        dummy if lse_a is None else lse_a, dummy if w_a is None else w_a,
        dummy if lse_b is None else lse_b, dummy if w_b is None else w_b,
        w_diag, dummy if dtemp_rows is None else dtemp_rows, g_scale,
        m_own, m_oth, n_diag, d, own.stride(0), oth.stride(0), out.stride(0),
        float(scale_a), float(scale_b), size_bucket(m_own), size_bucket(m_oth),
        HAS_A=lse_a is not None, HAS_B=lse_b is not None, WANT_DTEMP=dtemp_rows is not None,
        ACC=acc_type(own.dtype), PRECISION=dot_precision(own.dtype),
    )


def infonce_backward(grad_rows, q, k, inv_temp, lse, symmetric):
    """Kernel contract of :mod:`ibkd.backend.base`: (dq, dk, dinv_temp) of Σ_i grad_rows_i·row_loss_i."""
    b = q.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    inv_temp = inv_temp.to(acc).contiguous()
    w = grad_rows.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dtemp_rows = torch.empty(b, dtype=acc, device=q.device)
    gs = _gradient_tile_scale(w)
    if symmetric:
        lse_row, lse_col = lse[:b], lse[b:]
        _launch_grad(q, k, dq, inv_temp, lse_row, w, 0.5, lse_col, w, 0.5, w, b, dtemp_rows, gs)
        _launch_grad(k, q, dk, inv_temp, lse_col, w, 0.5, lse_row, w, 0.5, w, b, None, gs)
    else:
        _launch_grad(q, k, dq, inv_temp, lse, w, 1.0, None, None, 0.0, w, b, dtemp_rows, gs)
        _launch_grad(k, q, dk, inv_temp, None, None, 0.0, lse, w, 1.0, w, b, None, gs)
    return dq, dk, dtemp_rows.sum()
