"""The backend registry and dispatcher: ibkd.backends(), backend="auto", explicit backends that cannot
run, and `import ibkd` without the compiled extension."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ibkd
from helpers import registered, unit_rows
from ibkd.backend import base as backend_base
from ibkd.functional import hsic, infonce
from ibkd.testing import DenseKernelBackend

CPU = torch.device("cpu")


class SpyBackend(DenseKernelBackend):
    """The dense kernel contract, with a chosen name/priority/availability, counting its calls."""

    def __init__(self, name="spy", priority=1e6, reason=None, rejects=()):
        self.name, self._priority, self._reason, self._rejects = name, priority, reason, rejects
        self.calls = 0

    def unavailable_reason(self):
        return self._reason

    def supports(self, device, dtype):
        return f"spy rejects {dtype}" if dtype in self._rejects else None

    def priority(self, device, dtype, op, shape):
        return self._priority

    def infonce_forward(self, *args):
        self.calls += 1
        return super().infonce_forward(*args)

    def hsic_stats(self, *args):
        self.calls += 1
        return super().hsic_stats(*args)


def pair(b=4, d=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(b * 10 + d)
    return unit_rows(g, b, d, dtype), unit_rows(g, b, d, dtype)


# ------------------------------------------------------------------------------- ibkd.backends()


def test_backends_lists_every_builtin_backend_with_reasons():
    rows = ibkd.backends()
    by_name = {r.name: r for r in rows}
    assert {"reference", "cpu", "triton", "cuda"} <= set(by_name)
    assert [r.name for r in rows] == sorted(by_name)
    for r in rows:
        assert isinstance(r, ibkd.BackendInfo)
        assert isinstance(r.available, bool) and isinstance(r.reason, str) and isinstance(r.description, str)
        if r.available:
            assert r.reason == ""
        else:
            assert r.reason.strip(), f"{r.name} is unavailable without a reason"
    assert by_name["reference"].available


def test_a_factory_that_fails_to_load_becomes_an_unavailable_backend():
    def broken():
        raise ImportError("the test's missing dependency")

    ibkd.register_backend(broken, name="broken_for_test")
    try:
        row = {r.name: r for r in ibkd.backends()}["broken_for_test"]
        assert not row.available and "the test's missing dependency" in row.reason
        with pytest.raises(ibkd.BackendUnavailable, match="the test's missing dependency"):
            infonce(*pair(), backend="broken_for_test")
    finally:
        backend_base._REGISTRY.pop("broken_for_test", None)
        backend_base._LAZY.pop("broken_for_test", None)


def test_register_backend_factory_needs_a_name():
    with pytest.raises(ValueError, match="name"):
        ibkd.register_backend(lambda: None)


# ---------------------------------------------------------------------------------- backend="auto"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("op, shape", [("infonce", (8, 8, 16)), ("hsic", (8, 16, 4))])
def test_auto_picks_the_highest_priority_available_backend(dtype, op, shape):
    candidates = []
    for name in backend_base.registered_names():
        impl = backend_base.get_backend(name)
        if impl.unavailable_reason() is None and impl.supports(CPU, dtype) is None:
            candidates.append((impl.priority(CPU, dtype, op, shape), name))
    assert candidates, "at least the reference runs on CPU"
    best = max(p for p, _ in candidates)
    chosen = backend_base.resolve_backend("auto", CPU, dtype, op, shape)
    assert (chosen.priority(CPU, dtype, op, shape), chosen.name) in candidates
    assert chosen.priority(CPU, dtype, op, shape) == best


def test_auto_never_picks_an_unavailable_or_unsupporting_backend():
    with registered(SpyBackend("spy_down", reason="switched off for the test")) as down, \
            registered(SpyBackend("spy_f64_only", priority=2e6, rejects=(torch.float32,))) as picky:
        assert backend_base.resolve_backend("auto", CPU, torch.float32, "infonce", (4, 4, 3)).name not in {
            down.name, picky.name
        }
        assert backend_base.resolve_backend("auto", CPU, torch.float64, "infonce", (4, 4, 3)) is picky


def test_auto_runs_the_chosen_backend_and_matches_the_reference():
    q, k = pair()
    with registered(SpyBackend()) as spy:
        loss = infonce(q, k, temperature=0.3)
        value = hsic(q, k, gamma=0.5)
        assert spy.calls == 2
    torch.testing.assert_close(loss, infonce(q, k, temperature=0.3, backend="reference"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, hsic(q, k, gamma=0.5, backend="reference"), rtol=1e-5, atol=1e-7)
    assert "spy" not in backend_base.registered_names()  # the registry is restored


def test_auto_on_cpu_gives_the_reference_result():
    q, k = pair(6, 5)
    torch.testing.assert_close(infonce(q, k), infonce(q, k, backend="reference"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hsic(q, k), hsic(q, k, backend="reference"), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ explicit, unavailable


def test_explicit_unavailable_backend_raises_with_the_reason():
    q, k = pair()
    with registered(SpyBackend("spy_down", reason="switched off for the test")):
        for call in (lambda: infonce(q, k, backend="spy_down"), lambda: hsic(q, k, backend="spy_down")):
            with pytest.raises(ibkd.BackendUnavailable, match="spy_down.*switched off for the test"):
                call()
    with registered(SpyBackend("spy_picky", rejects=(torch.float32,))):
        with pytest.raises(ibkd.BackendUnavailable, match="spy_picky.*spy rejects torch.float32"):
            infonce(q, k, backend="spy_picky")
        infonce(q.double(), k.double(), backend="spy_picky")  # a supported dtype runs


def test_builtin_backends_that_cannot_run_cpu_tensors_say_why():
    q, k = pair()
    for name in ("cpu", "triton", "cuda"):
        impl = backend_base.get_backend(name)
        reason = impl.unavailable_reason() or impl.supports(CPU, torch.float32)
        if reason is None:
            continue  # this one can run here
        with pytest.raises(ibkd.BackendUnavailable) as info:
            infonce(q, k, backend=name)
        assert name in str(info.value) and reason in str(info.value)


def test_backend_unavailable_is_a_runtime_error():
    assert issubclass(ibkd.BackendUnavailable, RuntimeError)


# ------------------------------------------------------------------- import without the extension

WITHOUT_EXTENSION = {
    "sys.modules entry None": 'sys.modules["ibkd._C"] = None',
    "meta_path blocker": textwrap.dedent(
        """
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name == "ibkd._C" or name.startswith("ibkd._C."):
                    raise ImportError(f"{name} hidden by the test")
                return None
        sys.meta_path.insert(0, Blocker())
        """
    ),
}

CHECK_WITHOUT_EXTENSION = textwrap.dedent(
    """
    import torch
    import ibkd
    from ibkd.functional import hsic, infonce

    rows = {r.name: r for r in ibkd.backends()}
    assert rows["reference"].available
    assert not rows["cpu"].available and "ibkd._C" in rows["cpu"].reason, rows["cpu"]
    q, k = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(infonce(q, k), infonce(q, k, backend="reference"))
    torch.testing.assert_close(hsic(q, k), hsic(q, k, backend="reference"))
    try:
        infonce(q, k, backend="cpu")
    except ibkd.BackendUnavailable as e:
        assert rows["cpu"].reason in str(e)
    else:
        raise AssertionError("backend='cpu' ran without its extension")
    print("OK")
    """
)


@pytest.mark.parametrize("hide", list(WITHOUT_EXTENSION), ids=list(WITHOUT_EXTENSION))
def test_import_ibkd_works_without_the_compiled_extension(hide):
    script = "import sys\n" + WITHOUT_EXTENSION[hide] + CHECK_WITHOUT_EXTENSION
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


# ------------------------------------------------------------------ measured GPU crossover (no GPU needed)


@pytest.fixture
def h200_memory(monkeypatch):
    from ibkd.backend import gpu_crossover

    monkeypatch.setattr(gpu_crossover, "device_total_memory", lambda device: 143771 * 2**20)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_auto_prefers_the_reference_for_float32_work_that_fits_on_a_gpu(h200_memory, backend_name):
    """Measured on an H200: float32 InfoNCE 16384² took 31 ms dense vs 159 ms (cuda) and 357 ms (triton);
    bf16 the other way round (triton 21 ms vs 31 ms). Beyond a quarter of the GPU's memory only the
    fused kernels fit."""
    from ibkd.backend import get_backend

    fused, reference = get_backend(backend_name), get_backend("reference")
    cuda = torch.device("cuda")
    ref_p = reference.priority(cuda, torch.float32, "infonce", (16384, 16384, 768))
    assert fused.priority(cuda, torch.float32, "infonce", (16384, 16384, 768)) < ref_p
    # 17 bytes per logit at 65536² is 73 GB > 35 GB: the dense work space does not fit
    assert fused.priority(cuda, torch.float32, "infonce", (65536, 65536, 768)) > ref_p
    for dtype in (torch.bfloat16, torch.float16):
        assert fused.priority(cuda, dtype, "infonce", (16384, 16384, 768)) > ref_p

    # HSIC, measured at n = 16384, D = 768: float32 74 ms dense vs 316 ms (cuda) and 631 ms (triton)
    ref_h = reference.priority(cuda, torch.float32, "hsic", (16384, 768, 768))
    assert fused.priority(cuda, torch.float32, "hsic", (16384, 768, 768)) < ref_h
    # 31 bytes per entry at 65536² is 133 GB: only the fused kernels fit
    assert fused.priority(cuda, torch.float32, "hsic", (65536, 768, 768)) > ref_h
    assert fused.priority(cuda, torch.bfloat16, "hsic", (16384, 768, 768)) > ref_h


def test_triton_stays_ahead_of_the_cuda_backend_on_a_gpu(h200_memory):
    from ibkd.backend import get_backend

    cuda = torch.device("cuda")
    for dtype, shape in ((torch.bfloat16, (16384, 16384, 768)), (torch.float32, (65536, 65536, 768))):
        assert get_backend("triton").priority(cuda, dtype, "infonce", shape) > \
            get_backend("cuda").priority(cuda, dtype, "infonce", shape)
