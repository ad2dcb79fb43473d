"""Loss modules over :mod:`ibkd.functional`, importable into any trainer.

Paper defaults (Zhang et al., EMNLP 2023, arXiv:2311.05472):

=========  ======  ======  ======  ==============================
stage      τ       β       γ       projection P
=========  ======  ======  ======  ==============================
1 distill  1.0     0.2     1.0     student dim → teacher dim
2 finetune 0.05    1.0     0.1     student dim → 128
=========  ======  ======  ======  ==============================
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import functional as F_ibkd

STAGE1_DEFAULTS = dict(temperature=1.0, beta=0.2, gamma=1.0)
STAGE2_DEFAULTS = dict(temperature=0.05, beta=1.0, gamma=0.1, projection_dim=128)


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


class IBKDLoss(nn.Module):
    """The IBKD objective: ``InfoNCE(P(student), teacher) + β·HSIC(inputs, student)``.

    The student keeps the teacher's information (InfoNCE between its projected vector and the teacher
    vector, student as anchor, the other teachers in the batch as negatives) and drops the input
    information it does not need (HSIC between its input representation and its output).
    Zhang et al., "Text Representation Distillation via Information Bottleneck Principle",
    EMNLP 2023, arXiv:2311.05472.

    Args:
        student_dim: dimension of the student vectors s.
        teacher_dim: dimension of the teacher vectors t.
        temperature: τ of the InfoNCE term (stage 1: 1.0, stage 2: 0.05).
        beta: weight β of the HSIC term (stage 1: 0.2, stage 2: 1.0).
        gamma: RBF bandwidth of HSIC, a float or "median" (stage 1: 1.0, stage 2: 0.1).
        projection: learn P: Linear(student_dim → projection_dim or teacher_dim). With
            ``projection=False`` P is the identity and the dims must match.
        projection_dim: output dim of P; defaults to the teacher dim. When it differs from the teacher
            dim (stage 2 uses 128) the teacher side is compared in the projected space too, so a
            second Linear(teacher_dim → projection_dim) is learned for the teacher.
        gamma_z, kernel, normalized_hsic: passed to :func:`ibkd.functional.hsic`.

    Inputs to ``forward(student, teacher, inputs)``: ``student`` (B, student_dim), ``teacher``
    (N ≥ B, teacher_dim; extra rows are additional negatives, e.g. hard negatives), ``inputs`` (B, d_x)
    the student's input representation (mean-pooled embedding-layer output in stage 1, the penultimate
    layer in stage 2).

    Returns a dict with ``loss``, ``infonce`` and ``hsic`` (the unweighted terms).

    Example::

        >>> loss_fn = IBKDLoss(384, 768, **ibkd.losses.STAGE1_DEFAULTS)
        >>> out = loss_fn(student_vecs, teacher_vecs, embedding_layer_mean)
        >>> out["loss"].backward()
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        temperature: float = 1.0,
        beta: float = 0.2,
        gamma: Union[float, str] = 1.0,
        projection: bool = True,
        projection_dim: Optional[int] = None,
        gamma_z: Optional[Union[float, str]] = None,
        kernel: str = "rbf",
        normalized_hsic: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise ValueError(f"beta must be a non-negative float, got {beta!r}")
        self.beta = float(beta)
        out_dim = projection_dim or teacher_dim
        if projection:
            self.projection = nn.Linear(student_dim, out_dim)
        else:
            if student_dim != teacher_dim or out_dim != teacher_dim:
                raise ValueError(
                    f"projection=False needs student_dim == teacher_dim, got {student_dim} and {teacher_dim}"
                )
            self.projection = nn.Identity()
        self.teacher_projection = nn.Linear(teacher_dim, out_dim) if out_dim != teacher_dim else nn.Identity()
        self.infonce = InfoNCELoss(temperature, backend=backend)
        self.hsic = HSICLoss(gamma, gamma_z, kernel=kernel, normalized=normalized_hsic, backend=backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, inputs: Optional[torch.Tensor] = None) -> dict:
        projected = self.projection(student)
        teacher = self.teacher_projection(teacher.to(projected.dtype))
        contrastive = self.infonce(projected, teacher)
        if self.beta > 0:
            if inputs is None:
                raise ValueError("inputs (the student's input representation) is required when beta > 0")
            independence = self.hsic(inputs, student)
        else:
            independence = contrastive.new_zeros(())
        loss = contrastive + self.beta * independence
        return {"loss": loss, "infonce": contrastive.detach(), "hsic": independence.detach()}
