"""Embedding distillation by encoding (Mou et al., "Distilling Word Embeddings: An Encoding Approach",
CIKM 2016, arXiv 1506.04488): the small word-embedding table of the compact student.

In a small transformer student the word-embedding table dominates the size (all-MiniLM-L6-v2:
30,522 x 384 ≈ 11.7M of 22.7M parameters). Mou et al. shrink a big table E (V x d_big) through a learned
non-linear *encoding layer*::

    e_small(w) = f(E[w] @ W + b)        W: d_big x d_small, f = tanh by default

trained end to end with a task network on task labels. Afterwards the small table f(E W + b) (V x d_small)
is precomputed and E and the encoder are discarded: inference only needs the small table.

* :class:`EncodingDistiller` — the encoder over a frozen E (a non-persistent buffer, never a parameter);
  :meth:`EncodingDistiller.precompute` writes the small table chunk by chunk.
* :func:`save_small_table` / :func:`load_small_table` — the exported folder: ``table.safetensors`` (key
  ``weight``, V x d_small), ``embedding_config.json`` and the tokenizer files (plus, optionally, the
  small task network in ``task_head.safetensors``, so reported scores can be recomputed from the folder
  alone). Nothing of E or of the encoder. :mod:`ibkd.distill.compact` builds the compact student on it.

Training the table on a task, and the comparison with a directly trained table, are an experiment:
:mod:`ibkd.experiments.embedding` (``ibkd compress-embeddings``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .data import DataError

PathLike = Union[str, Path]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "identity": lambda x: x,
}
TABLE_FILE = "table.safetensors"
TASK_HEAD_FILE = "task_head.safetensors"
CONFIG_FILE = "embedding_config.json"


class EmbeddingConfigError(ValueError):
    """A bad argument of the embedding distiller (the CLI reports it as one line)."""


def activation_fn(name: str, argument: str = "activation") -> Callable[[torch.Tensor], torch.Tensor]:
    """The non-linearity called ``name``; an error naming ``argument`` for an unknown one."""
    if name not in ACTIVATIONS:
        raise EmbeddingConfigError(f"{argument} must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise EmbeddingConfigError(f"{argument} must be a positive int, got {value!r}")
    return int(value)


def check_table(table: Any, argument: str, tokenizer=None) -> torch.Tensor:
    """``table`` as a non-empty 2-D tensor with at least one row per token of ``tokenizer``."""
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or 0 in table.shape:
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise EmbeddingConfigError(f"{argument} must be a non-empty (V, d) tensor, got {shape}")
    if tokenizer is not None and len(tokenizer) > table.shape[0]:
        raise EmbeddingConfigError(f"{argument} has {table.shape[0]} rows but the tokenizer has "
                                   f"{len(tokenizer)} tokens")
    return table


class EncodingDistiller(nn.Module):
    """e_small = f(E[ids] @ W + b) over a frozen big table E (V x d_big).

    E is a non-persistent buffer: it is not a parameter (no optimizer sees it, it gets no gradient) and
    it is not in ``state_dict()``. W is Glorot-initialised (the initialisation made for tanh), b = 0.
    """

    def __init__(self, big_table: torch.Tensor, d_small: int, activation: str = "tanh"):
        super().__init__()
        check_table(big_table, "big_table")
        if not big_table.is_floating_point():
            raise EmbeddingConfigError(f"big_table must be floating point, got {big_table.dtype}")
        self.d_small = check_positive_int(d_small, "d_small")
        self.activation = activation
        self._act = activation_fn(activation)
        self.register_buffer("big_table", big_table.detach().to(torch.float32), persistent=False)
        self.encoder = nn.Linear(big_table.shape[1], self.d_small)
        nn.init.xavier_uniform_(self.encoder.weight)
        nn.init.zeros_(self.encoder.bias)

    @property
    def vocab_size(self) -> int:
        return int(self.big_table.shape[0])

    @property
    def d_big(self) -> int:
        return int(self.big_table.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._act(self.encoder(self.big_table[ids]))

    @torch.no_grad()
    def precompute(self, chunk_rows: int = 4096) -> torch.Tensor:
        """The small table f(E W + b) (V x d_small, float32), ``chunk_rows`` rows of E at a time."""
        chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
        out = torch.empty(self.vocab_size, self.d_small, dtype=torch.float32, device=self.big_table.device)
        for start in range(0, self.vocab_size, chunk_rows):
            rows = self.big_table[start:start + chunk_rows]
            out[start:start + rows.shape[0]] = self._act(self.encoder(rows)).float()
        return out

    def table(self) -> torch.Tensor:
        return self.precompute()


def jsonable(value):
    """``value`` with tensors as lists, numpy scalars unwrapped and non-finite floats as None (JSON has
    no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_small_table(folder: PathLike, table: torch.Tensor, tokenizer, meta: dict,
                     task_head: Optional[dict] = None) -> Path:
    """Write ``table.safetensors`` (key ``weight``), ``embedding_config.json`` (``meta`` plus d_small and
    vocab_size) and the tokenizer files; with ``task_head`` (a state dict of the task network) also
    ``task_head.safetensors``. Nothing of the big table or of the encoder goes in."""
    check_table(table, "table", tokenizer)
    if not isinstance(meta, dict):
        raise EmbeddingConfigError(f"meta must be a dict, got {type(meta).__name__}")
    folder = Path(os.path.expanduser(str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": table.detach().to("cpu", torch.float32).contiguous()}, str(folder / TABLE_FILE),
              metadata={"format": "pt"})
    if task_head is not None:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in task_head.items()},
                  str(folder / TASK_HEAD_FILE), metadata={"format": "pt"})
    elif (folder / TASK_HEAD_FILE).exists():
        (folder / TASK_HEAD_FILE).unlink()  # a stale head from an earlier export would not match
    config = {**jsonable(meta), "d_small": int(table.shape[1]), "vocab_size": int(table.shape[0])}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def load_small_table(folder: PathLike) -> tuple[torch.Tensor, dict]:
    """``(table, meta)`` from a folder written by :func:`save_small_table`."""
    folder = Path(os.path.expanduser(str(folder)))
    for name in (TABLE_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"folder: {folder} has no {name} (not a table written by save_small_table)")
    tensors = load_file(str(folder / TABLE_FILE))
    if set(tensors) != {"weight"}:
        raise DataError(f"{folder / TABLE_FILE}: expected the single key 'weight', got {sorted(tensors)}")
    table = tensors["weight"]
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if table.ndim != 2 or [meta.get("vocab_size"), meta.get("d_small")] != list(table.shape):
        raise DataError(f"{folder}: table shape {tuple(table.shape)} does not match {CONFIG_FILE} "
                        f"(vocab_size={meta.get('vocab_size')}, d_small={meta.get('d_small')})")
    return table, meta
