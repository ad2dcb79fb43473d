"""The reference backend: both losses written densely and plainly in PyTorch, differentiated by
autograd. This is the executable specification of the package; every fused backend is tested
against it (and against it in float64).

Half-precision inputs are computed in float32 (the fused backends' accumulation precision), float64
in float64; the loss comes back in that accumulation dtype.
"""

from __future__ import annotations

import torch

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


def hsic_from_kernels(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Biased HSIC tr(K H L H)/(n−1)², expanded so no n×n product is formed:
    tr(KHLH) = Σ K∘L − (2/n)·(K1)·(L1) + (1ᵀK1)(1ᵀL1)/n²  (K, L symmetric)."""
    n = K.shape[0]
    rk, rl = K.sum(dim=1), L.sum(dim=1)
    trace = (K * L).sum() - 2.0 / n * (rk @ rl) + rk.sum() * rl.sum() / n**2
    return trace / (n - 1) ** 2


def hsic(x: torch.Tensor, z: torch.Tensor, gamma_x, gamma_z, kernel: str, normalized: bool) -> torch.Tensor:
    acc = accumulation_dtype(x.dtype)
    x, z = x.to(acc), z.to(acc)
    K = kernel_matrix(x, gamma_x, kernel)
    L = kernel_matrix(z, gamma_z, kernel)
    value = hsic_from_kernels(K, L)
    if normalized:
        value = value / torch.sqrt(hsic_from_kernels(K, K) * hsic_from_kernels(L, L))
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
