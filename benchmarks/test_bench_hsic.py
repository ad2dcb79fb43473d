"""HSIC benchmarks: time (pytest-benchmark), peak extra memory, ratios to the reference.

The reference is the honest fast PyTorch form (K and L materialised, no n×n products):
Σ K∘L − 2/n·(K1)·(L1) + (1ᵀK1)(1ᵀL1)/n². RBF kernels with γ = 0.5/D for both inputs; both inputs
require grad.

CPU: reference vs cpu, forward+backward, fp32, n ∈ {1024, 4096, 8192}, D ∈ {384, 768}.
GPU (skipped without CUDA): n ∈ {4096, 16384}, D ∈ {384, 768}, bf16 and fp32, fwd and fwd+bwd.
"""

import pytest

import bench_common as bc
from bench_harness import backends_for
from test_bench_infonce import _run_cpu_case, _run_gpu_case


@pytest.mark.parametrize("dim", bc.CPU_HSIC_D)
@pytest.mark.parametrize("size", bc.CPU_HSIC_N)
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_hsic_cpu(benchmark, backend, size, dim):
    _run_cpu_case(benchmark, bc.Case("hsic", backend, size, dim, "float32", "fwd+bwd", "cpu"))


# The backend varies fastest (pytest varies the top decorator fastest): the peers of one case run
# back to back, so a run cut short by its time limit still has whole groups to compare.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda"))
@pytest.mark.parametrize("mode", bc.GPU_MODES)
@pytest.mark.parametrize("size", bc.GPU_HSIC_N)
@pytest.mark.parametrize("dim", bc.GPU_HSIC_D)
@pytest.mark.parametrize("dtype", bc.GPU_DTYPES)
def test_hsic_gpu(benchmark, backend, size, dim, dtype, mode):
    _run_gpu_case(benchmark, bc.Case("hsic", backend, size, dim, dtype, mode, "cuda"), None)
