"""A/B of the cpu kernels' element-wise epilogues: vector (AVX-512 or AVX2+FMA, whichever this CPU has)
against scalar (``set_cpu_tuning("simd", 0)``), in one process, rounds interleaved with the order
alternating, fwd+bwd, D = 384, 2 threads. A development check, not the protocol (no ceiling bracket,
no peers): run it on a quiet machine.

    python benchmarks/simd_ab.py
"""

from __future__ import annotations

import statistics
import time

import torch

from ibkd import _C
from ibkd import functional as F

CASES = [("infonce", 16384, 3), ("hsic", 8192, 3), ("infonce", 1024, 9), ("hsic", 1024, 9)]


def make_call(op: str, n: int, gen: torch.Generator):
    a = torch.randn(n, 384, generator=gen).requires_grad_()
    b = (a.detach() + 0.5 * torch.randn(n, 384, generator=gen)).requires_grad_()

    def call():
        loss = (F.infonce(a, b, temperature=0.05, backend="cpu") if op == "infonce"
                else F.hsic(a, b, gamma=0.5 / 384, backend="cpu"))
        loss.backward()
        a.grad = b.grad = None

    return call


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    print(f"epilogues: {_C.cpu_gemm_info()['epilogues']} vs scalar")
    for op, n, rounds in CASES:
        call = make_call(op, n, gen)
        times = {1: [], 0: []}
        for simd in (1, 0):  # warm-up
            _C.set_cpu_tuning("simd", simd)
            call()
        for r in range(rounds):
            for simd in ((1, 0) if r % 2 == 0 else (0, 1)):
                _C.set_cpu_tuning("simd", simd)
                t0 = time.perf_counter()
                call()
                times[simd].append(time.perf_counter() - t0)
        _C.set_cpu_tuning("simd", 1)
        vec, scalar = statistics.median(times[1]), statistics.median(times[0])
        print(f"{op} {n}: vector {vec:.3f} s, scalar {scalar:.3f} s, ratio {vec / scalar:.3f}", flush=True)


if __name__ == "__main__":
    main()
