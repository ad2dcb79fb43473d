"""Saving and loading a loss's own state (the projection P, a calibrated β) as safetensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

#: the file name used when a folder is given
STATE_FILE = "ibkd_projection.safetensors"
#: what older releases wrote (a pickled state dict); still read
LEGACY_STATE_FILE = "ibkd_projection.pt"


def save_loss_state(module: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write ``module.state_dict()`` to ``path`` (a ``.safetensors`` file, or ``STATE_FILE`` in a folder)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / STATE_FILE
    # safetensors refuses shared or non-contiguous storage: store plain contiguous copies
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "module": type(module).__name__})
    return path


def load_loss_state(module: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True) -> Path:
    """Load what :func:`save_loss_state` wrote (or an older ``.pt`` state dict) into ``module``.

    ``path`` is a file or a folder holding ``STATE_FILE`` (or ``LEGACY_STATE_FILE``). A missing, corrupt
    or mismatching file raises ``ValueError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / STATE_FILE, path / LEGACY_STATE_FILE]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise ValueError(f"{path}: no {STATE_FILE} (or legacy {LEGACY_STATE_FILE}) in this folder")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
    except Exception as exc:  # corrupt or truncated: say which file, not a deep traceback
        raise ValueError(f"{path}: cannot read the loss state ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "re-save it with save_loss_state") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    # older releases kept P under a wrapper ("ibkd.projection.weight") or without the beta state
    own = module.state_dict()
    if not set(state) & set(own):
        stripped = {k.split(".", 1)[1]: v for k, v in state.items() if "." in k}
        if set(stripped) & set(own):
            state = stripped
    missing = sorted(set(own) - set(state))
    legacy_ok = all(k.startswith("beta.") for k in missing)
    try:
        module.load_state_dict(state, strict=strict and not (missing and legacy_ok))
    except RuntimeError as exc:
        raise ValueError(f"{path}: does not match {type(module).__name__} ({str(exc).splitlines()[0]})") from None
    return path
