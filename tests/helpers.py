"""Shared pieces of the generic test suites (reference, validation, parity, ops, losses, dispatch).

* Which backends the generic suites cover: the reference, every fused backend that can run CPU float
  tensors here (``cpu`` once it is built), and :class:`ibkd.testing.DenseKernelBackend` registered as
  ``"dense"`` for the duration of each test. Triton is left to ``tests/test_triton_backend.py``: in the
  CPU interpreter it is far too slow to fuzz.
* Comparisons whose tolerance follows from how floating-point errors arise (see ``assert_close``).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import ibkd
from ibkd.backend import base as backend_base
from ibkd.testing import DenseKernelBackend

CPU = torch.device("cpu")
NOT_FUZZED = ("reference", "triton")


def fused_cpu_backends() -> list[str]:
    """Registered fused backends able to run CPU float32 tensors here (not triton), plus "dense"."""
    names = []
    for info in ibkd.backends():
        if not info.available or info.name in NOT_FUZZED:
            continue
        impl = backend_base.get_backend(info.name)
        if impl.fused and impl.supports(CPU, torch.float32) is None:
            names.append(info.name)
    return sorted(names) + ["dense"]


FUSED_BACKENDS = fused_cpu_backends()
ALL_BACKENDS = ["reference", *FUSED_BACKENDS]


@contextlib.contextmanager
def registered(backend: backend_base.Backend):
    """Register ``backend`` for a block, then restore the registry exactly: a test-only backend left
    behind would change what ``backend="auto"`` picks in every later test."""
    name = backend.name
    saved_instance = backend_base._REGISTRY.get(name)
    saved_factory = backend_base._LAZY.get(name)
    ibkd.register_backend(backend)
    try:
        yield backend
    finally:
        backend_base._REGISTRY.pop(name, None)
        backend_base._LAZY.pop(name, None)
        if saved_instance is not None:
            backend_base._REGISTRY[name] = saved_instance
        if saved_factory is not None:
            backend_base._LAZY[name] = saved_factory


@contextlib.contextmanager
def backend_ready(name: str):
    """Makes ``name`` usable for a block (registers the dense kernel-contract backend when asked)."""
    if name == "dense":
        with registered(DenseKernelBackend()):
            yield name
    else:
        yield name


def supports_dtype(name: str, dtype: torch.dtype) -> bool:
    impl = backend_base.get_backend(name)
    return impl.unavailable_reason() is None and impl.supports(CPU, dtype) is None


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    """Name of each fused backend that runs on CPU (the dense one registered while the test runs)."""
    with backend_ready(request.param):
        yield request.param


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    """The reference and every fused CPU backend."""
    with backend_ready(request.param):
        yield request.param


# ----------------------------------------------------------------------------------- comparisons


def max_abs(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return max_abs(actual.detach().double() - expected.detach().double())


def assert_close(actual, expected, *, rtol: float, atol: float = 0.0, calibration: float = 0.0, what: str = ""):
    """``max|actual − expected| ≤ max(calibration, rtol·max|expected|) + atol``.

    Norm-wise, not element-wise: a rounded sum's error scales with the size of its terms, so an
    element that cancels to almost nothing carries the absolute error of its largest neighbours.
    ``calibration`` is an error the reference itself makes in the same precision (see ``parity``).
    """
    err = max_err(actual, expected)
    bound = max(calibration, rtol * max_abs(expected)) + atol
    assert err <= bound, (
        f"{what}: max abs error {err:.3g} > bound {bound:.3g} "
        f"(rtol={rtol:g}, max|expected|={max_abs(expected):.3g}, calibration={calibration:.3g}, atol={atol:g})"
    )


def unit_rows(generator: torch.Generator, rows: int, cols: int, dtype=torch.float64) -> torch.Tensor:
    """Random rows of norm ≈ 1 (entries N(0, 1/cols)), so similarities and distances stay O(1)."""
    return (torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(cols)).to(dtype)
