"""ibkd: distil large text-embedding models into small, fast ones.

* :mod:`ibkd.functional` — ``infonce`` and ``hsic``, fused (C++/Triton/CUDA) or reference PyTorch.
* :mod:`ibkd.losses` — ``IBKDLoss`` (stage 1), ``SupervisedIBKDLoss`` (stage 2), ``InfoNCELoss``, ``HSICLoss``.
* :func:`ibkd.backends` — every backend, whether it can run here, and why not.

Method: Zhang et al., "Text Representation Distillation via Information Bottleneck Principle",
EMNLP 2023, arXiv:2311.05472.
"""

__version__ = "0.1.0"

from . import backend as _backend
from . import functional, losses, ops
from .backend import BackendInfo, BackendUnavailable, register_backend
from .losses import HSICLoss, IBKDLoss, InfoNCELoss, SupervisedIBKDLoss


def backends():
    """List every registered backend as :class:`BackendInfo` (name, available, reason, description)."""
    return _backend.backends()


__all__ = [
    "BackendInfo",
    "BackendUnavailable",
    "HSICLoss",
    "IBKDLoss",
    "InfoNCELoss",
    "SupervisedIBKDLoss",
    "backends",
    "functional",
    "losses",
    "ops",
    "register_backend",
]
