"""The two losses of IBKD as functions: :func:`infonce` and :func:`hsic`.

Both validate their inputs, pick a backend through the dispatcher (:mod:`ibkd.backend`) and run it:
the dense ``reference`` backend directly, fused backends (``cpu``, ``triton``, ``cuda``) through the
``torch.library`` custom ops of :mod:`ibkd.ops`.

Reference: Zhang et al., "Text Representation Distillation via Information Bottleneck Principle",
EMNLP 2023 (arXiv:2311.05472).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import _validation as v
from . import ops
from .backend.base import accumulation_dtype, resolve_backend
from .backend.reference import NORMALIZED_UNDEFINED, hsic_from_sums, normalize_hsic, self_hsic_magnitude

Number = Union[float, torch.Tensor]

#: above this many rows the median heuristic looks at a fixed, evenly spaced subsample of rows
MEDIAN_HEURISTIC_MAX_ROWS = 2048


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


def unit_rows(a: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """L2-normalised rows of ``a`` in ``acc``, for any finite scale.

    ``F.normalize`` squares the entries: rows of size 1e20 overflow float32 (‖a‖ = inf, the rows
    become 0 and InfoNCE returned ln N with zero gradient), rows of size 1e-25 underflow to the eps
    floor. Dividing each row by its largest |entry| first keeps the norm in [1, √D]. The divisor is
    detached: a ↦ a/‖a‖ is homogeneous of degree 0, so scaling a row by a positive constant changes
    neither the value nor the gradient with respect to a. All-zero rows stay zero, as before."""
    a = a.to(acc)
    peak = a.detach().abs().amax(dim=1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return F.normalize(a / peak, dim=1)


def centre_rows(a: torch.Tensor) -> torch.Tensor:
    """``a`` minus its mean row (in the accumulation dtype, back in ``a``'s dtype), with autograd.

    HSIC is unchanged by a common shift of the rows (RBF distances and the centred linear kernel
    H·aaᵀ·H are translation-invariant), but the kernels compute ‖a_i − a_j‖² as
    ‖a_i‖² + ‖a_j‖² − 2a_i·a_j, which cancels catastrophically when the rows share a large offset
    (mean-pooled embedding outputs: ‖a‖ ≈ 60 around a common mean; float32 relative error 2e-4 to
    6e-3 measured before this). Centring removes the offset before any backend sees the rows. The
    gradient of a translation-invariant loss already sums to zero over the rows, so the mean's own
    gradient term (minus the column mean of the upstream gradient) is zero up to rounding: exact."""
    acc = accumulation_dtype(a.dtype)
    a_acc = a.to(acc)
    return (a_acc - a_acc.mean(dim=0, keepdim=True)).to(a.dtype)


def infonce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: Number = 0.05,
    normalize: bool = True,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """InfoNCE with in-batch negatives: the positive of ``query[i]`` is ``key[i]``, every other key row
    (including the extra rows ``key[B:]``) is a negative.

    ``loss_i = logsumexp_j(s_ij/τ) − s_ii/τ`` with ``s = query·keyᵀ`` (cosine similarity if
    ``normalize``). In IBKD the query is the projected student vector P(s) and the key the teacher
    vector (arXiv:2311.05472, eq. 6).

    Args:
        query: (B, D) anchors.
        key: (N, D) with N ≥ B; row i is the positive of query row i.
        temperature: τ > 0, a float or a 0-dim tensor; if it requires grad its gradient is returned
            (a CLIP-style learnable temperature). τ and 1/τ must be finite in the accumulation dtype
            (float32: τ ≥ 2.9e-39), else a ValueError.
        normalize: L2-normalise both inputs first (cosine similarity); safe for rows of any finite
            scale (each row is divided by its largest |entry| before the norm is taken).
        symmetric: also the key→query direction (needs N == B): (row loss + column loss)/2.
        reduction: "mean" | "sum" | "none" (per-row vector of shape (B,)).
        backend: "auto" or a name from :func:`ibkd.backends`.
        check_finite: check inputs for NaN/Inf (one cheap reduction; skipped under torch.compile).

    Returns:
        The loss in the accumulation dtype (float32, or float64 for float64 inputs).

    Example::

        >>> s, t = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
        >>> loss = ibkd.functional.infonce(s, t, temperature=0.05)
        >>> loss.backward()
    """
    v.check_matrix("query", query)
    v.check_matrix("key", key)
    v.check_same_device("query", query, "key", key)
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query and key must have the same feature dimension D, got {query.shape[1]} and {key.shape[1]}"
        )
    b, n = query.shape[0], key.shape[0]
    if n < b:
        raise ValueError(f"key must have at least as many rows as query (N >= B), got N={n} < B={b}")
    if symmetric and n != b:
        raise ValueError(f"symmetric=True needs as many key rows as query rows, got B={b}, N={n}")
    v.check_choice("reduction", reduction, ops.REDUCTIONS)
    tau = v.check_positive_scalar("temperature", temperature)
    if check_finite:
        v.check_finite("query", query)
        v.check_finite("key", key)

    dtype = _common_dtype(query, key)
    query, key = query.to(dtype), key.to(dtype)
    acc = accumulation_dtype(dtype)
    v.check_temperature_range("temperature", tau, acc)  # here, for every backend alike
    if normalize:  # in the accumulation dtype, then back to the input dtype for the kernels
        query = unit_rows(query, acc).to(dtype)
        key = unit_rows(key, acc).to(dtype)

    impl = resolve_backend(backend, query.device, dtype, "infonce", (b, n, query.shape[1]))
    if not impl.fused:
        rows = impl.infonce(query, key, temperature, symmetric)
        return rows.mean() if reduction == "mean" else rows.sum() if reduction == "sum" else rows

    if isinstance(temperature, torch.Tensor):
        inv_temp = (1.0 / temperature.to(device=query.device, dtype=acc)).reshape(())
    else:
        inv_temp = torch.tensor(1.0 / float(temperature), dtype=acc, device=query.device)
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or inv_temp.requires_grad)
    red = ops.REDUCTIONS[reduction]
    fuse_grad = needs_grad and red != 0
    # keys without requires_grad (a frozen teacher's vectors) skip dK, a third of the gradient's work
    need_k = key.requires_grad
    loss, *_ = ops.infonce_op(query.contiguous(), key.contiguous(), inv_temp, symmetric, red, fuse_grad, impl.name,
                              need_k)
    return loss


def median_heuristic_gamma(a: torch.Tensor, max_rows: int = MEDIAN_HEURISTIC_MAX_ROWS) -> torch.Tensor:
    """γ = 1/(2·median of the pairwise squared distances ‖a_i − a_j‖², i < j), without gradient.

    Exact for n ≤ ``max_rows``; above, the median is taken over the pairs of ``max_rows`` evenly spaced
    rows (deterministic), so no n×n matrix is ever formed. A zero median (all rows equal) gives γ = 1.
    The rows are centred first: the distances come from the Gram expansion, which cancels when the rows
    share a large offset (see :func:`centre_rows`).
    """
    with torch.no_grad():
        acc = accumulation_dtype(a.dtype)
        a = a.detach().to(acc)
        n = a.shape[0]
        if n > max_rows:
            idx = torch.linspace(0, n - 1, max_rows, device=a.device).round().long()
            a = a[idx]
            n = max_rows
        a = a - a.mean(dim=0, keepdim=True)
        sq = a.pow(2).sum(1)
        dist2 = (sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)).clamp_min(0.0)
        iu = torch.triu_indices(n, n, offset=1, device=a.device)
        med = dist2[iu[0], iu[1]].median()
        return torch.where(med > 0, 0.5 / med, torch.ones_like(med))


def hsic_from_stats(sums: torch.Tensor, rowsum_k: torch.Tensor, rowsum_l: torch.Tensor, n: int, normalized: bool):
    """Biased HSIC from the fused backends' statistics (see :mod:`ibkd.backend.base`):
    tr(KHLH) = Σ K∘L − (2/n)(K1)·(L1) + (1ᵀK1)(1ᵀL1)/n², divided by (n−1)², by the reference's
    own formulas (:func:`ibkd.backend.reference.hsic_from_sums`)."""
    hsic_kl = hsic_from_sums(sums[0], rowsum_k, rowsum_l, n)
    if not normalized:
        return hsic_kl
    return normalize_hsic(
        hsic_kl, hsic_from_sums(sums[1], rowsum_k, rowsum_k, n), hsic_from_sums(sums[2], rowsum_l, rowsum_l, n),
        self_hsic_magnitude(sums[1], rowsum_k, n), self_hsic_magnitude(sums[2], rowsum_l, n),
    )


def _resolve_gamma(name: str, gamma, data: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    if isinstance(gamma, str):
        v.check_choice(name, gamma, ("median",))
        return median_heuristic_gamma(data).to(acc)
    v.check_positive_scalar(name, gamma)
    if isinstance(gamma, torch.Tensor):
        return gamma.detach().to(device=data.device, dtype=acc).reshape(())
    return torch.tensor(float(gamma), dtype=acc, device=data.device)


def hsic(
    x: torch.Tensor,
    z: torch.Tensor,
    *,
    gamma: Union[float, str, torch.Tensor] = 1.0,
    gamma_z: Optional[Union[float, str, torch.Tensor]] = None,
    kernel: str = "rbf",
    normalized: bool = False,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """Hilbert–Schmidt independence criterion between the rows of ``x`` and ``z`` (biased estimator).

    ``HSIC = tr(K H L H)/(n−1)²`` with ``H = I − 11ᵀ/n``; RBF kernels ``K_ij = exp(−γ‖x_i−x_j‖²)``,
    ``L_ij = exp(−γ_z‖z_i−z_j‖²)``, or linear kernels ``K = xxᵀ``, ``L = zzᵀ``. In IBKD, x is the
    student's input representation and z its output; minimising HSIC(x, z) drops input information the
    student does not need (arXiv:2311.05472, eq. 7; Gretton et al., ALT 2005).

    Both inputs are centred (their mean row subtracted, with autograd) before any backend runs: HSIC
    does not change, and the kernels' distances no longer cancel for rows with a large common offset.

    Args:
        x: (n, dx), n ≥ 2.
        z: (n, dz), same n.
        gamma: RBF bandwidth γ > 0 for x (float or 0-dim tensor, no gradient), or "median":
            γ = 1/(2·median pairwise squared distance) of the batch.
        gamma_z: bandwidth for z; defaults to ``gamma`` (with "median", computed on z itself).
        kernel: "rbf" or "linear".
        normalized: return HSIC(x,z)/sqrt(HSIC(x,x)·HSIC(z,z)) (in [0, 1]). Undefined (0/0) when x or
            z has all rows equal, or a kernel matrix that is constant in this precision: ValueError.
        backend: "auto" or a name from :func:`ibkd.backends`.
        check_finite: check inputs for NaN/Inf (skipped under torch.compile).

    Returns:
        A 0-dim tensor in the accumulation dtype (float32, or float64 for float64 inputs).

    Example::

        >>> x, z = torch.randn(64, 384), torch.randn(64, 128, requires_grad=True)
        >>> ibkd.functional.hsic(x, z, gamma="median").backward()
    """
    v.check_matrix("x", x, min_rows=2)
    v.check_matrix("z", z, min_rows=2)
    v.check_same_device("x", x, "z", z)
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"x and z must have the same number of rows n, got {x.shape[0]} and {z.shape[0]}")
    v.check_choice("kernel", kernel, ("rbf", "linear"))
    if check_finite:
        v.check_finite("x", x)
        v.check_finite("z", z)
    if normalized:  # HSIC(x, x) = 0 exactly; caught here, before rounding can hide it
        v.check_rows_vary("x", x, NORMALIZED_UNDEFINED)
        v.check_rows_vary("z", z, NORMALIZED_UNDEFINED)
    dtype = _common_dtype(x, z)
    x, z = centre_rows(x.to(dtype)), centre_rows(z.to(dtype))
    acc = accumulation_dtype(dtype)
    n = x.shape[0]
    if kernel == "rbf":
        gx = _resolve_gamma("gamma", gamma, x, acc)
        gz = _resolve_gamma("gamma_z", gamma if gamma_z is None else gamma_z, z, acc)
    else:  # bandwidths are meaningless for the linear kernel; still reject nonsense values
        for name, g in (("gamma", gamma), ("gamma_z", gamma_z)):
            if g is not None:
                v.check_choice(name, g, ("median",)) if isinstance(g, str) else v.check_positive_scalar(name, g)
        gx = gz = torch.ones((), dtype=acc, device=x.device)

    impl = resolve_backend(backend, x.device, dtype, "hsic", (n, x.shape[1], z.shape[1]))
    if not impl.fused:
        return impl.hsic(x, z, gx, gz, kernel, normalized)
    gammas = torch.stack([gx, gz])
    sums, rk, rl = ops.hsic_stats_op(x.contiguous(), z.contiguous(), gammas, kernel, impl.name)
    return hsic_from_stats(sums, rk, rl, n, normalized)
