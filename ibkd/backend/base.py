"""The backend interface and the registry that every backend registers into.

Two kinds of backend exist:

* the **reference** backend computes each loss densely in plain PyTorch with autograd; it is the
  executable specification every other backend is tested against;
* **fused** backends (``cpu``, ``triton``, ``cuda``) implement a small set of kernel-level functions
  (below) that never materialise the B×N similarity matrix or the n×n kernel matrices. They are called
  through the ``torch.library`` custom ops in :mod:`ibkd.ops`, which add autograd and fake (meta)
  kernels, so ``torch.compile`` traces them without graph breaks.

Kernel-level contract of a fused backend (all inputs contiguous, on one device, same dtype; the
accumulation dtype ``acc`` is float64 for float64 inputs and float32 otherwise):

``infonce_forward(q, k, inv_temp, symmetric) -> (row_loss, lse)``
    ``q`` (B, D), ``k`` (N, D) (already L2-normalised when the caller asked for cosine similarity),
    ``inv_temp`` a 0-dim ``acc`` tensor on the device (1/τ). With ``s_ij = c·q_i·k_j``:
    ``row_loss_i = logsumexp_j s_ij − s_ii`` (B,) in ``acc``; ``lse`` holds the row log-sum-exps (B,)
    or, when ``symmetric`` (N == B), the row then the column log-sum-exps (2B,).
    Symmetric: ``row_loss_i = (lse_row_i − s_ii + lse_col_i − s_ii) / 2``.

``infonce_backward(grad_rows, q, k, inv_temp, lse, symmetric, need_k=True) -> (dq, dk, dinv_temp)``
    Gradients of ``Σ_i grad_rows_i·row_loss_i``; ``dq``/``dk`` in the input dtype, ``dinv_temp``
    a 0-dim ``acc`` tensor. With ``need_k`` False ``dk`` may be None and its work skipped: in
    distillation the keys are the teacher's vectors, and dK is a third of the gradient's GEMMs.

``infonce_forward_backward(q, k, inv_temp, symmetric, grad_weight, need_k=True) -> (row_loss, lse, dq, dk, dinv_temp)``
    Forward plus the gradients of ``grad_weight·Σ_i row_loss_i`` (uniform weight: the reductions
    "mean"/"sum"), ideally in one pass. The default runs the forward then the backward.

``hsic_stats(x, z, gammas, kernel) -> (sums, rowsum_k, rowsum_l)``
    ``x`` (n, dx), ``z`` (n, dz); ``gammas`` an ``acc`` tensor (2,) = (γ_x, γ_z); ``kernel`` is
    ``"rbf"`` (K_ij = exp(−γ_x‖x_i−x_j‖²)) or ``"linear"`` (K = xxᵀ), L likewise from z. RBF
    diagonals are exactly 1: a distance ‖x_i‖² + ‖x_i‖² − 2x_i·x_i from the Gram expansion is rounding
    noise ~u·‖x_i‖² that a large γ turns into K_ii < 1 (``tests/test_numerics.py``).
    :func:`ibkd.functional.hsic` passes x and z with their mean row subtracted (HSIC is unchanged), so
    the expansion does not cancel for rows with a large common offset.
    ``sums`` (3,) = (Σ K∘L, Σ K∘K, Σ L∘L); ``rowsum_k`` = K·1 (n,), ``rowsum_l`` = L·1 (n,); all ``acc``.
    Every HSIC value (plain or normalized) is a closed form of these statistics (see
    :func:`ibkd.functional.hsic_from_stats`).

``hsic_stats_backward(grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel, need_x=True, need_z=True) -> (dx, dz)``
    Vector-Jacobian product of ``hsic_stats``; ``dx``/``dz`` in the input dtype. A gradient whose
    ``need_*`` is False may be returned as None and its work skipped (x is often data, not a parameter:
    the products for x are a third of the backward's GEMMs). With
    ``G_ij = g0·L_ij + 2·g1·K_ij + grk_i`` (the gradient w.r.t. entry K_ij), for RBF
    ``dx_i = −2γ_x Σ_j (G_ij + G_ji) K_ij (x_i − x_j)``; for linear ``dx_i = Σ_j (G_ij + G_ji) x_j``.
    Symmetrically for z with ``g0·K_ij + 2·g2·L_ij + grl_i``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given inputs here; the message says why."""


class Backend:
    """Base class of all backends. Subclasses set ``name``, ``description`` and implement the
    availability hooks plus either the dense losses (reference) or the kernel-level functions."""

    name: str = ""
    description: str = ""
    #: True for backends reached through the ``torch.library`` custom ops in :mod:`ibkd.ops`.
    fused: bool = True

    # -- availability ------------------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        """``None`` if this backend can run at all in this process, else a human-readable reason."""
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """``None`` if the backend can run tensors of this device and dtype, else why not."""
        return None

    def priority(self, device: torch.device, dtype: torch.dtype, op: str, shape: tuple) -> float:
        """Higher is preferred by ``backend="auto"``; ``op`` is "infonce" or "hsic", ``shape`` its
        (B, N, D) or (n, dx, dz). Backends override this with what benchmarks measured."""
        return 0.0

    # -- InfoNCE kernels (fused backends) ----------------------------------------------------
    def infonce_forward(self, q, k, inv_temp, symmetric):
        raise NotImplementedError

    def infonce_backward(self, grad_rows, q, k, inv_temp, lse, symmetric, need_k=True):
        raise NotImplementedError

    def infonce_forward_backward(self, q, k, inv_temp, symmetric, grad_weight, need_k=True):
        row_loss, lse = self.infonce_forward(q, k, inv_temp, symmetric)
        grad_rows = torch.full_like(row_loss, grad_weight)
        dq, dk, dinv = self.infonce_backward(grad_rows, q, k, inv_temp, lse, symmetric, need_k=need_k)
        return row_loss, lse, dq, dk, dinv

    # -- HSIC kernels (fused backends) -------------------------------------------------------
    def hsic_stats(self, x, z, gammas, kernel):
        raise NotImplementedError

    def hsic_stats_backward(self, grad_sums, grad_rowsum_k, grad_rowsum_l, x, z, gammas, kernel,
                            need_x=True, need_z=True):
        raise NotImplementedError

    def __repr__(self):
        return f"<ibkd backend {self.name!r}>"


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`ibkd.backends`: whether a backend is usable in this process, and why not."""

    name: str
    available: bool
    reason: str
    description: str


_REGISTRY: dict[str, Backend] = {}
_LAZY: dict[str, Callable[[], Backend]] = {}


def register_backend(backend_or_factory, name: Optional[str] = None) -> None:
    """Register a backend instance, or a zero-argument factory (imported lazily on first use, so a
    missing extension or Triton never breaks ``import ibkd``)."""
    if isinstance(backend_or_factory, Backend):
        _REGISTRY[backend_or_factory.name] = backend_or_factory
        _LAZY.pop(backend_or_factory.name, None)
    else:
        if not name:
            raise ValueError("register_backend: a factory needs an explicit name")
        _LAZY[name] = backend_or_factory


class _BrokenBackend(Backend):
    """Stands in for a backend whose module failed to import: it reports the import error."""

    def __init__(self, name: str, error: BaseException):
        self.name = name
        self.description = "failed to load"
        self._reason = f"loading the backend failed: {type(error).__name__}: {error}"

    def unavailable_reason(self):
        return self._reason


def registered_names() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        if name not in _LAZY:
            raise ValueError(f"backend must be 'auto' or one of {registered_names()}, got {name!r}")
        factory = _LAZY.pop(name)
        try:
            _REGISTRY[name] = factory()
        except Exception as e:  # an import-time failure becomes a reason, never an ImportError
            _REGISTRY[name] = _BrokenBackend(name, e)
    return _REGISTRY[name]


def backends() -> list[BackendInfo]:
    """Every registered backend, whether it can run in this process, and why not."""
    rows = []
    for name in registered_names():
        b = get_backend(name)
        reason = b.unavailable_reason()
        rows.append(BackendInfo(name, reason is None, reason or "", b.description))
    return rows


def _reason_for(backend: Backend, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return backend.unavailable_reason() or backend.supports(device, dtype)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, op: str, shape: tuple) -> Backend:
    """The dispatcher: an explicit name must be able to run these tensors (else a clear error);
    ``"auto"`` picks the usable backend with the highest priority for this device, dtype and shape."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto":
        backend = get_backend(name)
        reason = _reason_for(backend, device, dtype)
        if reason is not None:
            raise BackendUnavailable(
                f"backend {name!r} cannot run {op} on {device.type} tensors of dtype {dtype}: {reason}"
            )
        return backend
    best, best_priority = None, float("-inf")
    for candidate in registered_names():
        backend = get_backend(candidate)
        if _reason_for(backend, device, dtype) is not None:
            continue
        p = backend.priority(device, dtype, op, shape)
        if p > best_priority:
            best, best_priority = backend, p
    if best is None:  # the reference runs everywhere PyTorch does; reaching here is a bug
        raise BackendUnavailable(f"no backend can run {op} on {device.type}/{dtype}")
    return best
