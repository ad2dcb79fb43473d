"""InfoNCE benchmarks: time (pytest-benchmark), peak extra memory, ratios to the reference.

CPU: reference vs cpu, forward+backward, fp32, B = N ∈ {1024, 4096, 16384}, D ∈ {384, 768}.
GPU (skipped without CUDA): reference eager, reference under torch.compile, triton, cuda;
B ∈ {4096, 16384, 65536}, D ∈ {384, 768, 1024}, bf16 and fp32, forward and forward+backward;
TFLOP/s against a bf16 GEMM measured in the same run; the largest batch that fits per backend.
"""

import pytest
import torch

import bench_common as bc
from bench_harness import backends_for, record, set_extra, skip_unless_runnable, time_cpu, time_cuda
from memory import cpu_extra_memory, cuda_extra_memory


@pytest.mark.parametrize("dim", bc.CPU_INFONCE_D)
@pytest.mark.parametrize("size", bc.CPU_INFONCE_B)
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_infonce_cpu(benchmark, backend, size, dim):
    _run_cpu_case(benchmark, bc.Case("infonce", backend, size, dim, "float32", "fwd+bwd", "cpu"))


def _run_cpu_case(benchmark, case):
    """Time one CPU case with pytest-benchmark, then measure its peak extra memory in a child process."""
    skip_unless_runnable(case)
    benchmark.group = case.group
    step, _ = bc.make_step(case)
    timing = time_cpu(benchmark, step)
    del step, _
    memory = cpu_extra_memory(case)
    record(case, timing, memory)


# ------------------------------------------------------------------------------------------ GPU


@pytest.fixture(scope="session")
def bf16_gemm_tflops():
    """The bf16 GEMM rate of this GPU, measured now: the roofline the fused kernels are judged by."""
    from triton.testing import do_bench

    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    rate = 2.0 * m**3 / (ms / 1e3) / 1e12
    set_extra("cuda:bf16_gemm", {"m=n=k": m, "median_ms": ms, "tflops": rate})
    return rate


def _run_gpu_case(benchmark, case, gemm_rate):
    skip_unless_runnable(case)
    benchmark.group = case.group
    torch.cuda.empty_cache()
    try:
        step, inputs = bc.make_step(case)
        memory = cuda_extra_memory(step)  # the first call also compiles (reference-compile, autotune)
        timing = time_cuda(benchmark, step)
    except torch.cuda.OutOfMemoryError as e:
        record(case, None, None, status="oom", error=str(e).splitlines()[0])
        pytest.skip(f"out of GPU memory: {case.id}")
    row = record(case, timing, memory)
    if gemm_rate and row.get("tflops"):
        row["fraction_of_bf16_gemm"] = row["tflops"] / gemm_rate


# The backend varies fastest (pytest varies the top decorator fastest): the peers of one case run
# back to back, so a run cut short by its time limit still has whole groups to compare.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda"))
@pytest.mark.parametrize("mode", bc.GPU_MODES)
@pytest.mark.parametrize("size", bc.GPU_INFONCE_B)
@pytest.mark.parametrize("dim", bc.GPU_INFONCE_D)
@pytest.mark.parametrize("dtype", bc.GPU_DTYPES)
def test_infonce_gpu(benchmark, bf16_gemm_tflops, backend, size, dim, dtype, mode):
    _run_gpu_case(benchmark, bc.Case("infonce", backend, size, dim, dtype, mode, "cuda"), bf16_gemm_tflops)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda"))
def test_infonce_gpu_largest_batch(backend):
    """Doubling B (bf16, D=768, forward+backward) until the GPU runs out of memory."""
    skip_unless_runnable(bc.Case("infonce", backend, 1, 1))
    largest, failed_at = None, None
    for size in bc.GPU_MAX_BATCH_LADDER:
        case = bc.Case("infonce", backend, size, 768, "bfloat16", "fwd+bwd", "cuda")
        torch.cuda.empty_cache()
        try:
            step, inputs = bc.make_step(case)
            step()
            torch.cuda.synchronize()
            largest = size
            del step, inputs
        except torch.cuda.OutOfMemoryError:
            failed_at = size
            break
    set_extra(f"cuda:largest_infonce_batch:{backend}", {
        "largest_B_that_ran": largest, "first_B_out_of_memory": failed_at,
        "ladder": bc.GPU_MAX_BATCH_LADDER, "dim": 768, "dtype": "bfloat16", "mode": "fwd+bwd"})
