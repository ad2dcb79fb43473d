"""Triton kernels of ibkd's ``triton`` backend (installed as ``ibkd.kernels``).

* :mod:`ibkd.kernels.infonce` — InfoNCE forward (online log-sum-exp over tiles of q·kᵀ) and backward
  (tiles recomputed from the saved log-sum-exps, gradients accumulated in registers).
* :mod:`ibkd.kernels.hsic` — HSIC statistics (Σ K∘L, Σ K∘K, Σ L∘L, row sums of K and L) and their
  vector-Jacobian product, from tiles of both Gram matrices; no n×n matrix is ever written.

This package imports Triton, so import it lazily (the backend does, inside its methods): Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, and the tests set it before first use.

Shared here: the tile helper used by both kernel modules, the launch-time switches and the
autotuning policy.

Environment switches (read at every call):

* ``IBKD_TRITON_ALLOW_TF32=1`` lets float32 inputs use TF32 tensor cores in ``tl.dot`` (about 10
  mantissa bits per product, much faster on Ampere/Hopper). Default: exact IEEE float32 products.
* ``TRITON_INTERPRET=1`` (read by Triton at import) runs the kernels on CPU tensors in Triton's
  interpreter; autotuning is then replaced by one small fixed configuration.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Triton's interpreter is far too slow to autotune in: it gets one small fixed configuration.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_index() -> None:
    """Compatibility shim for Triton 3.6's interpreter under NumPy >= 2.4.

    The interpreter keeps kernel scalars as 1-element arrays and converts them with ``int(array)``
    when they bound a ``range``; NumPy 2.4 turned that conversion of ndim > 0 arrays into a
    TypeError. ``.item()`` is what the conversion always meant. Only the interpreter is touched, and
    only if its private hook looks as expected; compiled GPU kernels never run this code.
    """
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - no interpreter module in this Triton
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_ibkd_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._ibkd_index_fix = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_index()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE unless float32 inputs and ``IBKD_TRITON_ALLOW_TF32=1``."""
    if dtype == torch.float32 and os.environ.get("IBKD_TRITON_ALLOW_TF32", "0") == "1":
        return "tf32"
    return "ieee"


def acc_type(dtype: torch.dtype):
    """Accumulation type inside the kernels: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def size_bucket(m: int) -> int:
    """Autotuning key for a row count: the next power of two, so a ragged last batch of an epoch
    reuses the tuned configuration instead of retuning."""
    return triton.next_power_of_2(max(int(m), 1))


def prune_configs(dim_args, rows_arg, cols_arg):
    """``early_config_prune``: drop configs whose tiles are far larger than the problem — feature
    chunks wider than the padded feature dimension(s) named in ``dim_args`` (BLOCK_D above
    max(D, 32), BLOCK_DO above max(D, 64)), row/column tiles above max(rows, 32) / max(cols, 32)
    (``rows_arg``/``cols_arg`` name the size-bucket arguments). Small problems then compile one or
    two configs instead of benchmarking all. If nothing is left: the config with the smallest tiles."""

    def prune(configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        widest = max(triton.next_power_of_2(int(args[name])) for name in dim_args)
        rows, cols = int(args[rows_arg]), int(args[cols_arg])
        kept = [
            c
            for c in configs
            if c.kwargs.get("BLOCK_D", 0) <= max(widest, 32)
            and c.kwargs.get("BLOCK_DO", 0) <= max(widest, 64)
            and c.kwargs["BLOCK_M"] <= max(rows, 32)
            and c.kwargs["BLOCK_N"] <= max(cols, 32)
        ]
        smallest = min(
            configs,
            key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.kwargs.get("BLOCK_DO", 0), c.kwargs.get("BLOCK_D", 0)),
        )
        return kept or [smallest]

    return prune


#: Triton 3.6's interpreter multiplies bfloat16 operands of ``tl.dot`` wrongly (as raw bits); there
#: they are widened to float32 first — exact, and what the tensor cores compute (fp32 accumulation).
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with ``ACC`` accumulation (see ``_WIDEN_BF16_DOT``)."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def dot_tile(
    a_ptr,
    b_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_a,
    stride_b,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    WANT_SQ: tl.constexpr,
):
    """(a[rows]·b[cols]ᵀ, ‖a[rows]‖², ‖b[cols]‖²) over the full feature dimension D, in BLOCK_D
    chunks (ragged last chunk masked, so any D works); masked rows/columns read as zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    sq_a = tl.zeros((BLOCK_M,), dtype=ACC)
    sq_b = tl.zeros((BLOCK_N,), dtype=ACC)
    offs_d = tl.arange(0, BLOCK_D)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_b
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        a = tl.load(a_rows + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        b = tl.load(b_cols + d[:, None], mask=d_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        acc = mma(a, b, acc, ACC, PRECISION)
        if WANT_SQ:
            af = a.to(ACC)
            bf = b.to(ACC)
            sq_a += tl.sum(af * af, axis=1)
            sq_b += tl.sum(bf * bf, axis=0)
    if WANT_SQ:
        # all warps done reading this tile's shared buffers before the next dot_tile's prologue
        # refills them. Alone it did not cure the race of the HSIC statistics kernel on an H200 (see
        # the stage counts in hsic.py); the race-free configs there were measured with it in place.
        tl.debug_barrier()
    return acc, sq_a, sq_b
