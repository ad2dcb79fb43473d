"""The `cuda` backend (csrc/cuda) against the dense executable spec of the kernel contract.

GPU tests (``@pytest.mark.gpu``, skipped without CUDA) compare every kernel-level function, forward
and backward, with :class:`ibkd.testing.DenseKernelBackend` computed in float64 on the very same
(already rounded) inputs, over fuzzed shapes: B = 1, odd sizes, N > B, ragged 64-row tiles,
D ∈ {1, 77, 384, 1024} (1024 also exercises the split of D over several CTAs in the backward),
float32 / bfloat16 / float16 (and float64), symmetric InfoNCE, the temperature gradient, rbf and
linear HSIC. Fresh random inputs on each run; the CUDA caching allocator is filled with NaN bytes
before every call, so an output element a kernel fails to write shows up as NaN. Also: bitwise
determinism, the torch.library ops under ``opcheck``, and ``torch.compile(fullgraph=True)``.

Tolerances are normwise: max|got − expected| ≤ tol · M, where M is the magnitude of what was summed
(e.g. max_i c·Σ_j |G_ij|·|k_j| for dq), so a result that cancels to ~0 is not held to a relative
bound it cannot meet. float32 and float16/bfloat16 share fp32 accumulation; 16-bit gradients add the
rounding of the gradient tile fed to the tensor cores (2⁻⁸ relative in bf16, 2⁻¹¹ in fp16) and of
the output itself.

The CPU tests at the end check what runs without a GPU: the backend loads, says why it cannot run,
and the dispatcher refuses CPU tensors with that reason.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ibkd
from ibkd.backend import get_backend
from ibkd.backend.base import BackendUnavailable
from ibkd.backend.reference import kernel_matrix
from ibkd.testing import DenseKernelBackend

DENSE = DenseKernelBackend()
f64 = torch.float64
HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FWD_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float64: 1e-11, torch.float32: 5e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

# (B, N, D): B = 1, odd sizes, N > B, ragged last tiles, D not a multiple of any tile
INFONCE_SHAPES = [
    (1, 1, 1),
    (1, 7, 77),
    (2, 2, 1),
    (5, 5, 77),
    (17, 40, 384),
    (64, 64, 1024),
    (65, 65, 384),
    (130, 131, 77),
    (257, 257, 1024),
    (300, 701, 384),
]
# (n, dx, dz)
HSIC_SHAPES = [(2, 1, 1), (3, 77, 5), (65, 384, 33), (130, 1024, 77), (200, 77, 1024), (257, 384, 384)]


@pytest.fixture(scope="module")
def cuda_backend():
    impl = get_backend("cuda")
    reason = impl.unavailable_reason() or impl.supports(torch.device("cuda"), torch.float32)
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")
    return impl


def poison_cuda_cache():
    """Fill free blocks of the CUDA caching allocator with 0xFF bytes (NaN in every float dtype), so
    outputs allocated next start as NaN: an element a kernel never writes cannot pass for a value."""
    blocks = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in (2**12, 2**16, 2**20, 2**24, 2**27)]
    del blocks


def check(name, got, expected, magnitude, tol, atol=0.0):
    got, expected = got.detach().to(f64), expected.detach().to(f64)
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite entries (an output element left unwritten?)"
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    bound = tol * max(float(magnitude), 1e-30) + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (tol {tol:g} x magnitude {float(magnitude):.3e})"


def unit_rows(rows, dim, dtype, generator):
    a = torch.randn(rows, dim, device="cuda", dtype=f64, generator=generator)
    return F.normalize(a, dim=1).to(dtype)


def dense_infonce_grad_tile(q, k, c, lse, w, symmetric):
    """G of the contract in float64 (for the magnitudes of the gradient sums)."""
    s = q.to(f64) @ k.to(f64).T
    logits = s * c
    b = q.shape[0]
    eye = torch.eye(b, k.shape[0], dtype=f64, device=q.device)
    if symmetric:
        g = torch.exp(logits - lse[:b, None]) * (w / 2)[:, None] + torch.exp(logits - lse[None, b:]) * (w / 2)[None, :]
        return g - eye * w[:, None], s
    return torch.exp(logits - lse[:, None]) * w[:, None] - eye * w[:, None], s


# ------------------------------------------------------------------------------------ InfoNCE


def _infonce_case(cuda_backend, b, n, d, dtype, symmetric, seed, normalized=True, grad_scale=1.0, inv_temp=20.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if normalized:
        q, k = unit_rows(b, d, dtype, gen), unit_rows(n, d, dtype, gen)
        c = torch.tensor(inv_temp, device="cuda", dtype=acc)
    else:
        q = torch.randn(b, d, device="cuda", generator=gen).to(dtype)
        k = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
        c = torch.tensor(1.0 / math.sqrt(d), device="cuda", dtype=acc)
    w = (torch.randn(b, device="cuda", generator=gen, dtype=f64) * grad_scale).to(acc)

    exp_rows, exp_lse = DENSE.infonce_forward(q.to(f64), k.to(f64), c.to(f64), symmetric)
    exp_dq, exp_dk, exp_dinv = DENSE.infonce_backward(w.to(f64), q.to(f64), k.to(f64), c.to(f64), exp_lse, symmetric)
    g, s = dense_infonce_grad_tile(q, k, c.to(f64), exp_lse, w.to(f64), symmetric)

    poison_cuda_cache()
    rows, lse = cuda_backend.infonce_forward(q, k, c, symmetric)
    poison_cuda_cache()
    dq, dk, dinv = cuda_backend.infonce_backward(w, q, k, c, lse, symmetric)
    torch.cuda.synchronize()

    assert rows.dtype == acc and lse.dtype == acc and dinv.dtype == acc and dinv.dim() == 0
    assert dq.dtype == dtype and dk.dtype == dtype
    logit_scale = (c.to(f64) * s.abs().max()).item() + exp_lse.abs().max().item()
    check("row_loss", rows, exp_rows, logit_scale, FWD_TOL[dtype])
    check("lse", lse, exp_lse, logit_scale, FWD_TOL[dtype])
    c64 = c.to(f64).item()
    # float16's resolution: G/max|w| enters the tensor cores in float16, whose subnormal spacing 2^-24
    # is an absolute floor. Seen on an H200 (2026-12-04) and in the host emulation: at B = N = 2, D = 1
    # (logits ±20) every entry of G is ~1e-18·w, dq and dk ~1e-16, which no float16 output can hold.
    half_floor = 2.0**-24 * c64 * w.abs().max().item() if dtype == torch.float16 else 0.0
    check("dq", dq, exp_dq, c64 * (g.abs() @ k.to(f64).abs()).max().item(), GRAD_TOL[dtype],
          atol=half_floor * k.to(f64).abs().sum(0).max().item())
    check("dk", dk, exp_dk, c64 * (g.abs().T @ q.to(f64).abs()).max().item(), GRAD_TOL[dtype],
          atol=half_floor * q.to(f64).abs().sum(0).max().item())
    # dinv sums B·N products in fp32 whatever the input dtype
    check("dinv", dinv, exp_dinv, (g.abs() * s.abs()).sum().item(), FWD_TOL[torch.float32 if dtype in HALF else dtype])
    return rows, lse, dq, dk, dinv


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", INFONCE_SHAPES, ids=lambda s: "B%d-N%d-D%d" % s)
def test_infonce_parity(cuda_backend, shape, dtype):
    b, n, d = shape
    _infonce_case(cuda_backend, b, n, d, dtype, symmetric=False, seed=hash((b, n, d)) % 10_000)
    if n == b:
        _infonce_case(cuda_backend, b, n, d, dtype, symmetric=True, seed=hash((b, d)) % 10_000 + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 3, 1), (33, 33, 77), (70, 150, 1024)], ids=lambda s: "B%d-N%d-D%d" % s)
def test_infonce_parity_float64(cuda_backend, shape):
    b, n, d = shape
    _infonce_case(cuda_backend, b, n, d, torch.float64, symmetric=False, seed=11)
    if n == b:
        _infonce_case(cuda_backend, b, n, d, torch.float64, symmetric=True, seed=12)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infonce_raw_dot_products(cuda_backend, dtype):
    """Unnormalised inputs (normalize=False): larger logits, another scale."""
    _infonce_case(cuda_backend, 96, 160, 384, dtype, symmetric=False, seed=3, normalized=False)
    _infonce_case(cuda_backend, 96, 96, 77, dtype, symmetric=True, seed=4, normalized=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_infonce_backward_large_upstream_gradient(cuda_backend, dtype):
    """Upstream gradients beyond float16's range (2^17·randn, a flat softmax at c = 0.05): the
    gradient tile G reaches ~4e5 and would overflow float16 unscaled, while dq and dk stay within
    range; the kernels feed G/max|w| to the tensor cores."""
    _infonce_case(cuda_backend, 1, 9, 77, dtype, symmetric=False, seed=5, grad_scale=2.0**17, inv_temp=0.05)
    _infonce_case(cuda_backend, 80, 80, 384, dtype, symmetric=True, seed=6, grad_scale=2.0**17, inv_temp=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infonce_deterministic(cuda_backend, dtype):
    first = _infonce_case(cuda_backend, 200, 333, 384, dtype, symmetric=False, seed=7)
    second = _infonce_case(cuda_backend, 200, 333, 384, dtype, symmetric=False, seed=7)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "results differ between two identical runs"


# ---------------------------------------------------------------------------------------- HSIC


def _hsic_case(cuda_backend, n, dx, dz, dtype, kernel, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(n, dx, device="cuda", generator=gen) / math.sqrt(dx)).to(dtype)
    z = (torch.randn(n, dz, device="cuda", generator=gen) / math.sqrt(dz)).to(dtype)
    gammas = torch.tensor([0.7, 0.4], device="cuda", dtype=acc)
    g_sums = (torch.randn(3, device="cuda", generator=gen, dtype=f64) / n**2).to(acc)
    g_rk = (torch.randn(n, device="cuda", generator=gen, dtype=f64) / n).to(acc)
    g_rl = (torch.randn(n, device="cuda", generator=gen, dtype=f64) / n).to(acc)

    x64, z64, gam64 = x.to(f64), z.to(f64), gammas.to(f64)
    exp_sums, exp_rk, exp_rl = DENSE.hsic_stats(x64, z64, gam64, kernel)
    exp_dx, exp_dz = DENSE.hsic_stats_backward(g_sums.to(f64), g_rk.to(f64), g_rl.to(f64), x64, z64, gam64, kernel)

    poison_cuda_cache()
    sums, rk, rl = cuda_backend.hsic_stats(x, z, gammas, kernel)
    poison_cuda_cache()
    dx, dz = cuda_backend.hsic_stats_backward(g_sums, g_rk, g_rl, x, z, gammas, kernel)
    torch.cuda.synchronize()

    assert sums.dtype == acc and rk.dtype == acc and rl.dtype == acc
    assert dx.dtype == dtype and dz.dtype == dtype
    K = kernel_matrix(x64, gam64[0], kernel)
    L = kernel_matrix(z64, gam64[1], kernel)
    tol = FWD_TOL[dtype] * 5  # Gram entries over up to 1024 features, then exp
    mags = torch.stack([(K.abs() * L.abs()).sum(), (K * K).sum(), (L * L).sum()])
    for v in range(3):
        check(f"sums[{v}]", sums[v], exp_sums[v], mags[v].item(), tol)
    check("rowsum_k", rk, exp_rk, K.abs().sum(1).max().item(), tol)
    check("rowsum_l", rl, exp_rl, L.abs().sum(1).max().item(), tol)

    # magnitudes of the gradient sums: |W| against |a| (rbf adds the x_i·Σ_j W_ij term)
    g64 = g_sums.to(f64)
    for name, got, want, a, M, M_other, g_self, g_row, gamma in (
        ("dx", dx, exp_dx, x64, K, L, g64[1], g_rk.to(f64), gam64[0]),
        ("dz", dz, exp_dz, z64, L, K, g64[2], g_rl.to(f64), gam64[1]),
    ):
        W = (2 * g64[0] * M_other + 4 * g_self * M + g_row[:, None] + g_row[None, :]).abs()
        if kernel == "rbf":
            W = W * M
            magnitude = 2 * gamma * (W @ a.abs() + W.sum(1, keepdim=True) * a.abs())
        else:
            magnitude = W @ a.abs()
        check(name, got, want, magnitude.max().item(), GRAD_TOL[dtype])
    return sums, rk, rl, dx, dz


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HSIC_SHAPES, ids=lambda s: "n%d-dx%d-dz%d" % s)
def test_hsic_parity(cuda_backend, shape, dtype, kernel):
    n, dx, dz = shape
    _hsic_case(cuda_backend, n, dx, dz, dtype, kernel, seed=hash(shape) % 10_000)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_hsic_parity_float64(cuda_backend, kernel):
    _hsic_case(cuda_backend, 130, 77, 1024, torch.float64, kernel, seed=21)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hsic_deterministic(cuda_backend, dtype):
    first = _hsic_case(cuda_backend, 300, 384, 128, dtype, "rbf", seed=8)
    second = _hsic_case(cuda_backend, 300, 384, 128, dtype, "rbf", seed=8)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "results differ between two identical runs"


# ------------------------------------------------------------------ public API, ops and compile


def _leaf(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_functional_infonce_matches_reference(cuda_backend, dtype, symmetric, reduction):
    b, n, d = 150, 150 if symmetric else 233, 384
    q = torch.randn(b, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    t = torch.tensor(0.07, device="cuda", requires_grad=True)  # learnable temperature
    upstream = torch.randn(b, device="cuda") if reduction == "none" else torch.tensor(1.3, device="cuda")
    results = {}
    for backend in ("cuda", "reference"):
        q_, k_, t_ = _leaf(q), _leaf(k), _leaf(t)
        poison_cuda_cache()
        loss = ibkd.functional.infonce(
            q_, k_, temperature=t_, symmetric=symmetric, reduction=reduction, backend=backend
        )
        (loss * upstream).sum().backward()
        results[backend] = (loss.detach(), q_.grad, k_.grad, t_.grad)
    got, want = results["cuda"], results["reference"]
    tol = GRAD_TOL[dtype]
    check("loss", got[0], want[0], want[0].abs().max().item() + 20.0, 1e-5)
    check("dq", got[1], want[1], want[1].abs().max().item(), 4 * tol)
    check("dk", got[2], want[2], want[2].abs().max().item(), 4 * tol)
    check("dtemperature", got[3], want[3], want[3].abs().item() + 1.0, 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("normalized", [False, True])
def test_functional_hsic_matches_reference(cuda_backend, dtype, kernel, normalized):
    """Against the reference in float64 on the same (rounded) inputs: HSIC is a small difference of
    large sums, so a float32 reference would carry an error of its own."""
    n = 200
    x = (torch.randn(n, 384, device="cuda") / 384**0.5).to(dtype)
    z = (torch.randn(n, 96, device="cuda") / 96**0.5).to(dtype)
    results = {}
    for backend, cast in (("cuda", dtype), ("reference", f64)):
        # detach() first: x.to(dtype) of an x already in dtype is x itself, and requires_grad_() on it
        # made the float64 copy of the next pass a non-leaf whose .grad stays None (the first GPU run
        # failed all 12 variants on that, 2026-12-04)
        x_, z_ = x.detach().to(cast).requires_grad_(), z.detach().to(cast).requires_grad_()
        poison_cuda_cache()
        value = ibkd.functional.hsic(x_, z_, gamma=0.5, kernel=kernel, normalized=normalized, backend=backend)
        value.backward()
        results[backend] = (value.detach(), x_.grad, z_.grad)
    got, want = results["cuda"], results["reference"]
    # the size of the terms that cancel in tr(KHLH)/(n−1)² (1 for the normalized value, in [0, 1])
    K = kernel_matrix(x.to(f64), 0.5, kernel)
    L = kernel_matrix(z.to(f64), 0.5, kernel)
    rk, rl = K.sum(1), L.sum(1)
    terms = ((K * L).abs().sum() + 2 / n * (rk @ rl).abs() + (rk.sum() * rl.sum()).abs() / n**2) / (n - 1) ** 2
    check("hsic", got[0], want[0], 1.0 if normalized else terms.item(), 1e-4)
    tol = GRAD_TOL[dtype]
    check("dx", got[1], want[1], want[1].abs().max().item(), 8 * tol)
    check("dz", got[2], want[2], want[2].abs().max().item(), 8 * tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(cuda_backend, dtype):
    q = unit_rows(96, 77, dtype, None)
    k = unit_rows(130, 77, dtype, None)
    c = torch.tensor(20.0, device="cuda")
    for fuse_grad in (False, True):
        torch.library.opcheck(ibkd.ops.infonce_op, (q, k, c, False, 1, fuse_grad, "cuda"))
    qs = unit_rows(96, 77, dtype, None)
    torch.library.opcheck(ibkd.ops.infonce_op, (qs, q, c, True, 0, False, "cuda"))
    lse = cuda_backend.infonce_forward(q, k, c, False)[1]
    w = torch.randn(96, device="cuda")
    torch.library.opcheck(ibkd.ops.infonce_backward_op, (w, q, k, c, lse, False, "cuda"))

    x = torch.randn(70, 33, device="cuda").to(dtype)
    z = torch.randn(70, 5, device="cuda").to(dtype)
    gammas = torch.tensor([0.1, 0.3], device="cuda")
    for kernel in ("rbf", "linear"):
        torch.library.opcheck(ibkd.ops.hsic_stats_op, (x, z, gammas, kernel, "cuda"))
        grads = (torch.randn(3, device="cuda"), torch.randn(70, device="cuda"), torch.randn(70, device="cuda"))
        torch.library.opcheck(ibkd.ops.hsic_stats_backward_op, (*grads, x, z, gammas, kernel, "cuda"))


@pytest.mark.gpu
def test_torch_compile_fullgraph(cuda_backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(96, 64).cuda()
    x = torch.randn(130, 96, device="cuda")
    teacher = torch.randn(130, 64, device="cuda")

    def step(inp):
        s = model(inp)
        return ibkd.functional.infonce(s, teacher, temperature=0.05, backend="cuda") + 0.1 * ibkd.functional.hsic(
            inp, s, gamma=0.5, backend="cuda"
        )

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = step(x)
    loss_e.backward()
    grads_e = [p.grad.clone() for p in model.parameters()]
    check("loss", loss_c, loss_e, loss_e.abs().item(), 1e-5)
    for gc, ge in zip(grads_c, grads_e):
        check("grad", gc, ge, ge.abs().max().item(), 1e-4)


# ------------------------------------------------------------------------ without a GPU (CPU CI)


def test_backend_loads_and_reports_why_not_usable():
    impl = get_backend("cuda")
    assert impl.name == "cuda"
    reason = impl.unavailable_reason()
    if not torch.cuda.is_available():
        assert reason, "without a CUDA device the backend must say why it is unavailable"
    assert impl.supports(torch.device("cpu"), torch.float32) is not None
    info = {b.name: b for b in ibkd.backends()}["cuda"]
    assert info.available == (reason is None)


def test_dispatcher_refuses_cpu_tensors():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(BackendUnavailable, match="cuda"):
        ibkd.functional.infonce(q, k, backend="cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        ibkd.functional.hsic(q, k, backend="cuda")
