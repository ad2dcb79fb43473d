"""The ``triton`` backend: fused Triton kernels (:mod:`ibkd.kernels`) for InfoNCE and HSIC.

Runs CUDA tensors; CPU tensors only in Triton's interpreter (``TRITON_INTERPRET=1``, set before the
first use — the tests do this when no GPU is present). The kernel modules are imported lazily inside
the methods, because Triton reads ``TRITON_INTERPRET`` when a kernel is decorated.

Precision: float16/bfloat16/float32 inputs accumulate in float32 (float32 products are exact IEEE
unless ``IBKD_TRITON_ALLOW_TF32=1``); float64 runs under the interpreter only (see :meth:`supports`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .base import FLOAT_DTYPES, Backend
from .gpu_crossover import dense_reference_preferred

_CPU_REASON = (
    "Triton needs a CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton kernels (online log-sum-exp InfoNCE, tiled HSIC); CUDA, or CPU in the interpreter"

    def __init__(self):
        # never raise here: a missing Triton becomes the unavailable reason
        try:
            import triton  # noqa: F401

            self._import_error: Optional[str] = None
        except Exception as e:  # ImportError, or a broken install
            self._import_error = f"triton is not importable ({type(e).__name__}: {e}); pip install triton"

    def unavailable_reason(self) -> Optional[str]:
        return self._import_error

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in FLOAT_DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32, float64)"
        if device.type == "cuda":
            if dtype == torch.float64:
                # fp64 tl.dot / exp are only verified in the interpreter; not claimed on GPUs
                return "float64 inputs are not supported by the Triton kernels on GPU; use backend='reference'"
            return None
        if device.type == "cpu":
            return None if _interpreting() else _CPU_REASON
        return f"Triton runs CUDA tensors (or CPU ones in its interpreter), got device type {device.type!r}"

    def priority(self, device, dtype, op, shape):
        # never let "auto" pick the (very slow) interpreter on CPU; on a GPU, first in bf16/fp16
        # (measured 0.65-0.76x the reference on an H200), behind the reference for float32 work that fits
        if device.type != "cuda":
            return -10.0
        return -5.0 if dense_reference_preferred(device, dtype, op, shape) else 20.0

    @staticmethod
    def _on(device: torch.device):
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    # -- InfoNCE -----------------------------------------------------------------------------
    def infonce_forward(self, q, k, inv_temp, symmetric):
        from ibkd.kernels import infonce

        with self._on(q.device):
            return infonce.infonce_forward(q, k, inv_temp, symmetric)

    def infonce_backward(self, grad_rows, q, k, inv_temp, lse, symmetric, need_k=True):
        # computes dk either way (not skipped yet); the op drops it when not needed
        from ibkd.kernels import infonce

        with self._on(q.device):
            return infonce.infonce_backward(grad_rows, q, k, inv_temp, lse, symmetric)

    # infonce_forward_backward: the base class's forward-then-backward (see ibkd.kernels.infonce)

    # -- HSIC --------------------------------------------------------------------------------
    def hsic_stats(self, x, z, gammas, kernel):
        from ibkd.kernels import hsic

        with self._on(x.device):
            return hsic.hsic_stats(x, z, gammas, kernel)

    def hsic_stats_backward(self, grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel,
                            need_x=True, need_z=True):
        from ibkd.kernels import hsic

        with self._on(x.device):
            return hsic.hsic_stats_backward(grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel,
                                            need_x, need_z)
