"""Numerics on hostile but valid inputs, for every backend, against float64 (issue 14, "Numerics").

Each case runs the public functions with ``backend=`` reference, cpu, triton (Triton's CPU interpreter
without a GPU, CUDA tensors with one) and cuda (``gpu``-marked: skipped without a GPU), in float32,
and compares with float64 computed literally on the very same (already rounded) input values:
pairwise differences ``a_i − a_j`` for distances, an explicit cross-entropy for InfoNCE. Errors are
normwise: ``max|got − truth| / max|truth|``.

* RBF HSIC of rows sharing a large offset (mean-pooled embedding-layer outputs, ‖x‖ ≈ 60): the
  kernels compute ‖a_i‖² + ‖a_j‖² − 2a_i·a_j, which cancelled (relative error 1e-4 at offset norm 60,
  6e-3 at 300, before ``ibkd.functional.hsic`` centred its inputs). Bound: 1e-4, value and gradients.
  What remains (2e-5 to 5e-5 measured) is the float32 rounding of the closed form
  Σ K∘L − (2/n)(K1)·(L1) + (1ᵀK1)(1ᵀL1)/n², whose terms are ~300× the HSIC value here.
* K_ii = 1 exactly: ‖a_i‖² + ‖a_i‖² − 2a_i·a_i is rounding noise ~u·‖a_i‖², which a large γ turned
  into K_ii < 1. Centring shrinks it (‖a_i‖ then excludes the offset), but with γ large enough, or
  rows genuinely far apart, the kernel must write the diagonal exactly (every backend does: the
  exponent of entry (i, i) is set to 0 on the tiles that straddle the diagonal).
* InfoNCE with ``normalize=True`` on rows scaled by 1e20 (squares overflow float32) or 1e-25
  (squares underflow): the loss is scale-invariant, so it must equal the unscaled float64 loss.
* τ = 1e-40: 1/τ overflows float32, so every backend raises the same ValueError; in float64 it is a
  valid temperature and every backend returns the same (huge) loss.
* Normalized HSIC of a constant input is 0/0: a ValueError naming the input, never NaN or ±inf.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ibkd.backend import base as backend_base
from ibkd.functional import hsic, infonce, median_heuristic_gamma

f64 = torch.float64
f32 = torch.float32
HAS_CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")
CUDA = torch.device("cuda")

#: (backend, device) pairs: every backend on the device where it runs (triton: GPU if any, else the
#: interpreter on CPU)
BACKENDS = [
    pytest.param("reference", CPU, id="reference"),
    pytest.param("cpu", CPU, id="cpu"),
    pytest.param("triton", CUDA if HAS_CUDA else CPU, id="triton"),
    pytest.param("cuda", CUDA, id="cuda", marks=pytest.mark.gpu),
]


def usable(backend: str, device: torch.device, dtype: torch.dtype = f32) -> None:
    impl = backend_base.get_backend(backend)
    reason = impl.unavailable_reason() or impl.supports(device, dtype)
    if reason is not None:
        pytest.skip(f"{backend} cannot run {dtype} on {device.type} here: {reason}")


def rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    got, truth = got.detach().cpu().to(f64), truth.detach().cpu().to(f64)
    assert torch.isfinite(got).all(), "non-finite result"
    return ((got - truth).abs().max() / truth.abs().max()).item()


# ----------------------------------------------------------------------------- float64 truth


def literal_rbf(a: torch.Tensor, gamma) -> torch.Tensor:
    return torch.exp(-gamma * (a[:, None, :] - a[None, :, :]).pow(2).sum(-1))


def literal_hsic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype) - 1.0 / n
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


def literal_median_gamma(a: torch.Tensor) -> torch.Tensor:
    d2 = (a[:, None, :] - a[None, :, :]).pow(2).sum(-1)
    iu = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    return 0.5 / d2[iu[0], iu[1]].median()


def truth_rbf_hsic(x: torch.Tensor, z: torch.Tensor, gamma_x, gamma_z):
    """(HSIC, dHSIC/dx, dHSIC/dz) in float64 from pairwise differences of the given values."""
    x = x.detach().cpu().to(f64).requires_grad_()
    z = z.detach().cpu().to(f64).requires_grad_()
    value = literal_hsic(literal_rbf(x, gamma_x), literal_rbf(z, gamma_z))
    dx, dz = torch.autograd.grad(value, (x, z))
    return value.detach(), dx, dz


def run_hsic(backend, x, z, **options):
    x, z = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    value = hsic(x, z, backend=backend, **options)
    dx, dz = torch.autograd.grad(value, (x, z))
    return value, dx, dz


def shared_offset_rows(norm: float, n: int = 64, d: int = 384, seed: int = 0):
    """x: a common offset of the given norm plus N(0, 0.05²) noise (mean-pooled embedding outputs);
    z depends on x (a student output), of order 1-10 without an offset. float32, rounded once."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(d, generator=g, dtype=f64)
    offset = offset / offset.norm() * norm
    noise = 0.05 * torch.randn(n, d, generator=g, dtype=f64)
    x = offset + noise
    z = 10 * torch.tanh(20 * noise[:, :128]) + 0.3 * torch.randn(n, 128, generator=g, dtype=f64)
    return x.to(f32), z.to(f32)


# --------------------------------------------------------------------- HSIC: shared offset


@pytest.mark.parametrize("norm", [60.0, 300.0])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_rbf_hsic_of_rows_with_a_large_shared_offset_matches_float64(backend, device, norm):
    usable(backend, device)
    x, z = shared_offset_rows(norm)
    truth = truth_rbf_hsic(x, z, literal_median_gamma(x.to(f64)), literal_median_gamma(z.to(f64)))
    got = run_hsic(backend, x.to(device), z.to(device), gamma="median")
    for name, g, t in zip(("hsic", "d x", "d z"), got, truth):
        err = rel_err(g, t)
        assert err <= 1e-4, f"{name}: relative error {err:.2e} > 1e-4 (offset norm {norm})"


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_linear_hsic_of_rows_with_a_large_shared_offset_matches_float64(backend, device, normalized):
    # K = xxᵀ has entries ≈ ‖offset‖² = 3600 around a centred part of size ~1: without centring the
    # closed form cancelled it away entirely.
    usable(backend, device)
    x, z = shared_offset_rows(60.0)
    xt, zt = x.to(f64).requires_grad_(), z.to(f64).requires_grad_()
    xc, zc = xt - xt.mean(0), zt - zt.mean(0)
    n = x.shape[0]
    value = (xc.T @ zc).pow(2).sum() / (n - 1) ** 2  # ‖x_cᵀ z_c‖²_F/(n−1)², the closed form of tr(KHLH)
    if normalized:
        value = value / torch.sqrt((xc.T @ xc).pow(2).sum() * (zc.T @ zc).pow(2).sum() / (n - 1) ** 4)
    truth = (value.detach(), *torch.autograd.grad(value, (xt, zt)))
    got = run_hsic(backend, x.to(device), z.to(device), kernel="linear", normalized=normalized)
    for name, g, t in zip(("hsic", "d x", "d z"), got, truth):
        err = rel_err(g, t)
        assert err <= 1e-4, f"{name}: relative error {err:.2e} > 1e-4"


def test_median_gamma_of_rows_with_a_large_shared_offset_matches_float64():
    # No backend involved: the median heuristic computes its own distances (float32 here).
    for norm in (60.0, 300.0):
        x, _ = shared_offset_rows(norm)
        err = rel_err(median_heuristic_gamma(x), literal_median_gamma(x.to(f64)))
        assert err <= 1e-5, f"median gamma at offset norm {norm}: relative error {err:.2e}"


# ------------------------------------------------------------------------ HSIC: K_ii = 1


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_rbf_kernel_diagonal_with_a_shared_offset_and_large_gamma(backend, device):
    # γ = 1000 puts every off-diagonal exp(−γ‖x_i − x_j‖²) below 1e-800: K is the identity and every
    # deviation of K_ii from 1 shows directly in HSIC and in its z-gradient. (The x-gradient is that
    # small too, 0 in float32: nothing to compare.) Centring shrinks the diagonal noise from
    # ~u·‖offset‖² to ~u·‖noise‖², but γ·u·‖noise‖² is still 1e-4 at γ = 1000: K_ii must be exact.
    usable(backend, device)
    x, z = shared_offset_rows(60.0)
    truth = truth_rbf_hsic(x, z, 1000.0, 5e-5)  # γ_z ≈ the median heuristic of z
    got = run_hsic(backend, x.to(device), z.to(device), gamma=1000.0, gamma_z=5e-5)
    for name, g, t in [("hsic", got[0], truth[0]), ("d z", got[2], truth[2])]:
        err = rel_err(g, t)
        assert err <= 1e-5, f"{name}: relative error {err:.2e} > 1e-5"


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_rbf_kernel_diagonal_is_exact_for_rows_far_apart(backend, device):
    # Rows of norm 60 in random directions (no common offset, so centring changes little) and γ = 1:
    # K is exactly the identity in float64. K_ii must be written as exp(0) = 1, not computed from
    # 2‖x_i‖² − 2x_i·x_i (≈ 1e-3 of noise at this norm: HSIC was off by 3e-4 relative).
    usable(backend, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 384, generator=g, dtype=f64)
    x = (60 * x / x.norm(dim=1, keepdim=True)).to(f32)
    z = torch.randn(64, 16, generator=g, dtype=f64).to(f32)
    truth, _, _ = truth_rbf_hsic(x, z, 1.0, 0.5)
    got = hsic(x.to(device), z.to(device), gamma=1.0, gamma_z=0.5, backend=backend)
    err = rel_err(got, truth)
    assert err <= 1e-6, f"relative error {err:.2e} > 1e-6"


# --------------------------------------------------------------- InfoNCE: normalisation scale


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale", [1e20, 1e-25])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_normalized_infonce_is_scale_safe(backend, device, scale, symmetric):
    usable(backend, device)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(16, 32, generator=g, dtype=f64)
    k = 0.6 * q + 0.8 * torch.randn(16, 32, generator=g, dtype=f64)
    tau = 0.1

    def truth():  # cosine similarities of the unscaled rows: the loss is scale-invariant
        qt, kt = q.clone().requires_grad_(), k.clone().requires_grad_()
        s = F.normalize(qt, dim=1) @ F.normalize(kt, dim=1).T / tau
        labels = torch.arange(16)
        loss = F.cross_entropy(s, labels)
        if symmetric:
            loss = (loss + F.cross_entropy(s.T, labels)) / 2
        return (loss.detach(), *torch.autograd.grad(loss, (qt, kt)))

    qs = (q * scale).to(f32).to(device).requires_grad_()
    ks = (k * scale).to(f32).to(device).requires_grad_()
    loss = infonce(qs, ks, temperature=tau, symmetric=symmetric, backend=backend)
    dq, dk = torch.autograd.grad(loss, (qs, ks))
    # d loss/d(scale·a) = (d loss/d a)/scale: compare the gradients w.r.t. the unscaled rows
    got = (loss, dq.double() * scale, dk.double() * scale)
    for name, gv, t in zip(("loss", "d query", "d key"), got, truth()):
        err = rel_err(gv, t)
        assert err <= 1e-5, f"{name}: relative error {err:.2e} > 1e-5 at scale {scale:g}"


# ------------------------------------------------------------------------ InfoNCE: tiny τ


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_temperature_whose_reciprocal_overflows_is_one_value_error(backend, device):
    usable(backend, device)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(8, 16, generator=g).to(device)
    k = torch.randn(8, 16, generator=g).to(device)
    for tau in (1e-40, torch.tensor(1e-40, dtype=f64, device=device), torch.tensor(1e-40, device=device)):
        # a float32 tensor holds 1e-40 as the subnormal 9.99995e-41
        with pytest.raises(ValueError, match=r"temperature must lie in \[2\.94e-39.*float32.*got (1e-40|9\.99995e-41)"):
            infonce(q, k, temperature=tau, backend=backend)
    with pytest.raises(ValueError, match=r"temperature.*float32"):  # bf16 accumulates in float32
        infonce(q.bfloat16(), k.bfloat16(), temperature=1e-40, backend=backend)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_tiny_temperature_in_float64_gives_one_value(backend, device):
    # 1/τ = 1e40 is finite in float64: every backend returns the float64 cross-entropy (≈ 1e37 here).
    usable(backend, device, f64)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(8, 16, generator=g, dtype=f64)
    k = 0.6 * q + 0.8 * torch.randn(8, 16, generator=g, dtype=f64)
    tau = 1e-40
    truth = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / tau, torch.arange(8), reduction="none")
    got = infonce(q.to(device), k.to(device), temperature=tau, reduction="none", backend=backend)
    # loss_i = lse_i − s_ii/τ, both ~1e40: float64 rounding of those terms is ~1e24
    magnitude = 2 / tau
    err = (got.cpu() - truth).abs().max().item()
    assert err <= 1e-14 * magnitude, f"max abs error {err:.3g} > {1e-14 * magnitude:.3g}"


# ------------------------------------------------------------- normalized HSIC: constant input


@pytest.mark.parametrize("which", ["x", "z"])
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_normalized_hsic_of_a_constant_input_is_a_value_error(backend, device, kernel, which):
    usable(backend, device)
    g = torch.Generator().manual_seed(5)
    args = {"x": torch.randn(16, 8, generator=g), "z": torch.randn(16, 4, generator=g)}
    args[which] = torch.full_like(args[which], 0.3)
    with pytest.raises(ValueError, match=rf"{which} has every row identical.*normalized HSIC.*undefined"):
        hsic(args["x"].to(device), args["z"].to(device), kernel=kernel, normalized=True, backend=backend)
    # the unnormalized HSIC of a constant is a defined 0 (a constant carries no information)
    value = hsic(args["x"].to(device), args["z"].to(device), kernel=kernel, backend=backend)
    assert abs(value.item()) <= 1e-6


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_normalized_hsic_of_a_numerically_constant_kernel_is_a_value_error(backend, device):
    # Distinct rows, but γ·‖x_i − x_j‖² ~ 1e-30: K is all ones in float32 and HSIC(x, x) = 0.
    usable(backend, device)
    g = torch.Generator().manual_seed(6)
    x, z = torch.randn(24, 8, generator=g).to(device), torch.randn(24, 4, generator=g).to(device)
    with pytest.raises(ValueError, match=r"HSIC\(x, x\).*rounding error.*numerically constant"):
        hsic(x, z, gamma=1e-30, gamma_z=1.0, normalized=True, backend=backend)
    with pytest.raises(ValueError, match=r"HSIC\(z, z\).*rounding error.*numerically constant"):
        hsic(x, z, gamma=1.0, gamma_z=1e-30, normalized=True, backend=backend)
    assert math.isfinite(hsic(x, z, gamma=1.0, normalized=True, backend=backend).item())
