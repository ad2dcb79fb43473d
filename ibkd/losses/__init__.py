"""The IBKD objectives, importable into any trainer; the one place where the loss terms are combined.

* :class:`IBKDLoss` — stage 1: ``InfoNCE(P(s), t) + β·HSIC(x, s)`` and its baselines (``contrastive``,
  ``mse``, ``none``).
* :class:`SupervisedIBKDLoss` — stage 2: ``InfoNCE(P(a), P([p; n])) + β·HSIC(x, a)``.
* :class:`InfoNCELoss`, :class:`HSICLoss` — the two terms alone (fused kernels via :mod:`ibkd.functional`).

Defaults (what users get without arguments; the CLI and configs use the same):

=========  ======  ========  ======  ======================  =========================
stage      τ       β         γ       HSIC inputs             projection P
=========  ======  ========  ======  ======================  =========================
1 distill  1.0     "auto"    1.0     L2-normalised           student → teacher dim,
                                                             identity start
2 finetune 0.05    "auto"    0.1     L2-normalised           student → 128
=========  ======  ========  ======  ======================  =========================

``beta="auto"`` aims the HSIC gradient at half the InfoNCE gradient at the student output, then freezes β
(:mod:`ibkd.losses.auto_beta`). The paper's numbers (Zhang et al., EMNLP 2023, arXiv:2311.05472) are in
:data:`PAPER_STAGE1` / :data:`PAPER_STAGE2`; its β values are inert at the scale of these kernels.
"""

from .auto_beta import (DEFAULT_CALIBRATION_STEPS, DEFAULT_TARGET_RATIO, DISTILL_TARGET_RATIO, SUPERVISED_TARGET_RATIO,
                        check_beta)
from .distributed import world as rank_and_world_size
from .distillation import DISTILL_METHODS, IBKDLoss
from .hsic import HSICLoss
from .infonce import InfoNCELoss
from .serialization import load_loss_state, save_loss_state
from .supervised import SUPERVISED_METHODS, SupervisedIBKDLoss

STAGE1_DEFAULTS = dict(temperature=1.0, beta="auto", gamma=1.0, beta_target_ratio=DISTILL_TARGET_RATIO)
STAGE2_DEFAULTS = dict(temperature=0.05, beta="auto", gamma=0.1, projection_dim=128,
                       beta_target_ratio=SUPERVISED_TARGET_RATIO)
#: the paper's own stage settings, for reproducing it literally
PAPER_STAGE1 = dict(temperature=1.0, beta=0.2, gamma=1.0)
PAPER_STAGE2 = dict(temperature=0.05, beta=1.0, gamma=0.1, projection_dim=128)

__all__ = [
    "DEFAULT_CALIBRATION_STEPS",
    "DEFAULT_TARGET_RATIO",
    "DISTILL_METHODS",
    "DISTILL_TARGET_RATIO",
    "HSICLoss",
    "IBKDLoss",
    "InfoNCELoss",
    "PAPER_STAGE1",
    "PAPER_STAGE2",
    "STAGE1_DEFAULTS",
    "check_beta",
    "rank_and_world_size",
    "STAGE2_DEFAULTS",
    "SUPERVISED_METHODS",
    "SUPERVISED_TARGET_RATIO",
    "SupervisedIBKDLoss",
    "load_loss_state",
    "save_loss_state",
]
