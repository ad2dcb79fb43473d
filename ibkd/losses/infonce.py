"""InfoNCE with in-batch negatives as a module (:func:`ibkd.functional.infonce`)."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as F_ibkd


class InfoNCELoss(nn.Module):
    """InfoNCE with in-batch negatives (see :func:`ibkd.functional.infonce`).

    Inputs: ``query`` (B, D), ``key`` (N ≥ B, D); row i of key is the positive of row i of query.
    With ``learnable_temperature=True`` τ is a parameter (stored as log τ, CLIP-style).

    Example::

        >>> loss_fn = InfoNCELoss(temperature=0.05)
        >>> loss = loss_fn(student_vectors, teacher_vectors)
    """

    def __init__(
        self,
        temperature: float = 0.05,
        *,
        normalize: bool = True,
        symmetric: bool = False,
        reduction: str = "mean",
        learnable_temperature: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        self.normalize, self.symmetric, self.reduction, self.backend = normalize, symmetric, reduction, backend
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
        else:
            self.register_buffer("log_temperature", torch.tensor(float(temperature)).log(), persistent=False)
        self.learnable_temperature = learnable_temperature
        # a fixed τ stays a Python float: no device sync per step, and torch.compile sees a constant
        self._fixed_temperature = float(temperature)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        temperature = self.temperature if self.learnable_temperature else self._fixed_temperature
        return F_ibkd.infonce(
            query,
            key,
            temperature=temperature,
            normalize=self.normalize,
            symmetric=self.symmetric,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature):g}, normalize={self.normalize}, symmetric={self.symmetric}, "
            f"learnable_temperature={self.learnable_temperature}, backend={self.backend!r}"
        )
