"""Where "auto" prefers the dense reference to the fused kernels on a GPU, from measured runs.

On an NVIDIA H200 (benchmarks/results/gpu-nvidia-h200.json, 2026-12-04; InfoNCE B = N = 16384, D = 768,
forward + backward) float32 inputs took 31.0 ms in the reference (cuBLAS SGEMM, 40 TFLOP/s), 159 ms in the
``cuda`` kernels and 357 ms in the ``triton`` ones: the fused kernels' float32 products are exact IEEE
FMA loops far from cuBLAS's rate. In bfloat16 the order turns (triton 21.0 ms, reference 31.4 ms). So for
float32 InfoNCE on CUDA the reference is chosen while its dense B×N work space fits comfortably; beyond
that only the fused kernels run at all.
"""

from __future__ import annotations

import torch

#: Peak extra memory of the reference InfoNCE per logit, forward + backward: measured 4.19 GiB at
#: B = N = 16384 and 64.75 GiB at 65536 (16.8 and 16.2 bytes), rounded up.
REFERENCE_INFONCE_BYTES_PER_LOGIT = 17
#: The share of the device's memory the dense work space may take: the model, its activations and the
#: optimiser state need the rest.
DENSE_MEMORY_SHARE = 0.25


def device_total_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def reference_infonce_preferred(device: torch.device, dtype: torch.dtype, op: str, shape: tuple) -> bool:
    """True where "auto" should run the dense reference instead of a fused GPU backend."""
    device = torch.device(device)
    if device.type != "cuda" or op != "infonce" or dtype != torch.float32 or not torch.cuda.is_available():
        return False  # (without a GPU no CUDA backend runs anyway; priorities are still asked for)
    b, n = shape[0], shape[1]
    return REFERENCE_INFONCE_BYTES_PER_LOGIT * b * n <= DENSE_MEMORY_SHARE * device_total_memory(device)
