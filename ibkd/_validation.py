"""Input checks shared by the functional API: every error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch

from .backend.base import FLOAT_DTYPES


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def check_matrix(name: str, t, *, min_rows: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s), got shape {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"{name} must have at least 1 feature column, got shape {tuple(t.shape)}")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """One reduction over the tensor; skipped while torch.compile traces (it would sync/graph-break)."""
    if _compiling():
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{name} contains NaN or Inf values; fix the producer or pass check_finite=False to skip this check"
        )


def check_positive_scalar(name: str, value, *, allow_tensor: bool = True):
    """A positive finite float, or (if allowed) a 0-dim floating tensor holding one.

    Returns the value as a Python float, or ``None`` while torch.compile traces (a tensor's value is
    then not read: that would sync and break the graph)."""
    if isinstance(value, torch.Tensor):
        if not allow_tensor:
            raise TypeError(f"{name} must be a float, got a tensor")
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got a tensor of shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if _compiling():
            return None
        v = float(value.detach())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
    else:
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v}")
    return v


def check_temperature_range(name: str, value, acc: torch.dtype) -> None:
    """τ and 1/τ must both be finite in the accumulation dtype ``acc``: the logits are s/τ, so a τ
    whose reciprocal overflows (1e-40 in float32) made the reference return NaN and the fused
    backends fail deep inside with a RuntimeError. ``value`` is the float from
    :func:`check_positive_scalar` (``None`` under torch.compile: nothing to check)."""
    if value is None:
        return
    largest = torch.finfo(acc).max
    if not (1.0 / largest <= value <= largest):
        raise ValueError(
            f"{name} must lie in [{1.0 / largest:.3g}, {largest:.3g}] for {str(acc).replace('torch.', '')} "
            f"accumulation (1/{name} must be finite), got {value:g}; use float64 inputs or a larger {name}"
        )


def check_rows_vary(name: str, t: torch.Tensor, why: str) -> None:
    """Rejects a matrix whose rows are all identical (one comparison against the first row; skipped
    while torch.compile traces)."""
    if _compiling():
        return
    if bool((t == t[:1]).all()):
        raise ValueError(f"{name} has every row identical, so {why}")


def check_hsic_self_positive(name: str, value: torch.Tensor, magnitude: torch.Tensor, why: str) -> None:
    """Rejects a self-HSIC that is not above its own rounding error, 8·eps·``magnitude`` (the size of
    the terms that cancelled in it). NaN (from NaN inputs with check_finite=False) is left to
    propagate; skipped while torch.compile traces."""
    if _compiling():
        return
    v = float(value.detach())
    bound = 8.0 * torch.finfo(value.dtype).eps * float(magnitude.detach())
    if v <= bound:
        raise ValueError(
            f"HSIC({name}, {name}) = {v:.3g} is not above its rounding error {bound:.3g} in "
            f"{str(value.dtype).replace('torch.', '')}: the kernel matrix of {name} is numerically constant "
            f"(rows (nearly) equal, an RBF gamma too small for their spread, or entries so small that the linear "
            f"kernel underflows), so {why}"
        )


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
