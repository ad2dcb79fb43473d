"""Rows of a sentence-transformers features dict (``input_ids``, ``attention_mask``, ... plus whatever a
module adds): the one place that decides which entries belong to the batch's rows, for the GradCache
mini-batches and for the length-sorted chunks alike."""

from __future__ import annotations

from typing import Any, Union

from torch import Tensor

__all__ = ["batch_rows", "take_rows"]

Rows = Union[slice, Tensor]


def batch_rows(features: dict[str, Any]) -> int:
    """The batch's row count: that of the token ids or mask when present, else of the first tensor."""
    for key in ("input_ids", "attention_mask"):
        value = features.get(key)
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in features.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("a sentence-features dict holds no tensor")


def take_rows(features: dict[str, Any], rows: Rows, *, total: int | None = None) -> dict[str, Any]:
    """A new dict with the selected rows (a slice, or an index tensor in the order wanted) of every tensor
    whose first dimension is the batch's; anything else (a modality string, a prompt length, a 0-d tensor)
    is shared as it is."""
    total = batch_rows(features) if total is None else total

    def pick(value: Any) -> Any:
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != total:
            return value
        if isinstance(rows, slice):
            return value[rows]
        return value.index_select(0, rows.to(value.device))

    return {key: pick(value) for key, value in features.items()}
