"""Biased HSIC as a module (:func:`ibkd.functional.hsic`)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import functional as F_ibkd


class HSICLoss(nn.Module):
    """Biased HSIC between two batches of representations (see :func:`ibkd.functional.hsic`).

    Inputs: ``x`` (n, dx), ``z`` (n, dz), n ≥ 2. Returns a scalar.
    """

    def __init__(
        self,
        gamma: Union[float, str] = 1.0,
        gamma_z: Optional[Union[float, str]] = None,
        *,
        kernel: str = "rbf",
        normalized: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.gamma, self.gamma_z, self.kernel, self.normalized, self.backend = gamma, gamma_z, kernel, normalized, backend

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return F_ibkd.hsic(
            x, z, gamma=self.gamma, gamma_z=self.gamma_z, kernel=self.kernel, normalized=self.normalized, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, gamma_z={self.gamma_z}, kernel={self.kernel!r}, normalized={self.normalized}"
