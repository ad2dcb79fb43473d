"""The ``cuda`` backend: CUDA C++ kernels from the compiled extension (``ibkd._C.cuda``, csrc/cuda).

Flash-attention-style tiling: 64×64 similarity tiles computed on tensor cores (WMMA, fp32
accumulate) for float16/bfloat16 inputs and with plain FMA for float32/float64 (no TF32), an online
log-sum-exp per row for InfoNCE, one pass over tile pairs for the HSIC statistics; backward passes
recompute tiles from the saved statistics. Nothing B×N or n×n is stored, no float atomics are used,
and the results are bitwise reproducible run to run. See the header comments of csrc/cuda/*.cu.

Needs a CUDA device of compute capability 8.0+ (Ampere, Hopper) and an extension built with CUDA
(``IBKD_FORCE_CUDA=1`` forces it; ``IBKD_SKIP_CUDA=1`` skips it).
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import FLOAT_DTYPES, Backend
from .gpu_crossover import dense_reference_preferred

_NOT_BUILT = (
    "ibkd._C was built without CUDA kernels (torch has no CUDA / nvcc not found / IBKD_SKIP_CUDA=1); "
    "rebuild with IBKD_FORCE_CUDA=1 pip install --no-build-isolation -e . "
    "(or IBKD_FORCE_CUDA=1 python setup.py build_ext --inplace) using a CUDA build of torch and nvcc"
)


def _load_kernels():
    """(module, None) with the extension's CUDA kernels, or (None, why not). Never raises."""
    try:
        from .. import _C
    except Exception as e:  # not built, or built against another torch
        return None, (
            f"the compiled extension ibkd._C is not importable ({type(e).__name__}: {e}); "
            "build it against the installed torch, without IBKD_SKIP_EXT: pip install --no-build-isolation ibkd "
            "(in a checkout: pip install --no-build-isolation -e .)"
        )
    if not getattr(_C, "with_cuda", False) or not hasattr(_C, "cuda"):
        return None, _NOT_BUILT
    return _C.cuda, None


class CUDABackend(Backend):
    name = "cuda"
    description = "fused CUDA C++ kernels (ibkd._C.cuda): tensor-core tiles, online log-sum-exp; sm_80+"

    #: the lowest compute capability the kernels support (bfloat16 tensor-core MMA)
    MIN_CAPABILITY = (8, 0)

    def __init__(self):
        self._ops, self._reason = _load_kernels()

    # -- availability ------------------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        if self._reason is not None:
            return self._reason
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda":
            return f"runs CUDA tensors only, got a {device.type} tensor"
        if dtype not in FLOAT_DTYPES:
            return f"supports float16, bfloat16, float32 and float64, got {dtype}"
        capability = torch.cuda.get_device_capability(device)
        if capability < self.MIN_CAPABILITY:
            return (
                f"needs a GPU of compute capability >= {self.MIN_CAPABILITY[0]}.{self.MIN_CAPABILITY[1]} "
                f"(Ampere or newer), got {capability[0]}.{capability[1]}"
            )
        return None

    def priority(self, device, dtype, op, shape):
        # Below triton (20): on an H200 it took 1.83x the reference in bf16 where triton took 0.67x
        # (benchmarks/README.md, "GPU"; its 13 failures in that run were the tests'). Above the reference (0)
        # so "auto" picks it where Triton cannot run (float64 on CUDA), except for float32 work whose
        # dense work space fits (ibkd.backend.gpu_crossover).
        device = torch.device(device)
        if device.type != "cuda":
            return -1.0
        return -5.0 if dense_reference_preferred(device, dtype, op, shape) else 15.0

    # -- InfoNCE -----------------------------------------------------------------------------
    def infonce_forward(self, q, k, inv_temp, symmetric):
        return self._ops.infonce_forward(q, k, inv_temp, symmetric)

    def infonce_backward(self, grad_rows, q, k, inv_temp, lse, symmetric, need_k=True):
        # computes dk either way (not skipped yet); the op drops it when not needed
        return self._ops.infonce_backward(grad_rows, q, k, inv_temp, lse, symmetric)

    # infonce_forward_backward: the base class's forward then backward (two kernels each way)

    # -- HSIC --------------------------------------------------------------------------------
    def hsic_stats(self, x, z, gammas, kernel):
        return self._ops.hsic_stats(x, z, gammas, kernel)

    def hsic_stats_backward(self, grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel,
                            need_x=True, need_z=True):
        # computes both gradients either way (not skipped yet); the op drops the one not needed
        return self._ops.hsic_stats_backward(grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel)
