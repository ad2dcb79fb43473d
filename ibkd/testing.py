"""Testing helpers: a dense implementation of the fused-backend kernel contract.

:class:`DenseKernelBackend` implements every kernel-level function of :mod:`ibkd.backend.base`
densely (materialising B×N and n×n), by autograd over the reference formulas. It is the executable
spec of the kernel contract: backend authors compare their kernels against it one function at a
time, and the tests use it to check the custom-op layer (:mod:`ibkd.ops`) without any compiled code.
It is not registered by default; ``ibkd.register_backend(DenseKernelBackend())`` makes it usable as
``backend="dense"``.
"""

from __future__ import annotations

import torch

from .backend.base import Backend, accumulation_dtype
from .backend.reference import kernel_matrix


def _infonce_rows_and_lse(q, k, inv_temp, symmetric):
    logits = (q @ k.T) * inv_temp
    b = q.shape[0]
    pos = logits.diagonal()[:b]
    lse_row = torch.logsumexp(logits, dim=1)
    if symmetric:
        lse_col = torch.logsumexp(logits, dim=0)
        return (lse_row - pos + lse_col - pos) / 2, torch.cat([lse_row, lse_col])
    return lse_row - pos, lse_row


def _hsic_stats(x, z, gammas, kernel):
    K = kernel_matrix(x, gammas[0], kernel)
    L = kernel_matrix(z, gammas[1], kernel)
    sums = torch.stack([(K * L).sum(), (K * K).sum(), (L * L).sum()])
    return sums, K.sum(1), L.sum(1)


def _kernel_input_grad(G, a, K, gamma, kernel):
    """x-gradient of Σ_ij G_ij K_ij(x) for a symmetric kernel matrix K of rows a."""
    Gs = G + G.T
    if kernel == "rbf":
        W = Gs * K
        return -2.0 * gamma * (W.sum(1, keepdim=True) * a - W @ a)
    return Gs @ a


class DenseKernelBackend(Backend):
    """Explicit dense formulas (custom-op implementations run below autograd, so no autograd here)."""

    name = "dense"
    description = "dense implementation of the fused kernel contract (testing only)"

    def infonce_forward(self, q, k, inv_temp, symmetric):
        acc = accumulation_dtype(q.dtype)
        return _infonce_rows_and_lse(q.to(acc), k.to(acc), inv_temp.to(acc), symmetric)

    def infonce_backward(self, grad_rows, q, k, inv_temp, lse, symmetric, need_k=True):
        acc = accumulation_dtype(q.dtype)
        qa, ka, c, w = q.to(acc), k.to(acc), inv_temp.to(acc), grad_rows.to(acc)
        b = qa.shape[0]
        S = qa @ ka.T
        logits = S * c
        eye = torch.eye(b, logits.shape[1], dtype=acc, device=q.device)
        if symmetric:
            half = w / 2
            G = torch.exp(logits - lse[:b, None]) * half[:, None]
            G = G + torch.exp(logits - lse[None, b:]) * half[None, :]
            G = G - 2 * eye * half[:, None]
        else:
            G = torch.exp(logits - lse[:, None]) * w[:, None] - eye * w[:, None]
        dq = c * (G @ ka)
        dk = c * (G.T @ qa)
        return dq.to(q.dtype), dk.to(k.dtype), (G * S).sum()

    def hsic_stats(self, x, z, gammas, kernel):
        acc = accumulation_dtype(x.dtype)
        return _hsic_stats(x.to(acc), z.to(acc), gammas.to(acc), kernel)

    def hsic_stats_backward(self, grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel,
                            need_x=True, need_z=True):
        acc = accumulation_dtype(x.dtype)
        xa, za, g = x.to(acc), z.to(acc), gammas.to(acc)
        K = kernel_matrix(xa, g[0], kernel)
        L = kernel_matrix(za, g[1], kernel)
        dx = dz = None
        if need_x:
            GK = grad_sums[0] * L + 2 * grad_sums[1] * K + grad_rowsum_k[:, None]
            dx = _kernel_input_grad(GK, xa, K, g[0], kernel).to(x.dtype)
        if need_z:
            GL = grad_sums[0] * K + 2 * grad_sums[2] * L + grad_rowsum_l[:, None]
            dz = _kernel_input_grad(GL, za, L, g[1], kernel).to(z.dtype)
        return dx, dz
