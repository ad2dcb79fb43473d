"""The reference backend: both losses written densely and plainly in PyTorch, differentiated by
autograd. This is the executable specification of the package; every fused backend is tested
against it (and against it in float64).

Half-precision inputs are computed in float32 (the fused backends' accumulation precision), float64
in float64; the loss comes back in that accumulation dtype.
"""

from __future__ import annotations

import torch

from .. import _validation  # a module import: _validation itself imports ibkd.backend.base
from .base import Backend, accumulation_dtype


def infonce_rows(query: torch.Tensor, key: torch.Tensor, temperature, symmetric: bool) -> torch.Tensor:
    """Per-row InfoNCE loss (B,) of already-normalised (or raw, for dot-product) vectors.

    loss_i = logsumexp_j(s_ij/τ) − s_ii/τ with s = query·keyᵀ; symmetric adds the column direction:
    (row loss + column loss)/2.
    """
    acc = accumulation_dtype(query.dtype)
    q, k = query.to(acc), key.to(acc)
    logits = (q @ k.T) / temperature  # (B, N)
    b = q.shape[0]
    positives = logits.diagonal()[:b] if logits.shape[1] >= b else None
    row_loss = torch.logsumexp(logits, dim=1) - positives
    if symmetric:
        col_loss = torch.logsumexp(logits, dim=0) - positives
        return (row_loss + col_loss) / 2
    return row_loss


def rbf_kernel(a: torch.Tensor, gamma) -> torch.Tensor:
    """K_ij = exp(−γ‖a_i − a_j‖²), squared distances from the Gram matrix (clamped at 0).

    The squared distance on the diagonal is set to exactly 0 (K_ii = 1): ‖a_i‖² + ‖a_i‖² − 2a_i·a_i
    is rounding noise of size ~u·‖a_i‖², which for rows of norm 60 and a large γ made K_ii visibly
    less than 1. Its gradient is 0 in exact arithmetic too, so masking it changes no derivative. Off
    the diagonal the expansion still cancels when the rows share a large offset;
    :func:`ibkd.functional.hsic` centres its inputs first for that reason."""
    sq = a.pow(2).sum(dim=1)
    dist2 = (sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)).clamp_min(0.0)
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    dist2 = dist2.masked_fill(eye, 0.0)
    return torch.exp(-gamma * dist2)


def kernel_matrix(a: torch.Tensor, gamma, kernel: str) -> torch.Tensor:
    if kernel == "rbf":
        return rbf_kernel(a, gamma)
    return a @ a.T  # linear


def hsic_from_sums(sum_prod: torch.Tensor, rowsum_a: torch.Tensor, rowsum_b: torch.Tensor, n: int) -> torch.Tensor:
    """Biased HSIC tr(A H B H)/(n−1)² of symmetric n×n kernels from Σ A∘B and the row sums A1, B1:
    tr(AHBH) = Σ A∘B − (2/n)·(A1)·(B1) + (1ᵀA1)(1ᵀB1)/n², so no n×n product is formed. The fused
    backends return exactly these statistics (see :mod:`ibkd.backend.base`)."""
    trace = sum_prod - 2.0 / n * (rowsum_a @ rowsum_b) + rowsum_a.sum() * rowsum_b.sum() / n**2
    return trace / (n - 1) ** 2


def self_hsic_magnitude(sum_sq: torch.Tensor, rowsum: torch.Tensor, n: int) -> torch.Tensor:
    """The size of the three terms that cancel in HSIC(a, a) = :func:`hsic_from_sums` (A, A): its
    rounding error is a small multiple of machine epsilon times this."""
    return (sum_sq + 2.0 / n * (rowsum @ rowsum) + rowsum.sum() ** 2 / n**2) / (n - 1) ** 2


def hsic_from_kernels(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Biased HSIC tr(K H L H)/(n−1)² (K, L symmetric), via :func:`hsic_from_sums`."""
    return hsic_from_sums((K * L).sum(), K.sum(dim=1), L.sum(dim=1), K.shape[0])


#: what a degenerate denominator of the normalized HSIC means, for the error message
NORMALIZED_UNDEFINED = "normalized HSIC = HSIC(x, z)/sqrt(HSIC(x, x)·HSIC(z, z)) is undefined (0/0); use normalized=False"


def normalize_hsic(hsic_xz, hsic_xx, hsic_zz, magnitude_xx, magnitude_zz) -> torch.Tensor:
    """HSIC(x, z)/√(HSIC(x, x)·HSIC(z, z)).

    HSIC(a, a) = ‖HAH‖²_F/(n−1)² is 0 exactly when the centred kernel matrix is 0 (all rows equal,
    or a bandwidth so small that A is constant in this precision); computed, it is then rounding noise
    of either sign and the ratio came out as NaN, ±inf or a meaningless number. A self-HSIC not above
    its own rounding error (8·eps·magnitude) raises a ValueError naming the input instead."""
    _validation.check_hsic_self_positive("x", hsic_xx, magnitude_xx, NORMALIZED_UNDEFINED)
    _validation.check_hsic_self_positive("z", hsic_zz, magnitude_zz, NORMALIZED_UNDEFINED)
    return hsic_xz / torch.sqrt(hsic_xx * hsic_zz)


def hsic(x: torch.Tensor, z: torch.Tensor, gamma_x, gamma_z, kernel: str, normalized: bool) -> torch.Tensor:
    acc = accumulation_dtype(x.dtype)
    x, z = x.to(acc), z.to(acc)
    n = x.shape[0]
    K = kernel_matrix(x, gamma_x, kernel)
    L = kernel_matrix(z, gamma_z, kernel)
    rk, rl = K.sum(dim=1), L.sum(dim=1)
    value = hsic_from_sums((K * L).sum(), rk, rl, n)
    if normalized:
        kk, ll = (K * K).sum(), (L * L).sum()
        value = normalize_hsic(
            value, hsic_from_sums(kk, rk, rk, n), hsic_from_sums(ll, rl, rl, n),
            self_hsic_magnitude(kk, rk, n), self_hsic_magnitude(ll, rl, n),
        )
    return value


class ReferenceBackend(Backend):
    name = "reference"
    description = "dense pure-PyTorch losses with autograd (the executable spec); any device"
    fused = False

    def priority(self, device, dtype, op, shape):
        return 0.0  # chosen by "auto" only when no fused backend can run

    def infonce(self, query, key, temperature, symmetric):
        return infonce_rows(query, key, temperature, symmetric)

    def hsic(self, x, z, gamma_x, gamma_z, kernel, normalized):
        return hsic(x, z, gamma_x, gamma_z, kernel, normalized)
