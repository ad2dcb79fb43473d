"""The ``cpu`` backend: fused C++ kernels from the compiled extension ``ibkd._C`` (csrc/cpu).

The kernels tile the B×N logits and the n×n kernel matrices (never materialising them), use
BLAS-backed tile GEMMs and ``at::parallel_for`` over row blocks / tile pairs. InfoNCE forward +
backward takes 3 GEMM-equivalents in one pass (4 when symmetric); HSIC computes only the upper
triangle of tiles. See the header comments of csrc/cpu/infonce.cpp and csrc/cpu/hsic.cpp.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import FLOAT_DTYPES, Backend

try:
    from .. import _C

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # the extension is not built: the backend reports why instead of failing
    _C = None
    _IMPORT_ERROR = e


#: Problem sizes below which the dense reference is faster than the fused kernels on CPU, so
#: ``backend="auto"`` picks the reference there: InfoNCE B = N (compared as B·N against size²), HSIC n.
#: Measured by the benchmark protocol (benchmarks/protocol.py, "crossover" in
#: benchmarks/results/protocol-*.json; benchmarks/README.md); the fused kernels always win on memory.
#: The 2026-12-02 quiet run (protocol-cpu-amd-epyc-2c.json), fused/eager: InfoNCE 1.02x at 256, 0.86x at 512;
#: HSIC 1.02x at 128, 0.79x at 256. The AVX2 machine's quiet run (2026-12-03, protocol-cpu-amd-epyc-2c-avx2.json):
#: InfoNCE 1.18x at 256, 0.98x at 512 (the same crossover); HSIC 0.89x at 128, 0.94x at 256 (the reference at
#: 128 costs ~11 % there, kept: on the AVX-512 machine the fused kernel is not faster at 128). The Zen 4's run
#: with parallel tile loops (2026-12-05, protocol-cpu-amd-epyc-2c-avx512-zen4.json): InfoNCE 1.03x at 512, 0.67x at
#: 1024 (kept at 512: 3 % lost there against 14 % on the Zen 5 at 1024); HSIC 1.03x at 128, 0.84x at 256.
PREFER_REFERENCE_BELOW = {"infonce": 512, "hsic": 256}


class CPUBackend(Backend):
    name = "cpu"
    description = "fused C++ CPU kernels (ibkd._C): tiled, no B×N / n×n matrices, multi-threaded"

    def __init__(self):
        self._ext = _C

    # -- availability ------------------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        if self._ext is None:
            return (
                f"the compiled extension ibkd._C is not built: {_IMPORT_ERROR}; "
                "rebuild it against the installed torch, without IBKD_SKIP_EXT: pip install --no-build-isolation ibkd "
                "(in a checkout: pip install --no-build-isolation -e .)"
            )
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if torch.device(device).type != "cpu":
            return f"runs CPU tensors only, got a {torch.device(device).type} tensor"
        if dtype not in FLOAT_DTYPES:
            return f"supports float16, bfloat16, float32 and float64, got {dtype}"
        return None

    def priority(self, device, dtype, op, shape):
        # Above the reference (0) on CPU, except below the measured crossover size, where the
        # reference's few large ATen calls beat the kernels' fixed costs (below 0: "auto" then takes
        # the reference).
        if torch.device(device).type != "cpu":
            return -1.0
        below = PREFER_REFERENCE_BELOW.get(op, 0)
        if shape and below:
            size2 = shape[0] * shape[1] if op == "infonce" else shape[0] * shape[0]
            if size2 < below * below:
                return -0.5
        return 10.0

    # -- InfoNCE -----------------------------------------------------------------------------
    def infonce_forward(self, q, k, inv_temp, symmetric):
        return self._ext.infonce_forward(q, k, inv_temp, symmetric)

    def infonce_backward(self, grad_rows, q, k, inv_temp, lse, symmetric, need_k=True):
        return self._ext.infonce_backward(grad_rows, q, k, inv_temp, lse, symmetric, need_k)

    def infonce_forward_backward(self, q, k, inv_temp, symmetric, grad_weight, need_k=True):
        return self._ext.infonce_forward_backward(q, k, inv_temp, symmetric, float(grad_weight), need_k)

    # -- HSIC --------------------------------------------------------------------------------
    def hsic_stats(self, x, z, gammas, kernel):
        return self._ext.hsic_stats(x, z, gammas, kernel)

    def hsic_stats_backward(self, grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel,
                            need_x=True, need_z=True):
        return self._ext.hsic_stats_backward(grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel,
                                             need_x, need_z)
