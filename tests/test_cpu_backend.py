"""The ``cpu`` backend (fused C++ kernels in ``ibkd._C``).

* kernel level: every function of the kernel contract against :class:`ibkd.testing.DenseKernelBackend`
  evaluated in float64 on the same (rounded) inputs, with default tiles and with tiny tiles that force
  column chunking (online log-sum-exp), the two-pass fused fallback and many HSIC tile pairs;
* end to end: ``ibkd.functional.infonce`` / ``hsic`` with ``backend="cpu"`` against ``"reference"``,
  forward and backward (temperature gradient included), every reduction, symmetric, normalised,
  non-contiguous inputs;
* ``torch.autograd.gradcheck`` in float64;
* memory: the largest single allocation (torch.profiler, CPU allocator events) stays far below one
  B×N (n×n) float32 matrix, and the same check fails for the reference backend.

Tolerances (relative to max(1, max|expected|)):
  float64: 1e-9 — only summation order differs;
  float32: 2e-5 (kernel level), 1e-4 (end to end, where the reference's own float32 error adds in);
  bfloat16 / float16: the float32-accumulated outputs (loss, lse, HSIC statistics) as float32; the
  gradients, which are returned in the input dtype, 1e-2 (bfloat16 has an 8-bit mantissa: 4e-3 per
  rounding), 5e-3 for float16.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

_C = pytest.importorskip("ibkd._C", reason="the compiled extension ibkd._C is not built")

import ibkd  # noqa: E402
from ibkd import functional as F  # noqa: E402
from ibkd.backend import get_backend, resolve_backend  # noqa: E402
from ibkd.testing import DenseKernelBackend  # noqa: E402

CPU = get_backend("cpu")
DENSE = DenseKernelBackend()

# (value tolerance for acc-dtype outputs, tolerance for outputs in the input dtype)
KERNEL_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 1e-2),
    torch.float16: (2e-5, 5e-3),
}
E2E_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-4, 1e-2),
    torch.float16: (1e-4, 5e-3),
}

INFONCE_SHAPES = [  # (B, N, D): B=1, odd sizes, N > B, tiny and large D
    (1, 1, 1),
    (1, 6, 3),
    (2, 2, 77),
    (2, 5, 384),
    (7, 7, 3),
    (7, 19, 1),
    (129, 129, 77),
    (129, 200, 384),
    (1000, 1000, 3),
    (1000, 1031, 77),
]
HSIC_SHAPES = [(2, 1, 3), (3, 3, 1), (65, 77, 5), (65, 2, 384), (513, 384, 16), (513, 7, 77)]  # (n, dx, dz)


def assert_close(actual, expected, tol, what=""):
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def cpu_tuning(**settings):
    saved = _C.cpu_tuning()
    try:
        for name, value in settings.items():
            _C.set_cpu_tuning(name, value)
        yield
    finally:
        for name, value in saved.items():
            _C.set_cpu_tuning(name, value)


@contextlib.contextmanager
def num_threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# Default tiles; tiny tiles (several row blocks, column chunks of 16 → online lse and the two-pass
# fused path, 16×16 HSIC tiles with ragged edges); tiny tiles in one chunk (a single accumulator);
# small tiles through the fallback GEMM (MKL) and the scalar epilogues.
TILINGS = {
    "default": {},
    "small": dict(infonce_block_rows=8, infonce_max_tile_cols=16, hsic_block=16),
    "small_serial": dict(infonce_block_rows=5, infonce_max_tile_cols=7, hsic_block=9, max_accumulators=1),
    # the fallbacks of the float32 path: ATen/MKL tile GEMMs instead of oneDNN, scalar epilogues
    "mkl_scalar": dict(onednn=0, simd=0, infonce_block_rows=8, hsic_block=16),
}


def _infonce_inputs(b, n, d, dtype, normalized, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, d, generator=g, dtype=torch.float64)
    k[:b] += 0.5 * q  # positives correlate with their queries
    if normalized:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        inv_temp = 20.0
    else:
        inv_temp = 0.7
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return q.to(dtype), k.to(dtype), torch.tensor(inv_temp, dtype=acc)


def _as64(*ts):
    return [t.double() for t in ts]


# ------------------------------------------------------------------------- kernel level: InfoNCE


@pytest.mark.parametrize("b,n,d", INFONCE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tiling", list(TILINGS))
def test_infonce_kernels_match_dense(b, n, d, dtype, symmetric, tiling):
    if symmetric:
        n = b
    if tiling != "default" and b * n > 20000:
        pytest.skip("tiny tiles on large shapes: covered by the smaller shapes")
    acc_tol, in_tol = KERNEL_TOL[dtype]
    q, k, c = _infonce_inputs(b, n, d, dtype, normalized=dtype != torch.float64 or d > 50)
    q64, k64, c64 = _as64(q, k, c)
    g = torch.Generator().manual_seed(1)
    grad_rows = torch.randn(b, generator=g, dtype=torch.float64)
    with cpu_tuning(**TILINGS[tiling]):
        rows, lse = CPU.infonce_forward(q, k, c, symmetric)
        exp_rows, exp_lse = DENSE.infonce_forward(q64, k64, c64, symmetric)
        assert rows.dtype == lse.dtype == c.dtype
        assert rows.shape == (b,) and lse.shape == ((2 * b,) if symmetric else (b,))
        assert_close(rows, exp_rows, acc_tol, "row_loss")
        assert_close(lse, exp_lse, acc_tol, "lse")

        dq, dk, dinv = CPU.infonce_backward(grad_rows.to(c.dtype), q, k, c, lse, symmetric)
        exp_dq, exp_dk, exp_dinv = DENSE.infonce_backward(grad_rows, q64, k64, c64, exp_lse, symmetric)
        assert dq.dtype == dk.dtype == dtype and dinv.dtype == c.dtype and dinv.shape == ()
        assert_close(dq, exp_dq, in_tol, "dq")
        assert_close(dk, exp_dk, in_tol, "dk")
        assert_close(dinv, exp_dinv, max(acc_tol, in_tol), "dinv")

        out = CPU.infonce_forward_backward(q, k, c, symmetric, 0.37)
        expected = DENSE.infonce_forward_backward(q64, k64, c64, symmetric, 0.37)
        for name, a, e, tol in zip(
            ("row_loss", "lse", "dq", "dk", "dinv"), out, expected, (acc_tol, acc_tol, in_tol, in_tol, in_tol)
        ):
            assert_close(a, e, tol, f"forward_backward {name}")


def test_infonce_kernels_float16():
    q, k, c = _infonce_inputs(33, 40, 20, torch.float16, normalized=True)
    q64, k64, c64 = _as64(q, k, c)
    acc_tol, in_tol = KERNEL_TOL[torch.float16]
    out = CPU.infonce_forward_backward(q, k, c, False, 1.0)
    expected = DENSE.infonce_forward_backward(q64, k64, c64, False, 1.0)
    for a, e, tol in zip(out, expected, (acc_tol, acc_tol, in_tol, in_tol, in_tol)):
        assert_close(a, e, tol)


def test_infonce_results_do_not_depend_on_threads():
    q, k, c = _infonce_inputs(300, 310, 17, torch.float64, normalized=True)
    with cpu_tuning(infonce_block_rows=16):
        with num_threads(1):
            one = CPU.infonce_forward_backward(q, k, c, False, 0.5) + CPU.infonce_forward(q, k, c, False)
        two = CPU.infonce_forward_backward(q, k, c, False, 0.5) + CPU.infonce_forward(q, k, c, False)
    for a, b in zip(one, two):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_skips_dk_when_not_asked_for(dtype, symmetric):
    # need_k False (a frozen teacher's keys): dk is None, dq and dinv are bit for bit the full call's, in the
    # one-pass forward-backward, the two-pass one (symmetric) and the backward alone (column-chunked tiles)
    q, k, c = _infonce_inputs(70, 70 if symmetric else 90, 12, dtype, normalized=True)
    w = torch.linspace(0.5, 1.5, 70).to(c.dtype)
    with cpu_tuning(infonce_block_rows=16):
        full = CPU.infonce_forward_backward(q, k, c, symmetric, 0.3)
        part = CPU.infonce_forward_backward(q, k, c, symmetric, 0.3, need_k=False)
        lse = full[1]
        with cpu_tuning(infonce_max_tile_cols=32):
            full_b = CPU.infonce_backward(w, q, k, c, lse, symmetric)
            part_b = CPU.infonce_backward(w, q, k, c, lse, symmetric, need_k=False)
    assert part[3] is None and part_b[1] is None
    for a, b in zip(part[:3] + part[4:], full[:3] + full[4:]):
        assert torch.equal(a, b)
    assert torch.equal(part_b[0], full_b[0]) and torch.equal(part_b[2], full_b[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_is_right_for_any_worker_split(threads, dtype, symmetric):
    # Each worker runs a contiguous range of row blocks with its own tile and dK accumulator (merged in
    # chunk order); until the extension was compiled with -fopenmp these ranges ran one after the other,
    # so this is where a race between workers would show: a result that moves between two calls, or
    # leaves float64. 150 queries in 16-row blocks against 170 keys (150 for the symmetric loss, which
    # pairs row i with key i both ways) in 48-column chunks: 10 ragged blocks, uneven per worker, and the
    # column-chunked (online log-sum-exp) path.
    q, k, c = _infonce_inputs(150, 150 if symmetric else 170, 24, dtype, normalized=True)
    q64, k64, c64 = _as64(q, k, c)
    acc_tol, in_tol = KERNEL_TOL[dtype]
    grad_rows = torch.linspace(0.5, 1.5, 150)
    expected_fb = DENSE.infonce_forward_backward(q64, k64, c64, symmetric, 0.7)
    with cpu_tuning(infonce_block_rows=16, infonce_max_tile_cols=48), num_threads(threads):
        runs = []
        for _ in range(2):
            row_loss, lse = CPU.infonce_forward(q, k, c, symmetric)
            grads = CPU.infonce_backward(grad_rows, q, k, c, lse, symmetric)
            runs.append((row_loss, lse, *grads, *CPU.infonce_forward_backward(q, k, c, symmetric, 0.7)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # deterministic for a given thread count
    row_loss, lse, dq, dk, dinv, *fused = runs[0]
    expected_bwd = DENSE.infonce_backward(grad_rows.double(), q64, k64, c64, expected_fb[1], symmetric)
    for a, e, tol in zip((row_loss, lse, dq, dk, dinv), (*expected_fb[:2], *expected_bwd),
                         (acc_tol, acc_tol, in_tol, in_tol, in_tol)):
        assert_close(a, e, tol)
    for a, e, tol in zip(fused, expected_fb, (acc_tol, acc_tol, in_tol, in_tol, in_tol)):
        assert_close(a, e, tol)


# ---------------------------------------------------------------------------- kernel level: HSIC


def _hsic_inputs(n, dx, dz, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    z = torch.randn(n, dz, generator=g, dtype=torch.float64)
    z[:, : min(dx, dz)] += x[:, : min(dx, dz)]  # dependent, so HSIC is not ~0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gammas = torch.tensor([0.5 / dx, 0.5 / dz], dtype=acc)
    return x.to(dtype), z.to(dtype), gammas


@pytest.mark.parametrize("n,dx,dz", HSIC_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("tiling", list(TILINGS))
def test_hsic_kernels_match_dense(n, dx, dz, dtype, kernel, tiling):
    acc_tol, in_tol = KERNEL_TOL[dtype]
    x, z, gammas = _hsic_inputs(n, dx, dz, dtype)
    x64, z64, g64 = _as64(x, z, gammas)
    with cpu_tuning(**TILINGS[tiling]):
        sums, rk, rl = CPU.hsic_stats(x, z, gammas, kernel)
        e_sums, e_rk, e_rl = DENSE.hsic_stats(x64, z64, g64, kernel)
        assert sums.dtype == rk.dtype == rl.dtype == gammas.dtype
        assert sums.shape == (3,) and rk.shape == rl.shape == (n,)
        assert_close(sums, e_sums, acc_tol, "sums")
        assert_close(rk, e_rk, acc_tol, "rowsum_k")
        assert_close(rl, e_rl, acc_tol, "rowsum_l")

        gen = torch.Generator().manual_seed(2)
        g_sums = torch.randn(3, generator=gen, dtype=torch.float64)
        g_rk = torch.randn(n, generator=gen, dtype=torch.float64)
        g_rl = torch.randn(n, generator=gen, dtype=torch.float64)
        acc = gammas.dtype
        dx_, dz_ = CPU.hsic_stats_backward(g_sums.to(acc), g_rk.to(acc), g_rl.to(acc), x, z, gammas, kernel)
        e_dx, e_dz = DENSE.hsic_stats_backward(g_sums, g_rk, g_rl, x64, z64, g64, kernel)
        assert dx_.dtype == dz_.dtype == dtype
        assert_close(dx_, e_dx, in_tol, "dx")
        assert_close(dz_, e_dz, in_tol, "dz")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiling", list(TILINGS))
def test_hsic_rbf_diagonal_is_exactly_one(dtype, tiling):
    # Rows of norm 60 in random directions and γ = 1: every off-diagonal exp(−γ‖a_i − a_j‖²) is 0
    # in float32 and float64, so K = L = I exactly. The expansion ‖a_i‖² + ‖a_i‖² − 2a_i·a_i leaves
    # noise ~u·‖a_i‖² on the diagonal, so only a kernel that writes K_ii = exp(0) gives the exact
    # statistics (n, n, n), row sums 1 and zero gradients. n = 37 puts the diagonal at every lane of
    # the 16-wide epilogue and on ragged edge tiles with the small tilings.
    n = 37
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 384, generator=g, dtype=torch.float64)
    z = torch.randn(n, 24, generator=g, dtype=torch.float64)
    x = (60 * x / x.norm(dim=1, keepdim=True)).to(dtype)
    z = (60 * z / z.norm(dim=1, keepdim=True)).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gammas = torch.tensor([1.0, 1.0], dtype=acc)
    with cpu_tuning(**TILINGS[tiling]):
        sums, rk, rl = CPU.hsic_stats(x, z, gammas, "rbf")
        assert sums.tolist() == [n, n, n]
        assert (rk == 1).all() and (rl == 1).all()
        grads = (torch.tensor([1.0, 0.5, 0.25], dtype=acc), torch.ones(n, dtype=acc), torch.ones(n, dtype=acc))
        dx, dz = CPU.hsic_stats_backward(*grads, x, z, gammas, "rbf")
        assert (dx == 0).all() and (dz == 0).all()


def test_hsic_kernels_float16():
    x, z, gammas = _hsic_inputs(40, 9, 5, torch.float16)
    x64, z64, g64 = _as64(x, z, gammas)
    acc_tol, in_tol = KERNEL_TOL[torch.float16]
    for a, e in zip(CPU.hsic_stats(x, z, gammas, "rbf"), DENSE.hsic_stats(x64, z64, g64, "rbf")):
        assert_close(a, e, acc_tol)
    g = (torch.ones(3), torch.ones(40), torch.ones(40))
    out = CPU.hsic_stats_backward(*g, x, z, gammas, "rbf")
    expected = DENSE.hsic_stats_backward(*(t.double() for t in g), x64, z64, g64, "rbf")
    for a, e in zip(out, expected):
        assert_close(a, e, in_tol)


def test_hsic_results_do_not_depend_on_threads():
    x, z, gammas = _hsic_inputs(150, 7, 4, torch.float64)
    grads = (torch.ones(3, dtype=torch.float64), torch.ones(150, dtype=torch.float64), torch.zeros(150, dtype=torch.float64))
    with cpu_tuning(hsic_block=16):
        with num_threads(1):
            one = CPU.hsic_stats(x, z, gammas, "rbf") + CPU.hsic_stats_backward(*grads, x, z, gammas, "rbf")
        two = CPU.hsic_stats(x, z, gammas, "rbf") + CPU.hsic_stats_backward(*grads, x, z, gammas, "rbf")
    for a, b in zip(one, two):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_hsic_backward_skips_the_gradient_not_asked_for(dtype, kernel):
    # need_x / need_z False: that gradient is None (float32 / bf16 skip its product GEMMs), the other one is
    # bit for bit the one computed with both
    x, z, gammas = _hsic_inputs(150, 7, 5, dtype)
    grads = (torch.tensor([1.0, 0.3, -0.2]), torch.linspace(-1, 1, 150), torch.linspace(0.5, -0.5, 150))
    grads = tuple(t.to(gammas.dtype) for t in grads)
    with cpu_tuning(hsic_block=16):
        dx, dz = CPU.hsic_stats_backward(*grads, x, z, gammas, kernel)
        only_z = CPU.hsic_stats_backward(*grads, x, z, gammas, kernel, need_x=False)
        only_x = CPU.hsic_stats_backward(*grads, x, z, gammas, kernel, need_z=False)
        neither = CPU.hsic_stats_backward(*grads, x, z, gammas, kernel, need_x=False, need_z=False)
    assert only_z[0] is None and only_x[1] is None and neither == (None, None)
    assert torch.equal(only_z[1], dz) and torch.equal(only_x[0], dx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3, 5, 7])
def test_hsic_backward_is_right_for_any_worker_split(threads, dtype):
    # The float32 / bf16 backward gives each worker a contiguous range of tile pairs and its own n × D
    # accumulators, merged in chunk order. 150 rows in 16-row tiles: 10 blocks, 55 pairs, a ragged last
    # block; with 3, 5 or 7 workers the ranges end inside rows of tile pairs and many workers never touch
    # some row blocks.
    x, z, gammas = _hsic_inputs(150, 7, 5, dtype)
    x64, z64, g64 = _as64(x, z, gammas)
    grads = (torch.tensor([1.0, 0.3, -0.2]), torch.linspace(-1, 1, 150), torch.linspace(0.5, -0.5, 150))
    expected = DENSE.hsic_stats_backward(*(t.double() for t in grads), x64, z64, g64, "rbf")
    with cpu_tuning(hsic_block=16), num_threads(threads):
        first = CPU.hsic_stats_backward(*grads, x, z, gammas, "rbf")
        again = CPU.hsic_stats_backward(*grads, x, z, gammas, "rbf")
    for a, b, e in zip(first, again, expected):
        assert torch.equal(a, b)  # deterministic for a given thread count
        assert_close(a, e, KERNEL_TOL[dtype][1])


# ------------------------------------------------------------------------------------ end to end


def _layout(t, layout):
    """A leaf holding ``t``'s values in a non-contiguous layout, and the view that maps the leaf (or
    its gradient) back to ``t``'s shape."""
    if layout == "contiguous":
        view = lambda a: a  # noqa: E731
        leaf = t.clone()
    elif layout == "transposed":
        view = lambda a: a.t()  # noqa: E731
        leaf = t.t().contiguous()
    else:  # strided: every second element
        view = lambda a: a[..., 0]  # noqa: E731
        leaf = torch.stack([t, torch.zeros_like(t)], dim=-1)
    return leaf.requires_grad_(), view


def _run_infonce(backend, q0, k0, tau, layout, weights, **kw):
    q_leaf, q_view = _layout(q0, layout)
    k_leaf, k_view = _layout(k0, layout)
    t = tau.clone().requires_grad_()
    loss = F.infonce(q_view(q_leaf), k_view(k_leaf), temperature=t, backend=backend, **kw)
    loss.backward(weights if loss.dim() else None)
    return loss.detach(), q_view(q_leaf.grad), k_view(k_leaf.grad), t.grad


@pytest.mark.parametrize("b,n,d", [(1, 1, 1), (1, 4, 3), (2, 3, 77), (7, 7, 3), (129, 129, 384), (129, 150, 77), (1000, 1000, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_infonce_matches_reference(b, n, d, dtype, reduction, symmetric, normalize):
    if symmetric:
        n = b
    if b >= 1000 and (dtype != torch.float32 or not normalize):
        pytest.skip("the largest shape only in float32, normalised")
    acc_tol, in_tol = E2E_TOL[dtype]
    g = torch.Generator().manual_seed(3)
    scale = 1.0 if normalize else 0.3
    q0 = (scale * torch.randn(b, d, generator=g, dtype=torch.float64)).to(dtype)
    k0 = (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.tensor(0.07 if normalize else 1.3, dtype=acc)
    weights = torch.randn(b, generator=g, dtype=torch.float64).to(acc)
    kw = dict(symmetric=symmetric, reduction=reduction, normalize=normalize)
    got = _run_infonce("cpu", q0, k0, tau, "contiguous", weights, **kw)
    ref = _run_infonce("reference", q0, k0, tau, "contiguous", weights, **kw)
    assert got[0].dtype == ref[0].dtype and got[0].shape == ref[0].shape
    for name, a, e, tol in zip(("loss", "dq", "dk", "dtemperature"), got, ref, (acc_tol, in_tol, in_tol, in_tol)):
        assert a.dtype == e.dtype, name
        assert_close(a, e, tol, name)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_infonce_non_contiguous_inputs(layout, reduction):
    g = torch.Generator().manual_seed(4)
    q0, k0 = torch.randn(9, 13, generator=g), torch.randn(11, 13, generator=g)
    tau, weights = torch.tensor(0.1), torch.randn(9, generator=g)
    got = _run_infonce("cpu", q0, k0, tau, layout, weights, reduction=reduction)
    ref = _run_infonce("reference", q0, k0, tau, "contiguous", weights, reduction=reduction)
    for a, e in zip(got, ref):
        assert_close(a, e, 1e-4)


def _run_hsic(backend, x0, z0, layout, **kw):
    x_leaf, x_view = _layout(x0, layout)
    z_leaf, z_view = _layout(z0, layout)
    value = F.hsic(x_view(x_leaf), z_view(z_leaf), backend=backend, **kw)
    value.backward()
    return value.detach(), x_view(x_leaf.grad), z_view(z_leaf.grad)


@pytest.mark.parametrize("n,dx,dz", [(2, 3, 1), (3, 1, 2), (65, 77, 5), (513, 16, 384)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("normalized", [False, True])
def test_hsic_matches_reference(n, dx, dz, dtype, kernel, normalized):
    acc_tol, in_tol = E2E_TOL[dtype]
    x0, z0, _ = _hsic_inputs(n, dx, dz, dtype, seed=5)
    kw = dict(kernel=kernel, normalized=normalized, gamma="median", gamma_z=0.5 / dz)
    got = _run_hsic("cpu", x0, z0, "contiguous", **kw)
    ref = _run_hsic("reference", x0, z0, "contiguous", **kw)
    assert got[0].dtype == ref[0].dtype
    # HSIC is a difference of O(n²)-term sums: compare it at the scale of those terms
    for name, a, e, tol in zip(("hsic", "dx", "dz"), got, ref, (acc_tol, in_tol, in_tol)):
        assert a.dtype == e.dtype, name
        assert_close(a, e, tol * (10 if dtype == torch.float32 and name == "hsic" else 1), name)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_hsic_non_contiguous_inputs(layout):
    x0, z0, _ = _hsic_inputs(21, 6, 4, torch.float64, seed=6)
    got = _run_hsic("cpu", x0, z0, layout, gamma=0.2, normalized=True)
    ref = _run_hsic("reference", x0, z0, "contiguous", gamma=0.2, normalized=True)
    for a, e in zip(got, ref):
        assert_close(a, e, 1e-9)


# -------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_infonce_gradcheck(reduction, symmetric, normalize):
    g = torch.Generator().manual_seed(7)
    b, n = 4, (4 if symmetric else 6)
    q = torch.randn(b, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)

    def fn(q, k, t):
        return F.infonce(q, k, temperature=t, symmetric=symmetric, reduction=reduction, normalize=normalize, backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, t))


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("normalized", [False, True])
def test_hsic_gradcheck(kernel, normalized):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, z):
        return F.hsic(x, z, gamma=0.4, gamma_z=0.7, kernel=kernel, normalized=normalized, backend="cpu")

    assert torch.autograd.gradcheck(fn, (x, z))


# ----------------------------------------------------------------------------------------- memory


def largest_allocation(fn) -> int:
    """Largest net CPU allocation attributed to a single op while ``fn`` runs, from the profiler's
    allocator events. One thread, so every allocation (the kernels' scratch tiles and accumulators
    included) happens on the profiled thread."""
    from torch.profiler import ProfilerActivity, profile

    with num_threads(1), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("case", ["fused", "backward", "symmetric", "forward"])
def test_infonce_never_allocates_similarity_matrix(case):
    b = n = 2048
    g = torch.Generator().manual_seed(9)
    q = torch.randn(b, 32, generator=g, requires_grad=case != "forward")
    k = torch.randn(n, 32, generator=g, requires_grad=case != "forward")
    kw = dict(symmetric=case == "symmetric", reduction="none" if case == "backward" else "mean")

    def run(backend):
        def fn():
            loss = F.infonce(q, k, backend=backend, **kw)
            if case != "forward":
                loss.sum().backward()

        return largest_allocation(fn)

    matrix_bytes = b * n * 4
    assert run("reference") >= matrix_bytes  # the check sees a B×N matrix when there is one
    assert run("cpu") <= matrix_bytes / 8


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_hsic_never_allocates_kernel_matrix(kernel):
    n = 2048
    g = torch.Generator().manual_seed(10)
    x = torch.randn(n, 32, generator=g, requires_grad=True)
    z = torch.randn(n, 16, generator=g, requires_grad=True)

    def run(backend):
        return largest_allocation(lambda: F.hsic(x, z, gamma=0.05, kernel=kernel, normalized=True, backend=backend).backward())

    assert run("reference") >= n * n * 4
    assert run("cpu") <= n * n * 4 / 8


# ------------------------------------------------------------------------ backend registration


def test_cpu_backend_is_available_and_chosen_by_auto():
    assert CPU.unavailable_reason() is None
    assert {"cpu"} <= {b.name for b in ibkd.backends() if b.available}
    reference = get_backend("reference")
    cpu = torch.device("cpu")
    from ibkd.backend.cpu import PREFER_REFERENCE_BELOW

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert CPU.supports(cpu, dtype) is None
        for op in ("infonce", "hsic"):
            big = max(2, PREFER_REFERENCE_BELOW[op])
            shape = (big, big, 4) if op == "infonce" else (big, 4, 4)
            assert CPU.priority(cpu, dtype, op, shape) > reference.priority(cpu, dtype, op, shape)
            assert resolve_backend("auto", cpu, dtype, op, shape).name == "cpu"
            if PREFER_REFERENCE_BELOW[op] > 1:  # below the measured crossover, auto takes the reference
                small = PREFER_REFERENCE_BELOW[op] - 1
                shape = (small, small, 4) if op == "infonce" else (small, 4, 4)
                assert CPU.priority(cpu, dtype, op, shape) < reference.priority(cpu, dtype, op, shape)
                assert resolve_backend("auto", cpu, dtype, op, shape).name == "reference"
    assert CPU.supports(torch.device("meta"), torch.float32) is not None
    assert CPU.supports(torch.device("cpu"), torch.int64) is not None


def test_missing_extension_is_reported_not_raised(monkeypatch):
    import ibkd.backend.cpu as cpu_module

    monkeypatch.setattr(cpu_module, "_C", None)
    monkeypatch.setattr(cpu_module, "_IMPORT_ERROR", ImportError("No module named 'ibkd._C'"))
    backend = cpu_module.CPUBackend()  # must not raise
    reason = backend.unavailable_reason()
    assert "ibkd._C is not built" in reason and "No module named" in reason and "pip install" in reason


def test_kernel_errors_name_the_argument():
    q, k, c = torch.randn(3, 4), torch.randn(5, 4), torch.tensor(2.0)
    with pytest.raises(RuntimeError, match="q must be 2-D"):
        _C.infonce_forward(q[0], k, c, False)
    with pytest.raises(RuntimeError, match="same feature dimension"):
        _C.infonce_forward(q, torch.randn(5, 3), c, False)
    with pytest.raises(RuntimeError, match="N >= B"):
        _C.infonce_forward(q, k[:2], c, False)
    with pytest.raises(RuntimeError, match="symmetric"):
        _C.infonce_forward(q, k, c, True)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        _C.infonce_backward(torch.ones(3), q, k, c, torch.zeros(4), False)
    with pytest.raises(RuntimeError, match="kernel must be"):
        _C.hsic_stats(q, q, torch.ones(2), "poly")
    with pytest.raises(RuntimeError, match="same number of rows"):
        _C.hsic_stats(q, k, torch.ones(2), "rbf")
    with pytest.raises(RuntimeError, match="unknown setting"):
        _C.set_cpu_tuning("tile", 4)


# ------------------------------------------------------- bf16 inputs: bf16 tile GEMMs (gemm.cpp)
#
# bf16 inputs run their tile GEMMs as bf16 × bf16 → float32 (oneDNN) when _C.cpu_gemm_info() reports
# bf16_gemm_active; set_cpu_tuning("bf16_gemm", 0) upcasts them to the float32 path instead. Here the
# kernels on bf16 inputs are compared with the float64 dense kernels on the same (bf16) values, with
# bounds derived from where bf16 enters: products of bf16 values are exact in float32, so the logits,
# Gram tiles, losses, log-sum-exps and HSIC statistics carry float32 accumulation error only
# (≤ 1e-5 of the size of the summed terms); the gradient GEMMs take the float32 weight tiles (G, W,
# V) rounded to bf16 (≤ 2⁻⁸ relative per entry), and the gradients are returned in bf16 (≤ 2⁻⁸
# relative rounding, one ulp 2⁻⁷ where two values straddle a boundary).

BF16_INFO = _C.cpu_gemm_info()


def test_bf16_gemm_status_is_reported():
    assert isinstance(BF16_INFO["bf16_gemm"], str) and BF16_INFO["bf16_gemm"]
    if BF16_INFO["bf16_gemm_available"]:
        assert "oneDNN" in BF16_INFO["bf16_gemm"]
    assert _C.cpu_tuning()["bf16_gemm"] == 1
    with cpu_tuning(bf16_gemm=0):
        assert not _C.cpu_gemm_info()["bf16_gemm_active"]
    with pytest.raises(RuntimeError, match="0 or 1"):
        _C.set_cpu_tuning("bf16_gemm", 2)


def test_bf16_gemm_is_active_on_avx512_bf16_machines():
    # where the CPU has AVX512-BF16 and torch ships oneDNN with its symbol table, the bf16 kernels
    # must take the bf16 tile GEMMs (else bf16 runs at float32 speed without anyone noticing)
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if " avx512_bf16" not in flags or not torch.backends.mkldnn.is_available():
        pytest.skip("no AVX512-BF16 / oneDNN here")
    assert BF16_INFO["bf16_gemm_active"], BF16_INFO["bf16_gemm"]


def test_gemm_routes_follow_what_this_cpu_supports():
    # AVX2-only CPUs (AMD EPYC Zen 3, 2026-12-03): torch's mkldnn_matmul refuses float32 and oneDNN's bf16
    # GEMM is a ~1 GFLOP/s reference loop. The probe must fall back to ATen, say why, and keep bf16 upcast.
    info = _C.cpu_gemm_info()
    assert info["onednn_available"] == (info["onednn"] == "oneDNN float32 matmul"), info
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if flags and " avx512bw" not in flags and " avx_ne_convert" not in flags:
        assert not info["onednn_available"] and "refused" in info["onednn"], info
    if not info["native_bf16"]:
        assert not info["bf16_gemm_available"] and "native bf16" in info["bf16_gemm"], info
    if flags:
        assert info["native_bf16"] == (" avx512_bf16" in flags or " amx_bf16" in flags), info
    # whatever the route, the tile GEMM is exact float32 (float64 reference)
    a, b = torch.randn(65, 384, dtype=torch.float64), torch.randn(384, 70, dtype=torch.float64)
    out = torch.full((65, 70), float("nan"))
    _C.tile_gemm(out, a.float(), b.float(), 0.0, 1.0)
    torch.testing.assert_close(out.double(), a.float().double() @ b.float().double(), rtol=1e-5, atol=1e-4)


def test_tile_loops_are_compiled_parallel():
    # at::parallel_for is a header template, parallel only where the extension itself is compiled with
    # OpenMP (setup.py's openmp_flags): without it every kernel ran its chunks one after the other
    import os

    if not torch.backends.openmp.is_available() or os.environ.get("IBKD_CPU_OPENMP", "1") == "0":
        pytest.skip("this torch has no OpenMP, or the build was asked to leave it out")
    assert _C.cpu_gemm_info()["openmp"], "ibkd._C was compiled without -fopenmp: its tile loops run serially"


def test_epilogues_take_the_widest_vector_isa_of_this_cpu():
    # AVX-512 where present, else AVX2+FMA (the AVX2-only AMD EPYC), else scalar; simd=0 forces scalar.
    # The numerical checks of every version are the kernel tests above (default vs the mkl_scalar tiling).
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    info = _C.cpu_gemm_info()
    if flags:
        expected = "avx512" if " avx512f" in flags else "avx2+fma" if (" avx2" in flags and " fma" in flags) else "scalar"
        assert info["epilogues"] == expected, info
    with cpu_tuning(simd=0):
        assert _C.cpu_gemm_info()["epilogues"] == "scalar"
    assert _C.cpu_gemm_info()["epilogues"] == info["epilogues"]


def test_bf16_tile_gemm_matches_float64():
    # fuzzed shapes (1 … 300, ones), both transpositions of each operand, alpha/beta, NaN in a beta = 0 output
    g = torch.Generator().manual_seed(12)

    def size():
        return int(torch.randint(1, 300, (1,), generator=g)) if torch.rand(1, generator=g) > 0.2 else 1

    for trial in range(40):
        m, n, k = size(), size(), size()
        ta, tb = bool(trial & 1), bool(trial & 2)
        a = torch.randn(k, m, generator=g).bfloat16().t() if ta else torch.randn(m, k, generator=g).bfloat16()
        b = torch.randn(n, k, generator=g).bfloat16().t() if tb else torch.randn(k, n, generator=g).bfloat16()
        beta, alpha = [(0.0, 1.0), (1.0, 1.0), (0.5, 20.0), (0.0, -0.3)][trial % 4]
        out = torch.full((m, n), float("nan")) if beta == 0 else torch.randn(m, n, generator=g)
        c0 = out.double() if beta else torch.zeros(m, n, dtype=torch.float64)
        expected = beta * c0 + alpha * (a.double() @ b.double())
        terms = abs(beta) * c0.abs() + abs(alpha) * (a.double().abs() @ b.double().abs())
        _C.tile_gemm(out, a, b, beta, alpha)
        err = (out.double() - expected).abs()
        assert (err <= 1e-5 * terms + 1e-30).all(), f"trial {trial}: {m}x{k}x{n} ta={ta} tb={tb}: {err.max()}"


def _bf16_infonce_case(b, n, d, case, seed):
    """q, k (bf16) and 1/τ for the hostile cases."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k[:b] = 0.6 * q + 0.8 * k[:b]
    c = 20.0
    if case == "huge_norms":  # |q|, |k| ~ 1e3: logits ~ 1e4, one-hot softmax rows
        q, k, c = 1e3 * q, 3e2 * k, 0.05
    elif case == "tiny_tau":  # unit rows, τ = 1e-4
        c = 1e4
    elif case == "shared_offset":  # keys around a common offset 50× their spread (unnormalised embeddings)
        u = torch.nn.functional.normalize(torch.randn(1, d, generator=g, dtype=torch.float64), dim=1)
        k = k + 50.0 * u
        q = q + 50.0 * u
        c = 0.02
    return q.bfloat16(), k.bfloat16(), torch.tensor(c)


def _bf16_grad_bound(expected, terms):
    # returned in bf16: one ulp (2⁻⁷, 7 stored significand bits) of the largest entry where the kernel's
    # and float64's values straddle a rounding boundary; G/W rounded to bf16: 2⁻⁸ of the summed terms
    return 2.0**-7 * expected.abs().max().item() + 2.0**-8 * terms + 1e-30


@pytest.mark.parametrize("b,n,d", [(1, 1, 1), (1, 9, 5), (2, 3, 1000), (7, 19, 1), (33, 100, 77), (129, 129, 384), (300, 301, 17)])
@pytest.mark.parametrize("case", ["plain", "huge_norms", "tiny_tau", "shared_offset"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tiling", ["default", "small", "bf16_upcast"])
def test_infonce_bf16_kernels_against_float64(b, n, d, case, symmetric, tiling):
    if symmetric:
        n = b
    q, k, c = _bf16_infonce_case(b, n, d, case, seed=b * 1000 + n + d)
    q64, k64, c64 = _as64(q, k, c)
    tilings = {"default": {}, "small": TILINGS["small"], "bf16_upcast": dict(bf16_gemm=0)}
    w = 0.37
    with cpu_tuning(**tilings[tiling]):
        out = CPU.infonce_forward_backward(q, k, c, symmetric, w)
        fwd = CPU.infonce_forward(q, k, c, symmetric)
        rows_w = torch.full((b,), w)
        bwd = CPU.infonce_backward(rows_w, q, k, c, fwd[1], symmetric)
    exp = DENSE.infonce_forward_backward(q64, k64, c64, symmetric, w)
    assert out[0].dtype == out[1].dtype == torch.float32 and out[2].dtype == out[3].dtype == torch.bfloat16
    # logits: exact bf16 products, float32 sums; the row loss and lse are differences/sums of terms of
    # size c·|q||k| + log N
    s = c64 * (q64 @ k64.T)
    logit_scale = s.abs().max().item() + torch.log(torch.tensor(float(n))).item()
    for name, a, e in (("row_loss", out[0], exp[0]), ("lse", out[1], exp[1]), ("fwd row_loss", fwd[0], exp[0]), ("fwd lse", fwd[1], exp[1])):
        err = (a.double() - e).abs().max().item()
        assert err <= 1e-5 * logit_scale + 1e-6, f"{name}: {err} (scale {logit_scale})"
    # gradients: dq_i = c Σ_j G_ij k_j, dk_j = c Σ_i G_ij q_i with |G| summed as the terms' size,
    # k and q taken about their mean (the kernels cancel the offset part of G's rounding)
    p = torch.softmax(s, dim=1)
    G = w * p - w * torch.eye(b, n, dtype=torch.float64)
    if symmetric:
        G = 0.5 * w * p + 0.5 * w * torch.softmax(s, dim=0) - w * torch.eye(b, n, dtype=torch.float64)
    k_spread = (k64 - k64.mean(0)).abs().max().item()
    q_spread = (q64 - q64.mean(0)).abs().max().item()
    dq_terms = c64.item() * G.abs().sum(1).max().item() * max(k_spread, 1e-30)
    dk_terms = c64.item() * G.abs().sum(0).max().item() * max(q_spread, 1e-30)
    # plus float32 rounding of the logits and log-sum-exps (≤ 1e-5·logit_scale absolute), which moves
    # each w·P_ij by that much relative, before it cancels against w·δ_ij (P_ii ≈ 1 leaves G_ii ≪ w):
    # c·Σ(w·P + w·δ)·max|k| (or |q|) times it; the float32 path has that error too
    P_terms = G.abs() + 2 * w * torch.eye(b, n, dtype=torch.float64)
    fp32_dq = 1e-5 * logit_scale * c64.item() * P_terms.sum(1).max().item() * k64.abs().max().item()
    fp32_dk = 1e-5 * logit_scale * c64.item() * P_terms.sum(0).max().item() * q64.abs().max().item()
    for name, a, e, terms, fp32 in (("dq", out[2], exp[2], dq_terms, fp32_dq), ("dk", out[3], exp[3], dk_terms, fp32_dk),
                                    ("bwd dq", bwd[0], exp[2], dq_terms, fp32_dq), ("bwd dk", bwd[1], exp[3], dk_terms, fp32_dk)):
        err = (a.double() - e).abs().max().item()
        bound = _bf16_grad_bound(e, terms) + fp32
        assert err <= bound, f"{name}: {err} > {bound}"


def _bf16_hsic_case(n, dx, dz, case, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    z = torch.randn(n, dz, generator=g, dtype=torch.float64)
    z[:, : min(dx, dz)] += x[:, : min(dx, dz)]
    if case == "huge_norms":  # centred rows of norm ~ 300 (what the functional hands the kernels)
        x, z = 300 * x / x.norm(dim=1, keepdim=True).mean(), 300 * z / z.norm(dim=1, keepdim=True).mean()
    x, z = x - x.mean(0), z - z.mean(0)
    x16, z16 = x.bfloat16(), z.bfloat16()
    # median-heuristic-like γ: K entries spread over (0, 1), not all ~0 or ~1
    gx = 1.0 / max(1e-30, torch.cdist(x16.double(), x16.double()).pow(2).median().item())
    gz = 1.0 / max(1e-30, torch.cdist(z16.double(), z16.double()).pow(2).median().item())
    return x16, z16, torch.tensor([gx, gz], dtype=torch.float32)


@pytest.mark.parametrize("n,dx,dz", [(1, 3, 2), (2, 1, 1), (3, 1000, 2), (65, 77, 5), (513, 384, 16), (700, 17, 384)])
@pytest.mark.parametrize("case", ["plain", "huge_norms"])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("tiling", ["default", "small", "bf16_upcast"])
def test_hsic_bf16_kernels_against_float64(n, dx, dz, case, kernel, tiling):
    x, z, gammas = _bf16_hsic_case(n, dx, dz, case, seed=n + dx + dz)
    x64, z64, g64 = _as64(x, z, gammas)
    tilings = {"default": {}, "small": TILINGS["small"], "bf16_upcast": dict(bf16_gemm=0)}
    gen = torch.Generator().manual_seed(13)
    g_sums = torch.randn(3, generator=gen, dtype=torch.float64)
    g_rk = torch.randn(n, generator=gen, dtype=torch.float64)
    g_rl = torch.randn(n, generator=gen, dtype=torch.float64)
    with cpu_tuning(**tilings[tiling]):
        sums, rk, rl = CPU.hsic_stats(x, z, gammas, kernel)
        dx_, dz_ = CPU.hsic_stats_backward(g_sums.float(), g_rk.float(), g_rl.float(), x, z, gammas, kernel)
    e_sums, e_rk, e_rl = DENSE.hsic_stats(x64, z64, g64, kernel)
    e_dx, e_dz = DENSE.hsic_stats_backward(g_sums, g_rk, g_rl, x64, z64, g64, kernel)
    assert sums.dtype == torch.float32 and dx_.dtype == dz_.dtype == torch.bfloat16
    from ibkd.backend.reference import kernel_matrix

    K = kernel_matrix(x64, g64[0].item(), kernel)
    L = kernel_matrix(z64, g64[1].item(), kernel)
    # statistics: float32 sums of n² products of float32 kernel entries; RBF entries come from the
    # expansion 2γ·a_i·a_j − γ(‖a_i‖² + ‖a_j‖²), whose float32 error is ~1e-6·γ·(‖a_i‖² + ‖a_j‖²)
    sq = max(x64.pow(2).sum(1).max().item() * g64[0].item(), z64.pow(2).sum(1).max().item() * g64[1].item())
    entry_rel = 1e-5 * (1 + (sq if kernel == "rbf" else 0))
    stat_terms = torch.stack([(K * L).abs().sum(), (K * K).sum(), (L * L).sum()])
    assert ((sums.double() - e_sums).abs() <= 4 * entry_rel * stat_terms + 1e-6).all(), (sums, e_sums)
    assert ((rk.double() - e_rk).abs() <= 2 * entry_rel * K.abs().sum(1) + 1e-6).all()
    assert ((rl.double() - e_rl).abs() <= 2 * entry_rel * L.abs().sum(1) + 1e-6).all()
    # gradients: W X (linear) or 2γ Σ_j W_ij (x_j − x_i) (RBF) with W's entries rounded to bf16
    gk = g_rk.abs().max().item()
    gl = g_rl.abs().max().item()
    W = (2 * gk + 2 * abs(g_sums[0]) * L.abs() + 4 * abs(g_sums[1]) * K.abs()) * (K.abs() if kernel == "rbf" else 1)
    V = (2 * gl + 2 * abs(g_sums[0]) * K.abs() + 4 * abs(g_sums[2]) * L.abs()) * (L.abs() if kernel == "rbf" else 1)
    for name, a, e, Wm, inp, gam in (("dx", dx_, e_dx, W, x64, g64[0].item()), ("dz", dz_, e_dz, V, z64, g64[1].item())):
        if kernel == "rbf":
            spread = (inp.unsqueeze(0) - inp.unsqueeze(1)).abs().amax(dim=(0, 2))  # max_j |x_j − x_i| per i
            terms = (2 * gam * Wm.sum(1) * spread).max().item()
            fwd_err = 2 * gam * (Wm.sum(1) * spread).max().item() * entry_rel * 4
        else:
            terms = (Wm.sum(1) * inp.abs().max()).max().item()
            fwd_err = 0.0
        err = (a.double() - e).abs().max().item()
        bound = _bf16_grad_bound(e, terms) + fwd_err + 1e-5 * terms
        assert err <= bound, f"{name}: {err} > {bound}"
