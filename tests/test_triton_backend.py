"""The ``triton`` backend: kernel-level parity with :class:`ibkd.testing.DenseKernelBackend` and
end-to-end parity with ``backend="reference"``, forward and backward.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` first); with one, the same small-shape suite runs on CUDA, plus the
``gpu``-marked tests at realistic sizes.

Tolerances, as ``max|triton − expected| ≤ rtol·max|expected| + atol`` (``close``):

* float32: rtol 1e-5 against the dense float32 formulas (only the summation order differs; TF32 is
  off by default), and rtol 1e-4 against float64 truth (float32 accumulation over D ≤ 1024).
* float16 / bfloat16 inputs: the expected values are the dense formulas on the *same rounded
  inputs* in float32, so the tolerance covers only the kernels' own rounding: fp32 accumulation
  (losses, LSE, HSIC sums: rtol 1e-4), the gradient weights rounded to the input type before the
  tensor-core product (2⁻⁹ / 2⁻¹² relative each) and the gradients returned in the input type
  (one ulp of each entry): gradients rtol 2e-2 (bf16), 4e-3 (fp16).
* float64 (interpreter only; the backend does not claim fp64 on GPUs): rtol 1e-10.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import ibkd
from ibkd.backend import base as backend_base
from ibkd.backend.base import BackendUnavailable, accumulation_dtype
from ibkd.functional import hsic, infonce
from ibkd.testing import DenseKernelBackend

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
HALF = (torch.float16, torch.bfloat16)
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _triton():
    b = backend_base.get_backend("triton")
    reason = b.unavailable_reason() or b.supports(DEVICE, torch.float32)
    if reason:
        pytest.skip(f"triton backend unavailable here: {reason}")
    return b


@pytest.fixture
def tb():
    return _triton()


DENSE = DenseKernelBackend()


def close(name, actual, expected, rtol, atol=1e-6):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = rtol * (expected.abs().max().item() if expected.numel() else 0.0) + atol
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(n, d, dtype, g, normalize=True):
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalize:
        a = F.normalize(a, dim=1)
    return a.to(dtype).to(DEVICE)


# --------------------------------------------------------------------------------- kernel level

INFONCE_CASES = [  # (B, N, D, symmetric)
    (1, 1, 1, False),
    (1, 4, 5, False),
    (3, 5, 33, False),
    (3, 3, 70, True),
    (17, 17, 5, True),
    (17, 40, 70, False),
    (33, 33, 33, True),
    (33, 37, 1, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", INFONCE_CASES, ids=lambda c: "B{}-N{}-D{}{}".format(*c[:3], "-sym" if c[3] else ""))
def test_infonce_kernels_match_dense(tb, case, dtype):
    b, n, d, symmetric = case
    g = _gen(b * 1000 + n * 10 + d)
    q, k = _rows(b, d, dtype, g), _rows(n, d, dtype, g)
    acc = accumulation_dtype(dtype)
    inv_temp = torch.tensor(1.0 / (0.05 + 0.5 * torch.rand((), generator=g).item()), dtype=acc, device=DEVICE)
    rows, lse = tb.infonce_forward(q, k, inv_temp, symmetric)
    rows_e, lse_e = DENSE.infonce_forward(q, k, inv_temp, symmetric)
    assert rows.dtype == acc and lse.dtype == acc
    close("row_loss", rows, rows_e, VALUE_RTOL[dtype], atol=1e-5)
    close("lse", lse, lse_e, VALUE_RTOL[dtype], atol=1e-5)

    w = torch.rand(b, generator=g, dtype=torch.float64).to(acc).to(DEVICE)
    dq, dk, dinv = tb.infonce_backward(w, q, k, inv_temp, lse_e, symmetric)
    dq_e, dk_e, dinv_e = DENSE.infonce_backward(w, q, k, inv_temp, lse_e, symmetric)
    assert dq.dtype == dtype and dk.dtype == dtype and dinv.dtype == acc and dinv.dim() == 0
    close("dq", dq, dq_e, GRAD_RTOL[dtype])
    close("dk", dk, dk_e, GRAD_RTOL[dtype])
    close("dinv_temp", dinv, dinv_e, max(VALUE_RTOL[dtype], 1e-4 if dtype in HALF else 0), atol=1e-5)


@pytest.mark.parametrize("w_scale", [1 / 16384, 2.0**17], ids=["mean-over-16384-rows", "grad-scaler-2^17"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_float16_gradient_tile_stays_in_range(tb, symmetric, w_scale):
    """The gradient tile G = p·w enters tl.dot in float16. Weights of a mean over 16384 rows (w ≈ 1/16384)
    and a softmax over hundreds of keys made most of its entries float16 subnormals (a few bits, or 0);
    a GradScaler's 2^17 made them overflow. The first GPU run (H200, 2026-12-04) failed the float16 case
    of test_gpu_infonce_realistic on the first; the kernel now rounds G divided by a power of two near
    max|w| (exact) and multiplies the product back. Before that change: dq relative error 7.6e-3 in the
    first case here (bound 4e-3)."""
    b, n, d = (256, 256, 32) if symmetric else (16, 1000, 32)
    g = _gen(41)
    q, k = _rows(b, d, torch.float16, g), _rows(n, d, torch.float16, g)
    # a flat softmax (τ = 20) for the scaled weights keeps dq itself within float16's range
    inv_temp = torch.tensor(20.0 if w_scale < 1 else 0.05, device=DEVICE)
    w = (torch.rand(b, generator=g, dtype=torch.float64) * w_scale).float().to(DEVICE)
    _, lse = DENSE.infonce_forward(q, k, inv_temp, symmetric)
    dq, dk, _ = tb.infonce_backward(w, q, k, inv_temp, lse, symmetric)
    dq_e, dk_e, _ = DENSE.infonce_backward(w, q, k, inv_temp, lse, symmetric)
    close("dq", dq, dq_e, GRAD_RTOL[torch.float16], atol=0.0)
    close("dk", dk, dk_e, GRAD_RTOL[torch.float16], atol=0.0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_float32_against_float64_truth(tb, symmetric):
    # large D (32 feature chunks per tile in the interpreter); one ragged row/column tile keeps it quick
    b, n, d = 13, 13 if symmetric else 16, 1024
    g = _gen(7)
    q64, k64 = _rows(b, d, torch.float64, g), _rows(n, d, torch.float64, g)
    c32 = torch.tensor(20.0, device=DEVICE)
    rows, lse = tb.infonce_forward(q64.float(), k64.float(), c32, symmetric)
    rows_t, lse_t = DENSE.infonce_forward(q64, k64, c32.double(), symmetric)
    close("row_loss", rows, rows_t, 1e-4, atol=1e-5)
    w = torch.full((b,), 1.0 / b, device=DEVICE)
    dq, dk, dinv = tb.infonce_backward(w, q64.float(), k64.float(), c32, lse, symmetric)
    dq_t, dk_t, dinv_t = DENSE.infonce_backward(w.double(), q64, k64, c32.double(), lse_t, symmetric)
    close("dq", dq, dq_t, 1e-4)
    close("dk", dk, dk_t, 1e-4)
    close("dinv_temp", dinv, dinv_t, 1e-4, atol=1e-6)


def test_infonce_float64_in_interpreter(tb):
    if HAS_CUDA:
        pytest.skip("float64 is only claimed under the interpreter")
    g = _gen(11)
    q, k = _rows(5, 19, torch.float64, g), _rows(9, 19, torch.float64, g)
    c = torch.tensor(7.0, dtype=torch.float64)
    rows, lse = tb.infonce_forward(q, k, c, False)
    rows_e, lse_e = DENSE.infonce_forward(q, k, c, False)
    close("row_loss", rows, rows_e, 1e-10, atol=1e-12)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    for got, exp, name in zip(tb.infonce_backward(w, q, k, c, lse, False),
                              DENSE.infonce_backward(w, q, k, c, lse_e, False), ("dq", "dk", "dinv")):
        assert got.dtype == torch.float64
        close(name, got, exp, 1e-10, atol=1e-12)


HSIC_CASES = [(2, 3, 5), (3, 1, 33), (17, 33, 5), (40, 70, 17)]  # (n, dx, dz)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", HSIC_CASES, ids=lambda c: "n{}-dx{}-dz{}".format(*c))
def test_hsic_kernels_match_dense(tb, case, dtype, kernel):
    n, dx, dz = case
    g = _gen(n * 100 + dx + dz)
    acc = accumulation_dtype(dtype)
    # unnormalised rows of unit-ish size, bandwidths so that K, L span (0, 1)
    x = (torch.randn(n, dx, generator=g, dtype=torch.float64) / dx**0.5).to(dtype).to(DEVICE)
    z = (torch.randn(n, dz, generator=g, dtype=torch.float64) / dz**0.5).to(dtype).to(DEVICE)
    gammas = torch.tensor([0.7, 0.3], dtype=acc, device=DEVICE)
    sums, rk, rl = tb.hsic_stats(x, z, gammas, kernel)
    sums_e, rk_e, rl_e = DENSE.hsic_stats(x, z, gammas, kernel)
    assert sums.dtype == acc and sums.shape == (3,)
    close("sums", sums, sums_e, VALUE_RTOL[dtype], atol=1e-5)
    close("rowsum_k", rk, rk_e, VALUE_RTOL[dtype], atol=1e-5)
    close("rowsum_l", rl, rl_e, VALUE_RTOL[dtype], atol=1e-5)

    g_sums = torch.randn(3, generator=g, dtype=torch.float64).to(acc).to(DEVICE)
    g_rk = torch.randn(n, generator=g, dtype=torch.float64).to(acc).to(DEVICE)
    g_rl = torch.randn(n, generator=g, dtype=torch.float64).to(acc).to(DEVICE)
    dx_, dz_ = tb.hsic_stats_backward(g_sums, g_rk, g_rl, x, z, gammas, kernel)
    dx_e, dz_e = DENSE.hsic_stats_backward(g_sums, g_rk, g_rl, x, z, gammas, kernel)
    assert dx_.dtype == dtype and dz_.dtype == dtype
    close("dx", dx_, dx_e, 10 * GRAD_RTOL[dtype] if dtype == torch.float32 else GRAD_RTOL[dtype])
    close("dz", dz_, dz_e, 10 * GRAD_RTOL[dtype] if dtype == torch.float32 else GRAD_RTOL[dtype])


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_hsic_float32_against_float64_truth(tb, kernel):
    g = _gen(5)
    n, dx, dz = 33, 300, 70
    x64 = torch.randn(n, dx, generator=g, dtype=torch.float64).to(DEVICE) / dx**0.5
    z64 = torch.randn(n, dz, generator=g, dtype=torch.float64).to(DEVICE) / dz**0.5
    gam = torch.tensor([0.5, 0.9], device=DEVICE)
    got = tb.hsic_stats(x64.float(), z64.float(), gam, kernel)
    truth = DENSE.hsic_stats(x64, z64, gam.double(), kernel)
    for name, a, e in zip(("sums", "rowsum_k", "rowsum_l"), got, truth):
        close(name, a, e, 1e-5, atol=1e-6)
    grads = (torch.tensor([1.0, -0.5, 0.25], device=DEVICE), torch.linspace(-1, 1, n, device=DEVICE),
             torch.linspace(1, -1, n, device=DEVICE))
    dx_, dz_ = tb.hsic_stats_backward(*grads, x64.float(), z64.float(), gam, kernel)
    dx_t, dz_t = DENSE.hsic_stats_backward(*(t.double() for t in grads), x64, z64, gam.double(), kernel)
    close("dx", dx_, dx_t, 1e-4)
    close("dz", dz_, dz_t, 1e-4)


def test_hsic_float64_in_interpreter(tb):
    if HAS_CUDA:
        pytest.skip("float64 is only claimed under the interpreter")
    g = _gen(13)
    x, z = torch.randn(9, 7, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    gam = torch.tensor([0.2, 0.4], dtype=torch.float64)
    for a, e in zip(tb.hsic_stats(x, z, gam, "rbf"), DENSE.hsic_stats(x, z, gam, "rbf")):
        close("stats", a, e, 1e-10, atol=1e-12)
    gr = (torch.randn(3, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64),
          torch.randn(9, generator=g, dtype=torch.float64))
    for a, e in zip(tb.hsic_stats_backward(*gr, x, z, gam, "rbf"), DENSE.hsic_stats_backward(*gr, x, z, gam, "rbf")):
        close("grads", a, e, 1e-10, atol=1e-12)


def test_kernels_are_deterministic(tb):
    g = _gen(3)
    q, k = _rows(17, 33, torch.float32, g), _rows(20, 33, torch.float32, g)
    c = torch.tensor(10.0, device=DEVICE)
    w = torch.rand(17, generator=g).to(DEVICE)
    _, lse = tb.infonce_forward(q, k, c, False)
    first = tb.infonce_backward(w, q, k, c, lse, False)
    second = tb.infonce_backward(w, q, k, c, lse, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    x, z = q[:, :20].contiguous(), k[:17].contiguous()
    gam = torch.tensor([1.0, 2.0], device=DEVICE)
    s1, s2 = tb.hsic_stats(x, z, gam, "rbf"), tb.hsic_stats(x, z, gam, "rbf")
    for a, b in zip(s1, s2):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- end to end


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run_infonce(backend, q, k, temperature, upstream, **kw):
    q, k = _leaf(q), _leaf(k)
    t = _leaf(temperature) if isinstance(temperature, torch.Tensor) else temperature
    loss = infonce(q, k, temperature=t, backend=backend, **kw)
    (loss * upstream).sum().backward()
    grads = [q.grad, k.grad] + ([t.grad] if isinstance(t, torch.Tensor) else [])
    return loss.detach(), grads


E2E_INFONCE = [  # (B, N, D, symmetric, reduction, normalize, learnable temperature, dtype)
    (1, 3, 5, False, "mean", True, False, torch.float32),
    (3, 3, 33, True, "sum", True, True, torch.float32),
    (17, 20, 70, False, "none", False, True, torch.float32),
    (17, 17, 5, True, "none", True, False, torch.bfloat16),
    (33, 40, 33, False, "mean", True, True, torch.float16),
    (5, 5, 1, True, "mean", False, True, torch.float32),
]


@pytest.mark.parametrize("case", E2E_INFONCE, ids=lambda c: "B{}-N{}-D{}-{}-{}-{}".format(
    c[0], c[1], c[2], "sym" if c[3] else "row", c[4], str(c[7]).split(".")[-1]))
def test_infonce_end_to_end_matches_reference(tb, case):
    b, n, d, symmetric, reduction, normalize, learnable, dtype = case
    g = _gen(b + n + d)
    q = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    k = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    if not normalize:
        q, k = q / d**0.5, k / d**0.5
    temperature = torch.tensor(0.1, device=DEVICE) if learnable else 0.1
    upstream = torch.rand(b if reduction == "none" else (), generator=g).to(DEVICE)
    kw = dict(symmetric=symmetric, reduction=reduction, normalize=normalize)
    loss, grads = _run_infonce("triton", q, k, temperature, upstream, **kw)
    loss_r, grads_r = _run_infonce("reference", q, k, temperature, upstream, **kw)
    close("loss", loss, loss_r, 1e-4 if dtype in HALF else 1e-5, atol=1e-5)
    for name, a, e in zip(("dquery", "dkey", "dtemperature"), grads, grads_r):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        rtol = 1e-4 if name == "dtemperature" else GRAD_RTOL[dtype] * (1 if dtype in HALF else 10)
        close(name, a, e, rtol, atol=1e-5)


E2E_HSIC = [  # (n, dx, dz, kernel, normalized, gamma, dtype)
    (2, 3, 5, "rbf", False, 1.0, torch.float32),
    (3, 33, 1, "rbf", True, "median", torch.float32),
    (17, 5, 33, "linear", False, None, torch.float32),
    (40, 70, 17, "linear", True, None, torch.float32),
    (17, 33, 5, "rbf", True, 0.5, torch.bfloat16),
    (40, 17, 17, "rbf", False, "median", torch.float16),
]


@pytest.mark.parametrize("case", E2E_HSIC, ids=lambda c: "n{}-dx{}-dz{}-{}-{}-{}".format(
    c[0], c[1], c[2], c[3], "norm" if c[4] else "plain", str(c[6]).split(".")[-1]))
def test_hsic_end_to_end_matches_reference(tb, case):
    n, dx, dz, kernel, normalized, gamma, dtype = case
    g = _gen(n + dx + dz)
    x = (torch.randn(n, dx, generator=g, dtype=torch.float64) / dx**0.5).to(dtype).to(DEVICE)
    z = (torch.randn(n, dz, generator=g, dtype=torch.float64) / dz**0.5).to(dtype).to(DEVICE)
    kw = dict(kernel=kernel, normalized=normalized)
    if gamma is not None:
        kw["gamma"] = gamma
    out = {}
    for backend in ("triton", "reference"):
        xl, zl = _leaf(x), _leaf(z)
        value = hsic(xl, zl, backend=backend, **kw)
        value.backward()
        out[backend] = (value.detach(), xl.grad, zl.grad)
    (v, gx, gz), (v_r, gx_r, gz_r) = out["triton"], out["reference"]
    # HSIC is a difference of sums that nearly cancel: relative to the size of the summed terms
    close("hsic", v, v_r, 1e-4 if dtype in HALF else 2e-5, atol=1e-5 if dtype in HALF else 1e-6)
    for name, a, e in (("dx", gx, gx_r), ("dz", gz, gz_r)):
        assert a.dtype == dtype
        close(name, a, e, 3 * GRAD_RTOL[dtype] if dtype in HALF else 1e-3, atol=1e-5)


# ------------------------------------------------------------------------------- backend policy


def test_registered_and_described():
    names = [info.name for info in ibkd.backends()]
    assert "triton" in names
    b = backend_base.get_backend("triton")
    assert b.name == "triton" and b.fused


def test_cpu_support_depends_on_the_interpreter(monkeypatch):
    b = backend_base.get_backend("triton")
    if b.unavailable_reason():
        pytest.skip(b.unavailable_reason())
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = b.supports(cpu, torch.float32)
    assert reason == "Triton needs a CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert b.supports(cpu, torch.float32) is None
    assert "float64" in b.supports(torch.device("cuda"), torch.float64)
    assert b.supports(torch.device("cuda"), torch.bfloat16) is None
    assert b.priority(cpu, torch.float32, "infonce", (8, 8, 8)) < 0
    # (float32 InfoNCE that fits goes to the reference on a GPU: tests/test_dispatch.py)
    assert b.priority(torch.device("cuda"), torch.bfloat16, "infonce", (8, 8, 8)) > 0


def test_auto_never_picks_the_interpreter_on_cpu():
    impl = backend_base.resolve_backend("auto", torch.device("cpu"), torch.float32, "infonce", (8, 8, 8))
    assert impl.name != "triton"


def test_explicit_request_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    b = backend_base.get_backend("triton")
    if b.unavailable_reason():
        pytest.skip(b.unavailable_reason())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        infonce(torch.randn(4, 8), torch.randn(4, 8), backend="triton")


def test_tf32_switch(monkeypatch):
    pytest.importorskip("triton")
    from ibkd.kernels import dot_precision

    monkeypatch.delenv("IBKD_TRITON_ALLOW_TF32", raising=False)
    assert dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv("IBKD_TRITON_ALLOW_TF32", "1")
    assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.bfloat16) == "ieee"
    tb = _triton()  # the kernels take the switch (TF32 products: ~1e-3 relative on a GPU)
    g = _gen(17)
    q, k = _rows(5, 40, torch.float32, g), _rows(7, 40, torch.float32, g)
    c = torch.tensor(10.0, device=DEVICE)
    close("row_loss tf32", tb.infonce_forward(q, k, c, False)[0], DENSE.infonce_forward(q, k, c, False)[0], 1e-2, 1e-2)


# ------------------------------------------------------------------ GPU compilation, without a GPU

# Compiles every kernel variant ahead of time for sm_80 and sm_90 (PTX and cubin through Triton's
# bundled ptxas) in a subprocess without TRITON_INTERPRET: the interpreter does not check what the
# GPU compiler does (types, layouts, dot shapes), so this catches kernels that would not build on a
# GPU. Pointers, strides and feature sizes are declared 16-divisible, as Triton specializes them at
# launch for aligned tensors. The smallest tile config of each kernel keeps it quick.
_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from ibkd.kernels import infonce, hsic

INPUT_PTRS = {"a_ptr", "b_ptr", "own_ptr", "oth_ptr", "out_ptr", "x_ptr", "z_ptr", "par_ptr"}
DIV16 = [["tt.divisibility", 16]]

def build(autotuned, dt, consts, arch):
    fn = autotuned.fn
    cfg = min(autotuned.configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + (dt if p.name in INPUT_PTRS else "fp32")
            attrs[(i,)] = DIV16
        elif p.name.startswith("scale"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
            if p.name.startswith(("stride", "D")):
                attrs[(i,)] = DIV16
    src = ASTSource(fn, sig, {**consts, **cfg.kwargs}, attrs)
    triton.compile(src, target=GPUTarget("cuda", arch, 32),
                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))

F32 = tl.float32
failures = []
for arch, dt, prec, full in [(90, "bf16", "ieee", True), (90, "fp16", "ieee", False), (90, "fp32", "ieee", False),
                             (80, "bf16", "ieee", False), (80, "fp32", "tf32", False)]:
    jobs = [(infonce._lse_kernel, dict(WANT_POS=True)),
            (infonce._grad_kernel, dict(HAS_A=True, HAS_B=True, WANT_DTEMP=True)),
            (hsic._stats_kernel, dict(RBF=True)),
            (hsic._grad_kernel, dict(OWN_IDX=0, RBF=True))]
    if full:
        jobs += [(infonce._lse_kernel, dict(WANT_POS=False)),
                 (infonce._grad_kernel, dict(HAS_A=True, HAS_B=False, WANT_DTEMP=True)),
                 (infonce._grad_kernel, dict(HAS_A=False, HAS_B=True, WANT_DTEMP=False)),
                 (hsic._stats_kernel, dict(RBF=False)),
                 (hsic._grad_kernel, dict(OWN_IDX=1, RBF=False))]
    for kernel, consts in jobs:
        try:
            build(kernel, dt, dict(consts, ACC=F32, PRECISION=prec), arch)
        except Exception as e:
            failures.append(f"sm_{arch} {dt} {kernel.fn.__name__} {consts}: {type(e).__name__}: {e}")
print("\n".join(failures) or "all compiled")
sys.exit(1 if failures else 0)
"""


def test_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # pragma: no cover - another Triton layout
        pytest.skip(f"this Triton has no ahead-of-time compile API: {e}")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ----------------------------------------------------------------------------- GPU, real sizes


def _poison_cuda_cache(nbytes=1 << 30):
    """Fill a large block of the caching allocator with NaN and free it, so outputs the kernels
    allocate with torch.empty start as NaN: an element a kernel forgets to write shows up."""
    junk = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del junk


def _dense_gpu_infonce(q, k, c, symmetric, w):
    rows, lse = DENSE.infonce_forward(q, k, c, symmetric)
    return (rows, lse) + tuple(DENSE.infonce_backward(w, q, k, c, lse, symmetric))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,symmetric,n_extra", [
    (torch.bfloat16, False, 0), (torch.bfloat16, True, 0), (torch.float16, False, 1000), (torch.float32, False, 77),
])
def test_gpu_infonce_realistic(tb, dtype, symmetric, n_extra):
    b, d = 4096, 768
    q = F.normalize(torch.randn(b, d, device="cuda"), dim=1).to(dtype)
    k = F.normalize(torch.randn(b + n_extra, d, device="cuda"), dim=1).to(dtype)
    c = torch.tensor(20.0, device="cuda")
    w = torch.rand(b, device="cuda") / b
    rows_e, lse_e, dq_e, dk_e, dinv_e = _dense_gpu_infonce(q, k, c, symmetric, w)
    for _ in range(2):  # the second run reuses poisoned memory and tuned configs
        _poison_cuda_cache()
        rows, lse = tb.infonce_forward(q, k, c, symmetric)
        _poison_cuda_cache()
        dq, dk, dinv = tb.infonce_backward(w, q, k, c, lse, symmetric)
        torch.cuda.synchronize()
        close("row_loss", rows, rows_e, 1e-4, atol=1e-4)
        close("lse", lse, lse_e, 1e-4, atol=1e-4)
        close("dq", dq, dq_e, GRAD_RTOL[dtype] * (1 if dtype in HALF else 10))
        close("dk", dk, dk_e, GRAD_RTOL[dtype] * (1 if dtype in HALF else 10))
        close("dinv", dinv, dinv_e, 1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,kernel", [(torch.bfloat16, "rbf"), (torch.float32, "rbf"), (torch.bfloat16, "linear")])
def test_gpu_hsic_realistic(tb, dtype, kernel):
    n, dx, dz = 4096, 768, 384
    x = (torch.randn(n, dx, device="cuda") / dx**0.5).to(dtype)
    z = (torch.randn(n, dz, device="cuda") / dz**0.5).to(dtype)
    gam = torch.tensor([0.5, 0.5], device="cuda")
    expected = DENSE.hsic_stats(x, z, gam, kernel)
    gr = (torch.randn(3, device="cuda") / n**2, torch.randn(n, device="cuda") / n, torch.randn(n, device="cuda") / n)
    dx_e, dz_e = DENSE.hsic_stats_backward(*gr, x, z, gam, kernel)
    for _ in range(2):
        _poison_cuda_cache()
        got = tb.hsic_stats(x, z, gam, kernel)
        _poison_cuda_cache()
        dx_, dz_ = tb.hsic_stats_backward(*gr, x, z, gam, kernel)
        torch.cuda.synchronize()
        for name, a, e in zip(("sums", "rowsum_k", "rowsum_l"), got, expected):
            close(name, a, e, 1e-4, atol=1e-4)
        close("dx", dx_, dx_e, 3 * GRAD_RTOL[dtype] if dtype in HALF else 1e-3)
        close("dz", dz_, dz_e, 3 * GRAD_RTOL[dtype] if dtype in HALF else 1e-3)


def _kernel_configs(module, kernel_names):
    """(kernel name, config index) for every autotune config of the named kernels of ibkd.kernels.<module>;
    none (the tests skip) where Triton is not installed, so that collecting this file never needs it."""
    import importlib

    try:
        kernels = importlib.import_module(f"ibkd.kernels.{module}")
    except ImportError:
        return []
    return [(name, i) for name in kernel_names for i in range(len(getattr(kernels, name).configs))]


def _only_config(monkeypatch, module, kernel_name, config):
    """Restrict the autotuned kernel to one config (tuning cache emptied); monkeypatch restores both."""
    import importlib

    kernel = getattr(importlib.import_module(f"ibkd.kernels.{module}"), kernel_name)
    monkeypatch.setattr(kernel, "configs", [kernel.configs[config]])
    monkeypatch.setattr(kernel, "cache", {})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel_name,config", _kernel_configs("hsic", ("_stats_kernel", "_grad_kernel")))
def test_gpu_hsic_every_config_is_race_free(tb, monkeypatch, kernel_name, config, dtype):
    """Each autotune config alone, three runs: on an H200 three stage counts raced for 16-bit inputs
    (a few % of the L row sums off by up to 0.9, different rows each run) at this shape, while the
    autotuner picked one of them for the test above. A config that races here must not be shipped."""
    _only_config(monkeypatch, "hsic", kernel_name, config)
    g = torch.Generator(device="cuda").manual_seed(config)
    n, dx, dz = 2048, 768, 256
    x = (torch.randn(n, dx, device="cuda", generator=g) / dx**0.5).to(dtype)
    z = (torch.randn(n, dz, device="cuda", generator=g) / dz**0.5).to(dtype)
    gam = torch.tensor([0.5, 0.5], device="cuda")
    expected = DENSE.hsic_stats(x, z, gam, "rbf")
    gr = (torch.randn(3, device="cuda", generator=g) / n**2, torch.randn(n, device="cuda", generator=g) / n,
          torch.randn(n, device="cuda", generator=g) / n)
    grads_e = DENSE.hsic_stats_backward(*gr, x, z, gam, "rbf")
    grad_rtol = 3 * GRAD_RTOL[dtype] if dtype in HALF else 1e-3
    for _ in range(3):
        if kernel_name == "_stats_kernel":
            got = tb.hsic_stats(x, z, gam, "rbf")
            for name, a, e in zip(("sums", "rowsum_k", "rowsum_l"), got, expected):
                close(name, a, e, 1e-4, atol=1e-4)
        else:
            for name, a, e in zip(("dx", "dz"), tb.hsic_stats_backward(*gr, x, z, gam, "rbf"), grads_e):
                close(name, a, e, grad_rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel_name,config", _kernel_configs("infonce", ("_lse_kernel", "_grad_kernel")))
def test_gpu_infonce_every_config_is_race_free(tb, monkeypatch, kernel_name, config, dtype):
    """The InfoNCE kernels' configs one by one, as for HSIC above: the autotuner only ever tries the
    configs that win at the tested shapes, so a racing config could hide until a user's shape picks it."""
    _only_config(monkeypatch, "infonce", kernel_name, config)
    g = torch.Generator(device="cuda").manual_seed(config)
    b, n, d = 2048, 2048 + 77, 768
    q = F.normalize(torch.randn(b, d, device="cuda", generator=g), dim=1).to(dtype)
    k = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype)
    c = torch.tensor(20.0, device="cuda")
    w = torch.rand(b, device="cuda", generator=g) / b
    rows_e, lse_e, dq_e, dk_e, dinv_e = _dense_gpu_infonce(q, k, c, False, w)
    lse_in = lse_e.float()
    for _ in range(3):
        if kernel_name == "_lse_kernel":
            rows, lse = tb.infonce_forward(q, k, c, False)
            close("row_loss", rows, rows_e, 1e-4, atol=1e-4)
            close("lse", lse, lse_e, 1e-4, atol=1e-4)
        else:
            dq, dk, dinv = tb.infonce_backward(w, q, k, c, lse_in, False)
            close("dq", dq, dq_e, GRAD_RTOL[dtype] * (1 if dtype in HALF else 10))
            close("dk", dk, dk_e, GRAD_RTOL[dtype] * (1 if dtype in HALF else 10))
            close("dinv", dinv, dinv_e, 1e-3, atol=1e-5)


@pytest.mark.gpu
def test_gpu_end_to_end_and_opcheck(tb):
    q = torch.randn(1024, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1024, 384, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor(0.05, device="cuda", requires_grad=True)
    loss = infonce(q, k, temperature=t, backend="triton")
    loss.backward()
    q2, t2 = _leaf(q), _leaf(t)
    loss_r = infonce(q2, k, temperature=t2, backend="reference")
    loss_r.backward()
    close("loss", loss.detach(), loss_r.detach(), 1e-4, atol=1e-4)
    close("dq", q.grad, q2.grad, 2e-2, atol=1e-6)
    close("dt", t.grad, t2.grad, 1e-3, atol=1e-5)
    qn = F.normalize(q.detach().float(), dim=1).to(torch.bfloat16)
    kn = F.normalize(k.float(), dim=1).to(torch.bfloat16)
    torch.library.opcheck(ibkd.ops.infonce_op, (qn, kn, torch.tensor(20.0, device="cuda"), False, 1, False, "triton"))
