import os

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable must be set before
# triton decorates any kernel, i.e. before ibkd's Triton backend is imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The data folder (STS-B, the wiki corpus) is never guessed by the package: tests take it from
# $IBKD_DATA_DIR, defaulting to the shared folder beside the checkout as CI lays it out.
os.environ.setdefault("IBKD_DATA_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
