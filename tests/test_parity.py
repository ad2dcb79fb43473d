"""Fused backends against the reference: gradcheck in float64, and hypothesis-fuzzed forward and
backward parity over batch sizes, feature dims, dtypes and every option of both losses.

How the fuzzed comparisons decide "close enough" (``check``), norm-wise (max over entries):

* Expected values. float64/float32 inputs: the reference computed in float64 on the same input
  values. bf16/fp16 inputs: the reference run on the same rounded inputs in the same dtype, as the
  fused path is: both round the L2-normalised vectors to the input dtype before the kernel and the
  kernel's gradients back to it, and that rounding (2⁻⁸ relative in bf16) is not a backend error.
* A backend rounds differently from the dense reference (summation order, tiling, online
  log-sum-exp, a positive logit computed apart from the tile), so the bound is the largest of:
  - ``CALIBRATION_FACTOR`` × the reference's own accumulation error on these inputs (reference in
    float32 vs float64): it scales with the conditioning of each example;
  - ``RTOL`` × max|expected|;
  - ``MAGNITUDE_RTOL`` × the magnitude of what was summed before it cancelled, where a result is a
    small difference of large terms: an InfoNCE row loss is lse − s_ii with both ≈ max|s|/τ, the
    temperature gradient Σ w_i(Σ_j p_ij s_ij − s_ii)/τ² likewise, and the input gradients
    w_i(Σ_j p_ij k_j − k_i)/τ, whose radial part L2 normalisation projects out (all of it at D = 1); HSIC is
    (Σ K∘L − (2/n)(K1)·(L1) + (1ᵀK1)(1ᵀL1)/n²)/(n−1)². The float32 value 4e-6 is ≈ 64 unit
    roundoffs of each term (dot products over D ≤ 384 entries lose up to ~√D ulps, exp and log
    add a few); float64 gets 1e-14 for the same reason.
* Gradients come back in the input dtype: bf16 (8-bit significand) and fp16 (11-bit) round each entry
  by up to u·|g| (u = 2⁻⁸, 2⁻¹¹). Where the backend's and the reference's fp32 values straddle a
  rounding boundary the two differ by one ulp ≤ 2u·max|g|, which is added to the bound, as are two
  fp16 subnormal steps (2⁻²³) for gradients below fp16's normal range. Losses and the temperature
  gradient stay in float32 for half inputs (fp32 accumulation): float32 rules.
* bf16 gradients: the fused cpu path runs its gradient GEMMs on bf16 tiles (fp32 accumulation), so each
  weight (a softmax probability, a centred kernel entry) is rounded to bf16 first: every term of the sum
  moves by at most 2⁻⁹ of itself, hence the gradient by at most 2⁻⁹ × the magnitude of its terms, which is
  added for bf16 gradients (``BF16_TILE_ROUNDING``). tests/test_cpu_backend.py holds the bf16 kernels to
  tighter bounds derived per kernel.
* Normalized HSIC of n = 2 rows is identically 1 (see test_reference): its gradient is pure rounding
  noise of arbitrary relative size, so that corner is left to gradcheck and the property tests.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from helpers import any_backend, fused_backend, max_err, supports_dtype, unit_rows  # noqa: F401  (fixtures)
from ibkd.backend.base import accumulation_dtype
from ibkd.backend.reference import kernel_matrix
from ibkd.functional import hsic, infonce, median_heuristic_gamma

f64 = torch.float64
HALF = (torch.bfloat16, torch.float16)
CALIBRATION_FACTOR = 8.0
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
MAGNITUDE_RTOL = {torch.float64: 1e-14, torch.float32: 4e-6}
ATOL = {torch.float64: 1e-13, torch.float32: 1e-7}  # absolute floor, for entries that cancel to ~0
OUTPUT_ROUNDING = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
BF16_TILE_ROUNDING = 2.0**-9  # one round-to-nearest of each GEMM weight to bf16 (see the docstring)
OUTPUT_ATOL = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-23}

FUZZ = settings(
    deadline=None,
    database=None,  # no .hypothesis folder in the shared tree; failures print a reproducible example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def fuzz(max_examples: int):
    return settings(FUZZ, max_examples=max_examples)


def check(name, fused, expected, acc_reference, truth, out_dtype, magnitude=0.0):
    """``max|fused − expected| ≤ max(8·|acc_reference − truth|, rtol·max|expected|,
    magnitude_rtol·magnitude) + 2u·max|expected| + atol + |expected − truth|`` (see the module docstring).

    The last term is the half-precision reference's own error: a fused backend that is closer to float64
    than the reference run in bf16/fp16 differs from it by up to that much (a CI fuzz case: bf16 HSIC
    ``d z`` where the cpu backend matched float64 to the bf16 rounding and the bf16 reference was 2 ulps off)."""
    if expected is None:
        assert fused is None, f"{name}: unexpected gradient"
        return
    assert fused.dtype == out_dtype, f"{name}: dtype {fused.dtype}, expected {out_dtype}"
    acc = accumulation_dtype(out_dtype)
    scale = expected.detach().abs().max().item()
    accumulation_error = max_err(acc_reference, truth)
    bound = max(CALIBRATION_FACTOR * accumulation_error, RTOL[acc] * scale, MAGNITUDE_RTOL[acc] * magnitude)
    bound += OUTPUT_ROUNDING[out_dtype] * scale + OUTPUT_ATOL[out_dtype] + ATOL[acc]
    if out_dtype is torch.bfloat16:
        bound += BF16_TILE_ROUNDING * magnitude
    if expected is not truth:
        bound += max_err(expected, truth)
    err = max_err(fused, expected)
    assert err <= bound, (
        f"{name}: max abs error {err:.3g} > {bound:.3g} (max|expected| {scale:.3g}; "
        f"the reference's own {acc} error {accumulation_error:.3g}; magnitude {magnitude:.3g})"
    )


def reference_runs(run, dtype):
    """(expected, acc_reference, truth) from ``run(backend, dtype)`` of the reference backend."""
    acc = accumulation_dtype(dtype)
    truth = run("reference", f64)
    acc_reference = truth if acc == f64 else run("reference", acc)
    expected = run("reference", dtype) if dtype in HALF else truth
    return expected, acc_reference, truth


# ------------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("learnable_temperature", [False, True])
def test_infonce_gradcheck(any_backend, normalize, symmetric, reduction, learnable_temperature):
    g = torch.Generator().manual_seed(0)
    b, n, d = 3, (3 if symmetric else 5), 4
    q = unit_rows(g, b, d).requires_grad_()
    k = unit_rows(g, n, d).requires_grad_()
    inputs = [q, k]
    if learnable_temperature:
        inputs.append(torch.tensor(0.4, dtype=f64, requires_grad=True))

    def fn(q, k, *temperature):
        return infonce(
            q, k, temperature=temperature[0] if temperature else 0.4, normalize=normalize,
            symmetric=symmetric, reduction=reduction, backend=any_backend,
        )

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("gammas", [(0.7, None), (0.5, 1.5), (torch.tensor(0.9), torch.tensor(0.3))], ids=["one_gamma", "gamma_z", "tensor_gammas"])
@pytest.mark.parametrize("n", [2, 5])
def test_hsic_gradcheck(any_backend, kernel, normalized, gammas, n):
    if normalized and n == 2:
        pytest.skip("normalized HSIC of 2 rows is identically 1 (see test_reference): its Jacobian is 0")
    g = torch.Generator().manual_seed(1)
    x = unit_rows(g, n, 3).requires_grad_()
    z = (torch.tanh(x.detach() @ unit_rows(g, 3, 2)) + 0.5 * unit_rows(g, n, 2)).requires_grad_()
    gamma, gamma_z = gammas

    def fn(x, z):
        return hsic(x, z, gamma=gamma, gamma_z=gamma_z, kernel=kernel, normalized=normalized, backend=any_backend)

    assert torch.autograd.gradcheck(fn, (x, z), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------- fuzz: InfoNCE

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DIMS = [1, 3, 77, 384]


def run_infonce(backend, q, k, weights, temperature, learnable, dtype, **options):
    """Loss, gradients (query, key, temperature) and the loss under no_grad, for inputs in ``dtype``."""
    acc = accumulation_dtype(dtype)
    q = q.detach().clone().to(dtype).requires_grad_()  # a fresh leaf per run
    k = k.detach().clone().to(dtype).requires_grad_()
    t = torch.tensor(temperature, dtype=acc, requires_grad=True) if learnable else temperature
    loss = infonce(q, k, temperature=t, backend=backend, **options)
    loss.backward(weights.to(loss.dtype) if loss.dim() else None)
    with torch.no_grad():
        no_grad_loss = infonce(q, k, temperature=t, backend=backend, **options)
    return loss.detach(), q.grad, k.grad, (t.grad if learnable else None), no_grad_loss


def infonce_magnitudes(q, k, temperature, normalize, reduction, weights):
    """Size of the terms that cancel in the loss and in the temperature gradient (module docstring)."""
    q, k = q.to(f64), k.to(f64)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    b, n = q.shape[0], k.shape[0]
    max_logit = (q @ k.T).abs().max().item() / temperature
    row = 2 * max_logit + math.log(n)  # |lse_i| + |s_ii/τ|
    row_weights = {"mean": torch.full((b,), 1.0 / b, dtype=f64), "sum": torch.ones(b, dtype=f64), "none": weights}
    total_weight = row_weights[reduction].abs().sum().item()
    loss = row * (b if reduction == "sum" else 1)
    temperature_grad = total_weight * 2 * max_logit / temperature
    return loss, temperature_grad


def infonce_grad_magnitudes(q, k, temperature, normalize, symmetric, reduction, weights):
    """Size of the terms that cancel in the input gradients: dq_i = w_i(Σ_j p_ij k_j − k_i)/τ (and the
    column terms when symmetric), dk_j = Σ_i w_i(p_ij − δ_ij) q_i/τ; through L2 normalisation the
    radial part is then projected out and the rest divided by the row norm, which for D = 1 cancels
    the whole gradient, leaving only rounding of these terms."""
    q, k = q.to(f64), k.to(f64)
    b = q.shape[0]
    row_weights = {"mean": torch.full((b,), 1.0 / b, dtype=f64), "sum": torch.ones(b, dtype=f64), "none": weights}
    w = row_weights[reduction].abs()
    directions = 2 if symmetric else 1
    q_scale = 1.0 if normalize else q.abs().max().item()
    k_scale = 1.0 if normalize else k.abs().max().item()
    dq = directions * w.max().item() * 2 * k_scale / temperature
    dk = directions * (w.sum().item() + w.max().item()) * q_scale / temperature
    if normalize:
        dq /= q.norm(dim=1).min().clamp_min(1e-30).item()
        dk /= k.norm(dim=1).min().clamp_min(1e-30).item()
    return dq, dk


@fuzz(30)
@given(
    b=st.sampled_from([1, 2, 7, 129, 1000]),
    extra_keys=st.sampled_from([0, 1, 6, 63]),
    d=st.sampled_from(DIMS),
    dtype=st.sampled_from(DTYPES),
    normalize=st.booleans(),
    symmetric=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    temperature=st.sampled_from([0.05, 0.3, 1.0]),
    learnable=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_infonce_fused_matches_reference(
    fused_backend, b, extra_keys, d, dtype, normalize, symmetric, reduction, temperature, learnable, seed
):
    if not supports_dtype(fused_backend, dtype):
        pytest.skip(f"{fused_backend} does not run {dtype}")
    n = b if symmetric else b + extra_keys
    g = torch.Generator().manual_seed(seed)
    q = unit_rows(g, b, d)
    k = unit_rows(g, n, d)
    k[:b] = 0.6 * q + 0.8 * k[:b]  # positives resemble their queries, as in distillation
    q, k = q.to(dtype), k.to(dtype)  # the inputs every run sees (rounded once)
    weights = torch.rand(b, generator=g, dtype=f64) + 0.5  # upstream gradient for reduction="none"
    options = dict(normalize=normalize, symmetric=symmetric, reduction=reduction)

    def run(backend, run_dtype):
        return run_infonce(backend, q, k, weights, temperature, learnable, run_dtype, **options)

    fused = run(fused_backend, dtype)
    refs = reference_runs(run, dtype)
    acc = accumulation_dtype(dtype)
    loss_magnitude, temperature_grad_magnitude = infonce_magnitudes(q, k, temperature, normalize, reduction, weights)
    dq_magnitude, dk_magnitude = infonce_grad_magnitudes(q, k, temperature, normalize, symmetric, reduction, weights)
    outputs = [
        ("loss", acc, loss_magnitude),
        ("d query", dtype, dq_magnitude),
        ("d key", dtype, dk_magnitude),
        ("d temperature", acc, temperature_grad_magnitude),
        ("loss without grad", acc, loss_magnitude),
    ]
    for i, (name, out_dtype, magnitude) in enumerate(outputs):
        check(name, fused[i], *(r[i] for r in refs), out_dtype, magnitude)


# ------------------------------------------------------------------------------------ fuzz: HSIC


def run_hsic(backend, x, z, dtype, **options):
    x = x.detach().clone().to(dtype).requires_grad_()  # a fresh leaf per run
    z = z.detach().clone().to(dtype).requires_grad_()
    value = hsic(x, z, backend=backend, **options)
    value.backward()
    return value.detach(), x.grad, z.grad


def hsic_magnitude(x, z, kernel, normalized, gamma, gamma_z):
    """Size of the terms that cancel in HSIC (and, for the normalized one, how that error propagates
    through the ratio hkl/√(hkk·hll))."""
    x, z = x.to(f64), z.to(f64)
    gamma_z = gamma if gamma_z is None else gamma_z
    gx = median_heuristic_gamma(x) if gamma == "median" else gamma
    gz = median_heuristic_gamma(z) if gamma_z == "median" else gamma_z
    K, L = kernel_matrix(x, gx, kernel), kernel_matrix(z, gz, kernel)
    n = x.shape[0]

    def terms(A, B):
        ra, rb = A.abs().sum(1), B.abs().sum(1)
        return ((A * B).abs().sum() + 2 / n * (ra @ rb) + ra.sum() * rb.sum() / n**2).item() / (n - 1) ** 2

    def value(A, B):
        ra, rb = A.sum(1), B.sum(1)
        return ((A * B).sum() - 2 / n * (ra @ rb) + ra.sum() * rb.sum() / n**2).item() / (n - 1) ** 2

    if not normalized:
        return terms(K, L)
    hkk, hll = value(K, K), value(L, L)
    ratio = abs(value(K, L)) / math.sqrt(hkk * hll)
    return terms(K, L) / math.sqrt(hkk * hll) + ratio / 2 * (terms(K, K) / hkk + terms(L, L) / hll)


@fuzz(30)
@example(n=3, dx=77, dz=1, dtype=torch.bfloat16, kernel="rbf", normalized=True, gamma=0.5, gamma_z=None, seed=0)
@given(
    n=st.sampled_from([2, 3, 65, 513]),
    dx=st.sampled_from(DIMS),
    dz=st.sampled_from(DIMS),
    dtype=st.sampled_from(DTYPES),
    kernel=st.sampled_from(["rbf", "linear"]),
    normalized=st.booleans(),
    gamma=st.sampled_from([0.5, 2.0, "median"]),
    gamma_z=st.sampled_from([None, 1.0, "median"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_hsic_fused_matches_reference(fused_backend, n, dx, dz, dtype, kernel, normalized, gamma, gamma_z, seed):
    assume(not (normalized and n == 2))  # identically 1, see the module docstring
    if not supports_dtype(fused_backend, dtype):
        pytest.skip(f"{fused_backend} does not run {dtype}")
    g = torch.Generator().manual_seed(seed)
    x = unit_rows(g, n, dx)
    z = torch.tanh(2 * x @ unit_rows(g, dx, dz)) + 0.3 * unit_rows(g, n, dz)  # z depends on x
    x, z = x.to(dtype), z.to(dtype)
    options = dict(kernel=kernel, normalized=normalized, gamma=gamma, gamma_z=gamma_z)

    def run(backend, run_dtype):
        return run_hsic(backend, x, z, run_dtype, **options)

    fused = run(fused_backend, dtype)
    refs = reference_runs(run, dtype)
    assert math.isfinite(fused[0].item())
    acc = accumulation_dtype(dtype)
    magnitude = hsic_magnitude(x, z, kernel, normalized, gamma, gamma_z)
    for i, (name, out_dtype, mag) in enumerate([("hsic", acc, magnitude), ("d x", dtype, 0.0), ("d z", dtype, 0.0)]):
        check(name, fused[i], *(r[i] for r in refs), out_dtype, mag)
