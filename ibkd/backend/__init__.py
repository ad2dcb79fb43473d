"""Backend registry and dispatcher. ``ibkd.backends()`` lists every backend and why it is (not) usable.

Fused backends are registered as lazy factories: their modules (and the compiled extension or Triton
they need) are imported on first use, and an import failure becomes an "unavailable" reason.
"""

from .base import (
    Backend,
    BackendInfo,
    BackendUnavailable,
    accumulation_dtype,
    backends,
    get_backend,
    register_backend,
    registered_names,
    resolve_backend,
)
from .reference import ReferenceBackend


def _lazy(module: str, cls: str):
    def factory():
        import importlib

        return getattr(importlib.import_module(module, __name__), cls)()

    return factory


register_backend(ReferenceBackend())
register_backend(_lazy(".cpu", "CPUBackend"), name="cpu")
register_backend(_lazy(".triton", "TritonBackend"), name="triton")
register_backend(_lazy(".cuda", "CUDABackend"), name="cuda")

__all__ = [
    "Backend",
    "BackendInfo",
    "BackendUnavailable",
    "accumulation_dtype",
    "backends",
    "get_backend",
    "register_backend",
    "registered_names",
    "resolve_backend",
]
