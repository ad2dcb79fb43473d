"""The pieces of the embedding-table experiment: the directly trained baseline table, the task network,
STS-B tokenized once, mean pooling over word ids, and the "arms" (how a run gets its word vectors).

Speed: training touches only the rows of the words in a batch. The distilled arm encodes the unique ids
of the batch (f(E[uniq] W + b)) and gathers; the direct arm keeps a trainable copy of the rows of the
words that occur in the training data only. That is exactly the full-table computation: under Adam
without weight decay a row whose gradient has always been zero never moves (its moments stay zero), so
the rows of words never seen in training keep their random initialisation either way.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.stats import spearmanr
from torch import nn
from transformers import AutoTokenizer

from ...distill.data import DataError, read_stsb
from ...distill.embedding_table import (TASK_HEAD_FILE, EmbeddingConfigError, EncodingDistiller, activation_fn,
                                        check_positive_int, load_small_table)

PathLike = Union[str, Path]


class DirectEmbedding(nn.Module):
    """The baseline: a small table trained directly, ``nn.Embedding(V, d_small)`` with entries drawn from
    N(0, init_std²); ``init_std`` defaults to 1/sqrt(d_small), so rows start at norm ≈ 1 (the scale of
    the rows of the teacher's table) whatever d_small is. Draws from the global RNG: seed it first."""

    def __init__(self, vocab_size: int, d_small: int, init_std: Optional[float] = None):
        super().__init__()
        vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.d_small = check_positive_int(d_small, "d_small")
        self.init_std = float(init_std) if init_std is not None else self.d_small ** -0.5
        if not self.init_std > 0:
            raise EmbeddingConfigError(f"init_std must be positive, got {init_std!r}")
        self.embedding = nn.Embedding(vocab_size, self.d_small)
        nn.init.normal_(self.embedding.weight, 0.0, self.init_std)

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def table(self) -> torch.Tensor:
        return self.embedding.weight.detach().to(torch.float32).clone()


class TaskHead(nn.Module):
    """The task network shared by all arms: pooled vector -> act(Linear(d_in, hidden))."""

    def __init__(self, d_in: int, hidden: int, activation: str = "tanh"):
        super().__init__()
        self.activation = activation
        self._act = activation_fn(activation, "task_activation")
        self.proj = nn.Linear(check_positive_int(d_in, "d_in"), check_positive_int(hidden, "task_hidden"))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._act(self.proj(pooled))


# ---------------------------------------------------------------------------------------------
# STS-B, tokenized once
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenizedPairs:
    """An STS file as padded token ids: side 1 is rows [0, n), side 2 rows [n, 2n) of ``ids``/``mask``;
    ``mask`` marks the real tokens (special tokens and padding off)."""

    ids: torch.Tensor  # (2n, L) long
    mask: torch.Tensor  # (2n, L) bool
    gold: torch.Tensor  # (n,) float32, 0..5
    path: str

    def __len__(self) -> int:
        return int(self.gold.shape[0])

    def to(self, device) -> "TokenizedPairs":
        return TokenizedPairs(self.ids.to(device), self.mask.to(device), self.gold.to(device), self.path)


def tokenize_pairs(tokenizer, path: PathLike, max_length: int = 128, argument: str = "path") -> TokenizedPairs:
    """Read an STS-B file and tokenize both sides with ``tokenizer`` (truncating to ``max_length``)."""
    max_length = check_positive_int(max_length, "max_length")
    if not Path(os.path.expanduser(str(path))).is_file():
        raise FileNotFoundError(f"{argument}: STS-B file not found: {path}")
    s1, s2, scores = read_stsb(path)
    if len(scores) < 2:
        raise DataError(f"{argument}: {path} needs at least 2 sentence pairs, got {len(scores)}")
    batch = tokenizer(list(s1) + list(s2), padding=True, truncation=True, max_length=max_length,
                      return_special_tokens_mask=True, return_tensors="pt")
    mask = batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()
    return TokenizedPairs(batch["input_ids"].long(), mask, torch.tensor(scores, dtype=torch.float32), str(path))


def mean_pool_ids(embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the word vectors of the real tokens of each row; ``embed`` is called once, on the unique
    ids of the batch. A row without real tokens pools to zeros."""
    rows, cols = mask.nonzero(as_tuple=True)
    unique_ids, inverse = torch.unique(ids[rows, cols], return_inverse=True)
    vectors = embed(unique_ids)
    pooled = vectors.new_zeros(ids.shape[0], vectors.shape[1]).index_add_(0, rows, vectors[inverse])
    return pooled / mask.sum(1, keepdim=True).clamp_min(1).to(pooled.dtype)

# ---------------------------------------------------------------------------------------------
# arms: where a training run gets its word vectors
# ---------------------------------------------------------------------------------------------
class Arm(nn.Module):
    """Word vectors for a training run: ``embed(unique_ids)``, a snapshot/restore of the trainable
    state (for keeping the best epoch), and the final V x d table."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def restore(self, state: dict) -> None:
        self.load_state_dict(state)

    def final_table(self) -> torch.Tensor:
        raise NotImplementedError


class DistilledArm(Arm):
    def __init__(self, distiller: EncodingDistiller):
        super().__init__()
        self.distiller = distiller

    def embed(self, ids):
        return self.distiller(ids)

    def final_table(self):
        return self.distiller.precompute()


class DirectArm(Arm):
    """A trainable copy of the rows of ``train_ids`` (see the module docstring: the same as training
    the whole table under Adam without weight decay); other rows are read from the frozen init."""

    def __init__(self, direct: DirectEmbedding, train_ids: torch.Tensor):
        super().__init__()
        self.direct = direct
        self.direct.embedding.weight.requires_grad_(False)
        weight = direct.embedding.weight
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[train_ids] = torch.arange(train_ids.numel(), device=weight.device)
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("train_ids", train_ids.clone(), persistent=False)
        self.rows = nn.Parameter(weight.detach()[train_ids].clone())

    def snapshot(self):
        return {"rows": self.rows.detach().clone()}

    def restore(self, state):
        with torch.no_grad():
            self.rows.copy_(state["rows"])

    def embed(self, ids):
        slot = self.slot[ids]
        known = slot >= 0
        if bool(known.all()):
            return self.rows[slot]
        out = self.direct.embedding.weight[ids].clone()
        out[known] = self.rows[slot[known]]
        return out

    def final_table(self):
        with torch.no_grad():
            self.direct.embedding.weight[self.train_ids] = self.rows.detach()
        return self.direct.table()


class FrozenArm(Arm):
    """The big table itself, frozen: trains only the task network (the soft-target teacher)."""

    def __init__(self, big_table: torch.Tensor):
        super().__init__()
        self.register_buffer("big_table", big_table.detach().to(torch.float32), persistent=False)

    def embed(self, ids):
        return self.big_table[ids]

    def final_table(self):
        return self.big_table


def pair_cosines(arm: Arm, head: TaskHead, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosines of the pairs stacked as rows [side 1; side 2] of ``ids``."""
    z = head(mean_pool_ids(arm.embed, ids, mask))
    n = ids.shape[0] // 2
    return F.cosine_similarity(z[:n], z[n:], dim=1)


@torch.no_grad()
def split_cosines(arm: Arm, head: TaskHead, split: TokenizedPairs) -> torch.Tensor:
    return pair_cosines(arm, head, split.ids, split.mask)


def spearman100(cosines: torch.Tensor, gold: torch.Tensor) -> float:
    """Spearman ×100 of the cosines against the gold scores (NaN when either side is constant)."""
    # an untrained or collapsed arm can give constant cosines: NaN is the answer (the epoch is not
    # chosen), scipy's warning about it would only repeat that once per epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(100.0 * spearmanr(cosines.double().cpu().numpy(), gold.double().cpu().numpy())[0])


def evaluate_small_table(folder: PathLike, path: PathLike) -> float:
    """STS Spearman x100 of an exported folder on an STS-B file, from the folder alone (its tokenizer,
    table and, when saved, task network; without one, the cosine of the mean-pooled word vectors)."""
    table, meta = load_small_table(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    split = tokenize_pairs(tokenizer, path, int(meta.get("max_length", 128)))
    head_file = Path(os.path.expanduser(str(folder))) / TASK_HEAD_FILE
    if head_file.is_file():
        state = load_file(str(head_file))
        head = TaskHead(table.shape[1], state["proj.weight"].shape[0], meta.get("task_activation", "tanh"))
        head.load_state_dict(state)
    else:
        head = None
    with torch.no_grad():
        pooled = mean_pool_ids(lambda ids: table[ids], split.ids, split.mask)
        z = head(pooled) if head is not None else pooled
        n = len(split)
        return spearman100(F.cosine_similarity(z[:n], z[n:], dim=1), split.gold)
