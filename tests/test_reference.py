"""The losses against their mathematical definitions, written independently of the package's own
formulas (literal cross-entropies, an explicit centring matrix H, pairwise differences instead of the
Gram-matrix expansion). Run for the reference backend and every fused CPU backend: these are
properties of ``ibkd.functional``, whichever backend computes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import any_backend, unit_rows  # noqa: F401  (any_backend is a fixture)
from ibkd.functional import hsic, infonce, median_heuristic_gamma

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("extra_keys", [0, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce_is_cross_entropy_of_scaled_similarities(any_backend, extra_keys, normalize, reduction):
    g = gen(1)
    b, d, tau = 5, 7, 0.3
    q, k = unit_rows(g, b, d), unit_rows(g, b + extra_keys, d)
    sim = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T if normalize else q @ k.T
    expected = F.cross_entropy(sim / tau, torch.arange(b), reduction=reduction)
    got = infonce(q, k, temperature=tau, normalize=normalize, reduction=reduction, backend=any_backend)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_symmetric_infonce_is_mean_of_both_cross_entropies(any_backend, normalize, reduction):
    g = gen(2)
    b, d, tau = 6, 4, 0.5
    q, k = unit_rows(g, b, d), unit_rows(g, b, d)
    sim = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T if normalize else q @ k.T
    labels = torch.arange(b)
    rows = F.cross_entropy(sim / tau, labels, reduction="none")
    cols = F.cross_entropy(sim.T / tau, labels, reduction="none")
    per_row = (rows + cols) / 2
    expected = {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]
    got = infonce(q, k, temperature=tau, normalize=normalize, symmetric=True, reduction=reduction, backend=any_backend)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_infonce_tensor_temperature_equals_float_temperature(any_backend):
    g = gen(3)
    q, k = unit_rows(g, 4, 3), unit_rows(g, 6, 3)
    as_float = infonce(q, k, temperature=0.2, backend=any_backend)
    as_tensor = infonce(q, k, temperature=torch.tensor(0.2, dtype=f64), backend=any_backend)
    torch.testing.assert_close(as_tensor, as_float, rtol=1e-14, atol=0)


def test_infonce_is_invariant_to_scaling_when_normalized(any_backend):
    g = gen(4)
    q, k = unit_rows(g, 5, 8), unit_rows(g, 5, 8)
    base = infonce(q, k, backend=any_backend)
    scaled = infonce(3.0 * q, 0.25 * k, backend=any_backend)
    torch.testing.assert_close(scaled, base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, acc", [(torch.float64, f64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)
def test_losses_come_back_in_the_accumulation_dtype(any_backend, dtype, acc):
    g = gen(5)
    q, k = unit_rows(g, 3, 4, dtype), unit_rows(g, 3, 4, dtype)
    assert infonce(q, k, backend=any_backend).dtype == acc
    assert infonce(q, k, reduction="none", backend=any_backend).dtype == acc
    assert hsic(q, k, backend=any_backend).dtype == acc


def test_mixed_input_dtypes_are_promoted(any_backend):
    g = gen(6)
    q, k = unit_rows(g, 3, 4), unit_rows(g, 3, 4)
    mixed = infonce(q.float(), k, backend=any_backend)
    assert mixed.dtype == f64
    torch.testing.assert_close(mixed, infonce(q.float().double(), k, backend=any_backend))


# ------------------------------------------------------------------------------------------ HSIC


def literal_kernel(a: torch.Tensor, gamma: float, kernel: str) -> torch.Tensor:
    if kernel == "linear":
        return a @ a.T
    return torch.exp(-gamma * (a[:, None, :] - a[None, :, :]).pow(2).sum(-1))


def literal_hsic(x, z, gamma_x, gamma_z, kernel, normalized=False):
    """tr(K H L H)/(n−1)² with the centring matrix H = I − 11ᵀ/n written out."""
    n = x.shape[0]
    H = torch.eye(n, dtype=x.dtype) - torch.full((n, n), 1.0 / n, dtype=x.dtype)
    K, L = literal_kernel(x, gamma_x, kernel), literal_kernel(z, gamma_z, kernel)

    def h(A, B):
        return torch.trace(A @ H @ B @ H) / (n - 1) ** 2

    return h(K, L) / torch.sqrt(h(K, K) * h(L, L)) if normalized else h(K, L)


def dependent_pair(g, n, dx, dz):
    x = unit_rows(g, n, dx)
    z = torch.tanh(x @ unit_rows(g, dx, dz) * 2) + 0.3 * unit_rows(g, n, dz)
    return x, z


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("gammas", [(1.0, None), (0.5, 2.0)])
@pytest.mark.parametrize("n", [2, 3, 17])
def test_hsic_equals_trace_with_explicit_centring(any_backend, kernel, normalized, gammas, n):
    g = gen(10 + n)
    x, z = dependent_pair(g, n, 5, 3)
    gamma, gamma_z = gammas
    expected = literal_hsic(x, z, gamma, gamma if gamma_z is None else gamma_z, kernel, normalized)
    got = hsic(x, z, gamma=gamma, gamma_z=gamma_z, kernel=kernel, normalized=normalized, backend=any_backend)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("normalized", [False, True])
def test_hsic_invariant_to_common_row_permutation(any_backend, kernel, normalized):
    g = gen(20)
    x, z = dependent_pair(g, 23, 6, 4)
    perm = torch.randperm(23, generator=g)
    base = hsic(x, z, kernel=kernel, normalized=normalized, backend=any_backend)
    permuted = hsic(x[perm], z[perm], kernel=kernel, normalized=normalized, backend=any_backend)
    torch.testing.assert_close(permuted, base, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("dependent", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_hsic_is_nonnegative(any_backend, kernel, dependent, seed):
    g = gen(30 + seed)
    n = [2, 3, 9, 40][seed]
    x, z = dependent_pair(g, n, 4, 3) if dependent else (unit_rows(g, n, 4), unit_rows(g, n, 3))
    value = hsic(x, z, kernel=kernel, gamma=[0.1, 1.0, 5.0, "median"][seed], backend=any_backend)
    # tr(KHLH) = ‖K^½ H L^½‖²_F ≥ 0 for positive semi-definite K, L; allow float64 rounding only.
    assert value.item() >= -1e-12


def test_hsic_of_independent_constant_is_zero(any_backend):
    g = gen(35)
    x = unit_rows(g, 8, 3)
    z = torch.ones(8, 2, dtype=f64)  # a constant carries no information about x
    for kernel in ("rbf", "linear"):
        assert abs(hsic(x, z, kernel=kernel, backend=any_backend).item()) < 1e-12


@pytest.mark.parametrize("n", [2, 5, 31])
def test_linear_hsic_closed_form(any_backend, n):
    g = gen(40 + n)
    x, z = dependent_pair(g, n, 6, 4)
    x_c, z_c = x - x.mean(0), z - z.mean(0)
    expected = (x_c.T @ z_c).pow(2).sum() / (n - 1) ** 2
    got = hsic(x, z, kernel="linear", backend=any_backend)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_linear_hsic_ignores_gamma(any_backend):
    g = gen(45)
    x, z = dependent_pair(g, 7, 3, 3)
    a = hsic(x, z, kernel="linear", gamma=1.0, backend=any_backend)
    b = hsic(x, z, kernel="linear", gamma=7.5, gamma_z=0.01, backend=any_backend)
    c = hsic(x, z, kernel="linear", gamma="median", backend=any_backend)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(c, a, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("seed", range(3))
def test_normalized_hsic_lies_in_unit_interval(any_backend, kernel, seed):
    g = gen(50 + seed)
    x, z = dependent_pair(g, 12, 5, 3) if seed else (unit_rows(g, 12, 5), unit_rows(g, 12, 3))
    value = hsic(x, z, kernel=kernel, normalized=True, gamma=[0.5, 2.0, "median"][seed], backend=any_backend).item()
    assert -1e-12 <= value <= 1 + 1e-12


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("gamma", [0.3, 2.0, "median"])
def test_normalized_hsic_of_x_with_itself_is_one(any_backend, kernel, gamma):
    x = unit_rows(gen(60), 10, 4)
    value = hsic(x, x.clone(), gamma=gamma, kernel=kernel, normalized=True, backend=any_backend)
    torch.testing.assert_close(value, torch.tensor(1.0, dtype=f64), rtol=0, atol=1e-12)


def test_normalized_hsic_of_two_rows_is_one(any_backend):
    # With n = 2 both centred kernels are multiples of [[1, −1], [−1, 1]]: perfectly aligned.
    g = gen(61)
    x, z = unit_rows(g, 2, 5), unit_rows(g, 2, 3)
    value = hsic(x, z, gamma=0.7, normalized=True, backend=any_backend)
    torch.testing.assert_close(value, torch.tensor(1.0, dtype=f64), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ median heuristic


def pairwise_sq_distances(a: torch.Tensor) -> list[float]:
    n = a.shape[0]
    return sorted(float((a[i] - a[j]).pow(2).sum()) for i in range(n) for j in range(i + 1, n))


@pytest.mark.parametrize("n", [2, 3, 6, 7, 10])
def test_median_heuristic_matches_direct_computation(n):
    a = unit_rows(gen(70 + n), n, 5)
    d = pairwise_sq_distances(a)
    gamma = median_heuristic_gamma(a).item()
    m = len(d)
    if m % 2:  # odd number of pairs: the median is unambiguous
        assert gamma == pytest.approx(1 / (2 * d[m // 2]), rel=1e-12)
    else:  # even: any value between the two middle distances is a median
        lo, hi = d[m // 2 - 1], d[m // 2]
        assert 1 / (2 * hi) * (1 - 1e-12) <= gamma <= 1 / (2 * lo) * (1 + 1e-12)


def test_median_heuristic_subsamples_evenly_spaced_rows_above_max_rows():
    a = unit_rows(gen(80), 40, 3)
    rows = torch.linspace(0, 39, 9).round().long()
    expected = median_heuristic_gamma(a[rows])
    got = median_heuristic_gamma(a, max_rows=9)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(median_heuristic_gamma(a, max_rows=9), got, rtol=0, atol=0)  # deterministic


def test_median_heuristic_of_identical_rows_is_one():
    assert median_heuristic_gamma(torch.ones(5, 3, dtype=f64)).item() == 1.0


def test_median_heuristic_has_no_gradient(any_backend):
    g = gen(90)
    x = unit_rows(g, 9, 4).requires_grad_()
    z = unit_rows(g, 9, 3).requires_grad_()
    assert not median_heuristic_gamma(x).requires_grad

    value = hsic(x, z, gamma="median", backend=any_backend)
    dx, dz = torch.autograd.grad(value, (x, z))
    # The same loss with the bandwidths frozen at their median values: equal value and equal gradient,
    # i.e. no gradient flows through the bandwidth.
    gx, gz = median_heuristic_gamma(x).item(), median_heuristic_gamma(z).item()
    x2, z2 = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    frozen = hsic(x2, z2, gamma=gx, gamma_z=gz, backend=any_backend)
    fx, fz = torch.autograd.grad(frozen, (x2, z2))
    torch.testing.assert_close(value, frozen, rtol=1e-13, atol=0)
    torch.testing.assert_close(dx, fx, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dz, fz, rtol=1e-12, atol=1e-15)


def test_gamma_z_median_is_computed_on_z(any_backend):
    g = gen(91)
    x, z = unit_rows(g, 8, 4), 3.0 * unit_rows(g, 8, 2)
    gz = median_heuristic_gamma(z).item()
    assert gz != pytest.approx(median_heuristic_gamma(x).item())
    mixed = hsic(x, z, gamma=0.7, gamma_z="median", backend=any_backend)
    torch.testing.assert_close(mixed, literal_hsic(x, z, 0.7, gz, "rbf"), rtol=1e-10, atol=1e-13)

