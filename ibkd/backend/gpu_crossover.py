"""Where "auto" prefers the dense reference to the fused kernels on a GPU, from measured runs.

On an NVIDIA H200 (benchmarks/results/gpu-nvidia-h200.json, 2026-12-04; InfoNCE B = N = 16384, D = 768,
forward + backward) float32 inputs took 31.0 ms in the reference (cuBLAS SGEMM, 40 TFLOP/s), 159 ms in the
``cuda`` kernels and 357 ms in the ``triton`` ones: the fused kernels' float32 products are exact IEEE
FMA loops far from cuBLAS's rate. In bfloat16 the order turns (triton 21.0 ms, reference 31.4 ms). HSIC
(n = 16384, D = 768, forward + backward) repeats the pattern: float32 74.4 ms in the reference, 316 ms in
``cuda``, 631 ms in ``triton``; bfloat16 triton 56.7 ms against the reference's 74.5 ms. So for float32 on
CUDA the reference is chosen while its dense work space (B×N logits, or the n×n kernel matrices) fits
comfortably; beyond that only the fused kernels run at all.
"""

from __future__ import annotations

import torch

#: Peak extra memory of the reference InfoNCE per logit, forward + backward: measured 4.19 GiB at
#: B = N = 16384 and 64.75 GiB at 65536 (16.8 and 16.2 bytes), rounded up.
REFERENCE_INFONCE_BYTES_PER_LOGIT = 17
#: Peak extra memory of the reference HSIC per kernel-matrix entry, forward + backward: 7.59 GiB at
#: n = 16384 (30.4 bytes), rounded up.
REFERENCE_HSIC_BYTES_PER_ENTRY = 31
#: The share of the device's memory the dense work space may take: the model, its activations and the
#: optimiser state need the rest.
DENSE_MEMORY_SHARE = 0.25


def device_total_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def dense_reference_preferred(device: torch.device, dtype: torch.dtype, op: str, shape: tuple) -> bool:
    """True where "auto" should run the dense reference instead of a fused GPU backend: float32 on CUDA
    while the dense work space fits ``DENSE_MEMORY_SHARE`` of the device. ``shape`` is (B, N, D) for
    InfoNCE and (n, Dx, Dz) for HSIC."""
    device = torch.device(device)
    if device.type != "cuda" or dtype != torch.float32 or not torch.cuda.is_available():
        return False  # (without a GPU no CUDA backend runs anyway; priorities are still asked for)
    if op == "infonce":
        work_space = REFERENCE_INFONCE_BYTES_PER_LOGIT * shape[0] * shape[1]
    elif op == "hsic":
        work_space = REFERENCE_HSIC_BYTES_PER_ENTRY * shape[0] ** 2
    else:
        return False
    return work_space <= DENSE_MEMORY_SHARE * device_total_memory(device)
