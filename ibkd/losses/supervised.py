"""Stage 2 of IBKD: supervised contrastive fine-tuning with the HSIC bottleneck."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .auto_beta import DEFAULT_CALIBRATION_STEPS, SUPERVISED_TARGET_RATIO
from .infonce import InfoNCELoss
from .objective import InformationBottleneck, check_dim, check_rows, make_projection

SUPERVISED_METHODS = ("ibkd", "contrastive", "none")


class SupervisedIBKDLoss(InformationBottleneck):
    """Stage-2 IBKD: ``InfoNCE(P(a), P([p; n])) + β·HSIC(x, a)``.

    Each anchor a is pulled to its positive p and pushed from every other positive of the batch and every
    hard negative n (all through one shared projection P), while β·HSIC between the anchor and its input
    representation x (the mean-pooled penultimate layer in the paper) bottlenecks what it keeps.

    Args:
        dim: dimension of the embeddings.
        method: ``"ibkd"``; ``"contrastive"`` (β = 0: MultipleNegativesRankingLoss with scale 1/τ when
            ``projection_dim=None``); ``"none"`` (a zero loss).
        temperature: τ (default 0.05, the paper's stage 2).
        beta: a number, or ``"auto"`` (default; see :class:`ibkd.losses.IBKDLoss`). At the paper's β=1,
            γ=0.1 the HSIC term is ~2e-4 against an InfoNCE of ~0.1: it does nothing.
        gamma: RBF bandwidth of HSIC (default 0.1, the paper's stage 2) or ``"median"``.
        projection_dim: size of the shared projection P (default 128, as in the paper); ``None`` compares
            the embeddings themselves.
        projection_init: ``"identity"`` (when dims match) or ``"random"``.
        beta_target_ratio: the ratio ``auto`` aims at (default 0.5, the middle of the 0.2–0.8 range
            measured to help).
        normalize_hsic_inputs, beta_calibration_steps, gamma_z, kernel, cka, gather_across_devices,
        track_grad_norms, backend: as in :class:`ibkd.losses.IBKDLoss`.

    Inputs to ``forward(anchor, positive, inputs=None, negatives=())``:
        ``anchor`` and ``positive`` (B, dim); ``inputs`` (B, d_x), x of the anchors; ``negatives``: a
        sequence of (B, dim) hard-negative columns (row i belongs to anchor i). Under ``torchrun`` each
        column is gathered separately, so row i of the keys stays the positive of anchor i.

    Returns:
        a dict with ``loss``, the unweighted ``infonce`` and ``hsic`` (detached), ``beta`` and, with
        ``track_grad_norms``, the gradient norms at the anchors.

    References:
        Zhang et al., "Text Representation Distillation via Information Bottleneck Principle", EMNLP 2023,
        https://arxiv.org/abs/2311.05472

    Example::

        >>> loss_fn = ibkd.losses.SupervisedIBKDLoss(384)
        >>> out = loss_fn(anchor_vecs, positive_vecs, penultimate_mean, negatives=[hard_negative_vecs])
        >>> out["loss"].backward()
    """

    def __init__(
        self,
        dim: int,
        *,
        method: str = "ibkd",
        temperature: float = 0.05,
        beta: Union[float, str] = "auto",
        gamma: Union[float, str] = 0.1,
        projection_dim: Optional[int] = 128,
        projection_init: str = "identity",
        normalize_hsic_inputs: bool = True,
        beta_target_ratio: float = SUPERVISED_TARGET_RATIO,
        beta_calibration_steps: int = DEFAULT_CALIBRATION_STEPS,
        gamma_z: Optional[Union[float, str]] = None,
        kernel: str = "rbf",
        cka: bool = False,
        gather_across_devices: Optional[bool] = None,
        track_grad_norms: bool = False,
        backend: str = "auto",
    ):
        if method not in SUPERVISED_METHODS:
            raise ValueError(f"method must be one of {SUPERVISED_METHODS}, got {method!r}")
        super().__init__(beta=0.0 if method != "ibkd" else beta, gamma=gamma, gamma_z=gamma_z, kernel=kernel, cka=cka,
                         normalize_hsic_inputs=normalize_hsic_inputs, beta_target_ratio=beta_target_ratio,
                         beta_calibration_steps=beta_calibration_steps, gather_across_devices=gather_across_devices,
                         track_grad_norms=track_grad_norms, backend=backend, name="IBKD stage 2")
        self.dim, self.method = check_dim("dim", dim), method
        if projection_dim is not None:
            self.projection = make_projection(dim, check_dim("projection_dim", projection_dim), projection_init)
        else:
            self.projection = torch.nn.Identity()
        self.infonce = InfoNCELoss(temperature, backend=backend)

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, inputs: Optional[torch.Tensor] = None,
                negatives: Sequence[torch.Tensor] = ()) -> dict:
        check_rows("anchor", anchor, self.dim)
        b = anchor.shape[0]
        check_rows("positive", positive, self.dim, rows=b)
        if isinstance(negatives, torch.Tensor):
            negatives = [negatives]
        for i, negative in enumerate(negatives):
            check_rows(f"negatives[{i}]", negative, self.dim, rows=b)
        if inputs is not None and self.uses_inputs:
            check_rows("inputs", inputs, rows=b)
        anchor, positive, inputs, *negatives = self.gather(anchor, positive, inputs if self.uses_inputs else None,
                                                           *negatives)
        if self.method == "none":
            return {"loss": anchor.sum() * 0.0, "beta": torch.tensor(0.0)}
        keys = torch.cat([positive, *negatives]) if negatives else positive
        infonce = self.infonce(self.projection(anchor), self.projection(keys))
        return self.combine(infonce, self.bottleneck(inputs, anchor), anchor)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, normalize_hsic_inputs={self.normalize_hsic_inputs}"
