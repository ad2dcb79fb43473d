"""Embedding distillation by encoding (Mou et al., "Distilling Word Embeddings: An Encoding Approach",
CIKM 2016, arXiv 1506.04488).

In a small transformer student the word-embedding table dominates the size (all-MiniLM-L6-v2:
30,522 x 384 ≈ 11.7M of 22.7M parameters). Mou et al. shrink a big table E (V x d_big) through a learned
non-linear *encoding layer*::

    e_small(w) = f(E[w] @ W + b)        W: d_big x d_small, f = tanh by default

trained end to end with a task network on task labels. Afterwards the small table f(E W + b) (V x d_small)
is precomputed and E and the encoder are discarded: inference only needs the small table. Their baseline
is a small table of the same size trained directly from random initialisation with the same task
network, data and budget.

* :class:`EncodingDistiller` — the encoder over a frozen E (a non-persistent buffer, never a parameter);
  :meth:`EncodingDistiller.precompute` writes the small table chunk by chunk.
* :class:`DirectEmbedding` — the paper's baseline: ``nn.Embedding(V, d_small)`` from N(0, 1/d_small), so
  its rows start at norm ≈ 1 like the rows of the teacher's table (MiniLM: mean row norm 1.07), without
  copying anything from E. (A dev-only check at d_small = 64, best of the learning-rate grid: this init
  scored 74.2 dev Spearman, N(0, 1) 72.9, N(0, 0.03²) 67.8; so the baseline is not handicapped by it.)
* :func:`train_sts_embedding` — the task offline here: STS-B regression. Each sentence is the mean of its
  word vectors over real tokens ([CLS]/[SEP]/[PAD] masked with the tokenizer's special-token mask), a
  shared task network ``act(Linear(d, task_hidden))`` maps it, the cosine of the two sides is regressed on
  gold/5 with MSE (optionally plus ``teacher_weight`` x MSE to the cosine of the same task network trained
  on the frozen big table). The epoch is selected by dev Spearman (x100); test is scored once, for the
  selected epoch, and never used for any choice.
* :func:`compare_embeddings` — distilled vs direct for several sizes and seeds. Both arms get the same
  budget (epochs, batch size, Adam, data order, task-network init); the learning rate is selected per
  arm and per run from one shared grid on dev Spearman.
* :func:`save_small_table` / :func:`load_small_table` — the exported folder: ``table.safetensors`` (key
  ``weight``, V x d_small), ``embedding_config.json`` and the tokenizer files (plus, optionally, the
  small task network in ``task_head.safetensors``, so the reported scores can be recomputed from the
  folder alone). Nothing of E or of the encoder.
* :func:`add_arguments` / :func:`run_cli` — ``ibkd compress-embeddings``.

Speed: training touches only the rows of the words in a batch. The distilled arm encodes the unique ids
of the batch (f(E[uniq] W + b)) and gathers; the direct arm keeps a trainable copy of the rows of the
words that occur in the training data only. That is exactly the full-table computation: under Adam
without weight decay a row whose gradient has always been zero never moves (its moments stay zero), so
the rows of words never seen in training keep their random initialisation either way.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._machine import cpu_name
from ..distill.data import DataError, read_stsb
from ..distill.evaluation import spearman

PathLike = Union[str, Path]

METHODS = ("distilled", "direct")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "identity": lambda x: x,
}
DEFAULT_SIZES = (32, 64, 128)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
TABLE_FILE = "table.safetensors"
TASK_HEAD_FILE = "task_head.safetensors"
CONFIG_FILE = "embedding_config.json"
STSB_FILES = {"train": "sts/stsbenchmark/sts-train.csv", "dev": "sts/stsbenchmark/sts-dev.csv",
              "test": "sts/stsbenchmark/sts-test.csv"}


class EmbeddingConfigError(ValueError):
    """A bad argument of the embedding distiller (the CLI reports it as one line)."""


def activation_fn(name: str, argument: str = "activation") -> Callable[[torch.Tensor], torch.Tensor]:
    """The non-linearity called ``name``; an error naming ``argument`` for an unknown one."""
    if name not in ACTIVATIONS:
        raise EmbeddingConfigError(f"{argument} must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def _check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise EmbeddingConfigError(f"{argument} must be a positive int, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# the two ways to get a small table
# ---------------------------------------------------------------------------------------------
class EncodingDistiller(nn.Module):
    """e_small = f(E[ids] @ W + b) over a frozen big table E (V x d_big).

    E is a non-persistent buffer: it is not a parameter (no optimizer sees it, it gets no gradient) and
    it is not in ``state_dict()``. W is Glorot-initialised (the initialisation made for tanh), b = 0.
    """

    def __init__(self, big_table: torch.Tensor, d_small: int, activation: str = "tanh"):
        super().__init__()
        if not isinstance(big_table, torch.Tensor) or big_table.ndim != 2 or 0 in big_table.shape:
            shape = tuple(big_table.shape) if isinstance(big_table, torch.Tensor) else type(big_table).__name__
            raise EmbeddingConfigError(f"big_table must be a non-empty (V, d_big) tensor, got {shape}")
        if not big_table.is_floating_point():
            raise EmbeddingConfigError(f"big_table must be floating point, got {big_table.dtype}")
        self.d_small = _check_positive_int(d_small, "d_small")
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
        chunk_rows = _check_positive_int(chunk_rows, "chunk_rows")
        out = torch.empty(self.vocab_size, self.d_small, dtype=torch.float32, device=self.big_table.device)
        for start in range(0, self.vocab_size, chunk_rows):
            rows = self.big_table[start:start + chunk_rows]
            out[start:start + rows.shape[0]] = self._act(self.encoder(rows)).float()
        return out

    def table(self) -> torch.Tensor:
        return self.precompute()


class DirectEmbedding(nn.Module):
    """The baseline: a small table trained directly, ``nn.Embedding(V, d_small)`` with entries drawn from
    N(0, init_std²); ``init_std`` defaults to 1/sqrt(d_small), so rows start at norm ≈ 1 (the scale of
    the rows of the teacher's table) whatever d_small is. Draws from the global RNG: seed it first."""

    def __init__(self, vocab_size: int, d_small: int, init_std: Optional[float] = None):
        super().__init__()
        vocab_size = _check_positive_int(vocab_size, "vocab_size")
        self.d_small = _check_positive_int(d_small, "d_small")
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
        self.proj = nn.Linear(_check_positive_int(d_in, "d_in"), _check_positive_int(hidden, "task_hidden"))

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
    max_length = _check_positive_int(max_length, "max_length")
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
# training
# ---------------------------------------------------------------------------------------------
@dataclass
class EmbeddingTaskConfig:
    """One training run on STS-B. ``method``: ``distilled`` (encoding of the big table) or ``direct``
    (random-init table). ``teacher_weight`` > 0 adds MSE to the cosines of the same task network trained
    on the frozen big table (soft targets). ``direct_init_std`` None = 1/sqrt(d_small). ``num_threads``:
    torch threads while training (None: leave as is); the default 1 because every op is small, and on
    a shared 2-core machine a second thread made an epoch ~10x slower (synchronisation, not compute)."""

    d_small: int = 64
    activation: str = "tanh"
    method: str = "distilled"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    task_hidden: int = 128
    task_activation: str = "tanh"
    teacher_weight: float = 0.0
    max_length: int = 128
    device: str = "cpu"
    direct_init_std: Optional[float] = None
    num_threads: Optional[int] = 1

    def validate(self) -> "EmbeddingTaskConfig":
        for name in ("d_small", "epochs", "task_hidden", "max_length"):
            _check_positive_int(getattr(self, name), name)
        if _check_positive_int(self.batch_size, "batch_size") < 2:
            raise EmbeddingConfigError(f"batch_size must be at least 2, got {self.batch_size}")
        if self.method not in METHODS:
            raise EmbeddingConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        activation_fn(self.activation, "activation")
        activation_fn(self.task_activation, "task_activation")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise EmbeddingConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.teacher_weight, (int, float)) and math.isfinite(self.teacher_weight)
                and self.teacher_weight >= 0):
            raise EmbeddingConfigError(f"teacher_weight must be a number >= 0, got {self.teacher_weight!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise EmbeddingConfigError(f"seed must be an int, got {self.seed!r}")
        if self.direct_init_std is not None and not self.direct_init_std > 0:
            raise EmbeddingConfigError(f"direct_init_std must be positive, got {self.direct_init_std!r}")
        if self.num_threads is not None:
            _check_positive_int(self.num_threads, "num_threads")
        _resolve_device(self.device)
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "EmbeddingTaskConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise EmbeddingConfigError(f"unknown EmbeddingTaskConfig field(s): {', '.join(unknown)}")
        return cls(**values).validate()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise EmbeddingConfigError(f"device must be cpu, cuda[:i] or auto, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EmbeddingConfigError(f"device {device!r}: CUDA is not available")
    return resolved


@contextmanager
def _torch_threads(count: Optional[int]):
    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


class _Arm(nn.Module):
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


class _DistilledArm(_Arm):
    def __init__(self, distiller: EncodingDistiller):
        super().__init__()
        self.distiller = distiller

    def embed(self, ids):
        return self.distiller(ids)

    def final_table(self):
        return self.distiller.precompute()


class _DirectArm(_Arm):
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


class _FrozenArm(_Arm):
    """The big table itself, frozen: trains only the task network (the soft-target teacher)."""

    def __init__(self, big_table: torch.Tensor):
        super().__init__()
        self.register_buffer("big_table", big_table.detach().to(torch.float32), persistent=False)

    def embed(self, ids):
        return self.big_table[ids]

    def final_table(self):
        return self.big_table


def _pair_cosines(arm: _Arm, head: TaskHead, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosines of the pairs stacked as rows [side 1; side 2] of ``ids``."""
    z = head(mean_pool_ids(arm.embed, ids, mask))
    n = ids.shape[0] // 2
    return F.cosine_similarity(z[:n], z[n:], dim=1)


@torch.no_grad()
def _split_cosines(arm: _Arm, head: TaskHead, split: TokenizedPairs) -> torch.Tensor:
    return _pair_cosines(arm, head, split.ids, split.mask)


def _spearman100(cosines: torch.Tensor, gold: torch.Tensor) -> float:
    value = 100.0 * spearman(cosines.double().cpu().numpy(), gold.double().cpu().numpy())
    return float(value)


@dataclass
class _Prepared:
    train: TokenizedPairs
    dev: TokenizedPairs
    test: TokenizedPairs
    train_ids: torch.Tensor  # unique ids of the real tokens of the training data


def _prepare(tokenizer, train_path, dev_path, test_path, max_length: int, device) -> _Prepared:
    splits = [tokenize_pairs(tokenizer, p, max_length, argument=a).to(device)
              for p, a in ((train_path, "train_path"), (dev_path, "dev_path"), (test_path, "test_path"))]
    train = splits[0]
    return _Prepared(*splits, train_ids=torch.unique(train.ids[train.mask]))


def _batches(ids, mask, index):
    n = ids.shape[0] // 2
    rows = torch.cat([index, index + n])
    return ids[rows], mask[rows]


def _fit(arm: _Arm, head: TaskHead, data: _Prepared, cfg: EmbeddingTaskConfig,
         teacher_cosines: Optional[torch.Tensor] = None) -> dict:
    """Adam on arm + head; dev Spearman after every epoch; restores the best epoch (ties: the earliest).
    Test is never looked at here."""
    params = [p for p in list(arm.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
    order_rng = torch.Generator().manual_seed(int(cfg.seed))
    train = data.train
    n = len(train)
    target = train.gold / 5.0
    init_dev = _spearman100(_split_cosines(arm, head, data.dev), data.dev.gold)
    best = (-math.inf, 0, arm.snapshot(), copy.deepcopy(head.state_dict()))
    curve, losses = [], []
    for epoch in range(1, cfg.num_train_epochs + 1):
        arm.train()
        head.train()
        permutation = torch.randperm(n, generator=order_rng).to(train.ids.device)
        total, count = 0.0, 0
        for start in range(0, n, cfg.per_device_train_batch_size):
            index = permutation[start:start + cfg.per_device_train_batch_size]
            if index.numel() < 2:  # a 1-pair tail batch (n = 1 mod batch_size) adds noise and nothing else
                continue
            ids, mask = _batches(train.ids, train.mask, index)
            cosines = _pair_cosines(arm, head, ids, mask)
            loss = F.mse_loss(cosines, target[index])
            if teacher_cosines is not None and cfg.teacher_weight > 0:
                loss = loss + cfg.teacher_weight * F.mse_loss(cosines, teacher_cosines[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * index.numel()
            count += index.numel()
        arm.eval()
        head.eval()
        dev = _spearman100(_split_cosines(arm, head, data.dev), data.dev.gold)
        curve.append(dev)
        losses.append(total / max(count, 1))
        if not math.isfinite(total):
            break
        if math.isfinite(dev) and dev > best[0]:
            best = (dev, epoch, arm.snapshot(), copy.deepcopy(head.state_dict()))
    arm.restore(best[2])
    head.load_state_dict(best[3])
    return {"dev_spearman": best[0] if best[1] else float("nan"), "best_epoch": best[1],
            "init_dev_spearman": init_dev, "dev_curve": curve, "train_loss": losses}


def _seeded_head_and_arm(cfg: EmbeddingTaskConfig, big_table: torch.Tensor, data: _Prepared, method: str):
    """Task network and arm from ``cfg.seed``: the head is drawn first, so every arm of a seed starts from
    the same task network. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        d_in = cfg.d_small if method in METHODS else big_table.shape[1]
        head = TaskHead(d_in, cfg.task_hidden, cfg.task_activation)
        if method == "distilled":
            arm: _Arm = _DistilledArm(EncodingDistiller(big_table, cfg.d_small, cfg.activation))
        elif method == "direct":
            arm = _DirectArm(DirectEmbedding(big_table.shape[0], cfg.d_small, cfg.direct_init_std), data.train_ids)
        else:
            arm = _FrozenArm(big_table)
    device = data.train.ids.device
    return head.to(device), arm.to(device)


def _train_frozen_teacher(big_table: torch.Tensor, data: _Prepared, cfg: EmbeddingTaskConfig) -> dict:
    """The same task network on the frozen big table; returns its scores and its cosines on train."""
    head, arm = _seeded_head_and_arm(cfg, big_table, data, "frozen")
    start = time.perf_counter()
    with _torch_threads(cfg.num_threads):
        fit = _fit(arm, head, data, cfg)
        with torch.no_grad():
            train_cos = _split_cosines(arm, head, data.train)
            test = _spearman100(_split_cosines(arm, head, data.test), data.test.gold)
    return {**fit, "test_spearman": test, "train_cosines": train_cos, "lr": cfg.learning_rate,
            "train_seconds": time.perf_counter() - start}


def _train_prepared(big_table: torch.Tensor, data: _Prepared, cfg: EmbeddingTaskConfig,
                    teacher_cosines: Optional[torch.Tensor] = None) -> dict:
    cfg.validate()
    if teacher_cosines is None and cfg.teacher_weight > 0:
        teacher_cosines = _train_frozen_teacher(big_table, data, cfg)["train_cosines"]
    head, arm = _seeded_head_and_arm(cfg, big_table, data, cfg.method)
    start = time.perf_counter()
    with _torch_threads(cfg.num_threads):
        fit = _fit(arm, head, data, cfg, teacher_cosines)
        train_seconds = time.perf_counter() - start
        with torch.no_grad():
            test = _spearman100(_split_cosines(arm, head, data.test), data.test.gold)
        table = arm.final_table().detach().cpu()
    return {"method": cfg.method, "d_small": cfg.d_small, "seed": int(cfg.seed), "lr": float(cfg.learning_rate),
            "dev_spearman": fit["dev_spearman"], "test_spearman": test, "best_epoch": fit["best_epoch"],
            "train_seconds": train_seconds, "table": table,
            "task_head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
            "init_dev_spearman": fit["init_dev_spearman"], "dev_curve": fit["dev_curve"],
            "train_loss": fit["train_loss"], "activation": cfg.activation, "task_activation": cfg.task_activation,
            "teacher_weight": float(cfg.teacher_weight)}


def _check_big_table(big_table, tokenizer) -> torch.Tensor:
    if not isinstance(big_table, torch.Tensor) or big_table.ndim != 2 or 0 in big_table.shape:
        shape = tuple(big_table.shape) if isinstance(big_table, torch.Tensor) else type(big_table).__name__
        raise EmbeddingConfigError(f"big_table must be a non-empty (V, d_big) tensor, got {shape}")
    if tokenizer is not None and len(tokenizer) > big_table.shape[0]:
        raise EmbeddingConfigError(f"big_table has {big_table.shape[0]} rows but the tokenizer has "
                                   f"{len(tokenizer)} tokens")
    return big_table.detach().float()


def train_sts_embedding(tokenizer, big_table: torch.Tensor, train_path: PathLike, dev_path: PathLike,
                        test_path: PathLike, cfg: EmbeddingTaskConfig) -> dict:
    """Train a small table (``cfg.method``: distilled or direct) with the siamese STS-B task network.

    Returns ``{method, d_small, seed, lr, dev_spearman, test_spearman, best_epoch, train_seconds, table,
    task_head, init_dev_spearman, dev_curve, train_loss, ...}``: Spearman x100 of the cosine vs gold, the
    epoch (1-based) chosen by dev, and the V x d_small table of that epoch (float32, CPU). Test is scored
    once, for the chosen epoch.
    """
    cfg.validate()
    big_table = _check_big_table(big_table, tokenizer)
    device = _resolve_device(cfg.device)
    data = _prepare(tokenizer, train_path, dev_path, test_path, cfg.max_length, device)
    return _train_prepared(big_table.to(device), data, cfg)


def _select_lr(big_table, data: _Prepared, cfg: EmbeddingTaskConfig, lr_grid: Sequence[float],
               teacher_cosines=None) -> dict:
    """Train once per learning rate of ``lr_grid``; keep the run with the best dev Spearman."""
    best, dev_by_lr = None, {}
    for lr in lr_grid:
        result = _train_prepared(big_table, data, dataclasses.replace(cfg, lr=float(lr)), teacher_cosines)
        dev_by_lr[repr(float(lr))] = result["dev_spearman"]
        if best is None or (math.isfinite(result["dev_spearman"]) and
                            not result["dev_spearman"] <= best["dev_spearman"]):
            best = result
    best["dev_by_lr"] = dev_by_lr
    return best


def _check_lr_grid(lr_grid) -> tuple:
    grid = tuple(lr_grid or ())
    if not grid or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in grid):
        raise EmbeddingConfigError(f"lr_grid must be a non-empty list of positive numbers, got {lr_grid!r}")
    return tuple(float(v) for v in grid)


def select_learning_rate(tokenizer, big_table: torch.Tensor, train_path: PathLike, dev_path: PathLike,
                         test_path: PathLike, cfg: EmbeddingTaskConfig,
                         lr_grid: Sequence[float] = DEFAULT_LR_GRID) -> dict:
    """:func:`train_sts_embedding` for every learning rate of ``lr_grid``; returns the result with the best
    dev Spearman (plus ``dev_by_lr``). Test plays no part in the choice."""
    cfg.validate()
    grid = _check_lr_grid(lr_grid)
    big_table = _check_big_table(big_table, tokenizer)
    device = _resolve_device(cfg.device)
    data = _prepare(tokenizer, train_path, dev_path, test_path, cfg.max_length, device)
    return _select_lr(big_table.to(device), data, cfg, grid)


# ---------------------------------------------------------------------------------------------
# the exported table
# ---------------------------------------------------------------------------------------------
def save_small_table(folder: PathLike, table: torch.Tensor, tokenizer, meta: dict,
                     task_head: Optional[dict] = None) -> Path:
    """Write ``table.safetensors`` (key ``weight``), ``embedding_config.json`` (``meta`` plus d_small and
    vocab_size) and the tokenizer files; with ``task_head`` (a TaskHead state dict) also
    ``task_head.safetensors``. Nothing of the big table or of the encoder goes in."""
    from safetensors.torch import save_file

    if not isinstance(table, torch.Tensor) or table.ndim != 2 or 0 in table.shape:
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise EmbeddingConfigError(f"table must be a non-empty (V, d_small) tensor, got {shape}")
    if tokenizer is not None and len(tokenizer) > table.shape[0]:
        raise EmbeddingConfigError(f"table has {table.shape[0]} rows but the tokenizer has {len(tokenizer)} tokens")
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
    config = {**_jsonable(meta), "d_small": int(table.shape[1]), "vocab_size": int(table.shape[0])}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_small_table(folder: PathLike) -> tuple[torch.Tensor, dict]:
    """``(table, meta)`` from a folder written by :func:`save_small_table`."""
    from safetensors.torch import load_file

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


def evaluate_small_table(folder: PathLike, path: PathLike) -> float:
    """STS Spearman x100 of an exported folder on an STS-B file, from the folder alone (its tokenizer,
    table and, when saved, task network; without one, the cosine of the mean-pooled word vectors)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

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
        return _spearman100(F.cosine_similarity(z[:n], z[n:], dim=1), split.gold)


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def load_teacher_table(teacher_spec: str):
    """``(tokenizer, word-embedding table (V x d_big, float32), name)`` of a teacher: a folder, a hub id or
    ``"default"`` (the offline all-MiniLM-L6-v2)."""
    from ..distill.models import Encoder

    encoder = Encoder.load(teacher_spec)
    table = encoder.model.get_input_embeddings().weight.detach().float().clone()
    return encoder.tokenizer, table, encoder.name


def stsb_paths(data_dir: Optional[PathLike] = None, train: Optional[PathLike] = None,
               dev: Optional[PathLike] = None, test: Optional[PathLike] = None) -> dict:
    """The STS-B train/dev/test files: explicit paths win, else ``<data_dir>/sts/stsbenchmark/``
    (``data_dir`` defaults to ``../shared/data`` next to the repository). Missing files are an error
    naming the argument."""
    from ..distill.trainer import DEFAULT_DATA_DIR

    root = Path(os.path.expanduser(str(data_dir))) if data_dir else DEFAULT_DATA_DIR
    paths = {}
    for split, given in (("train", train), ("dev", dev), ("test", test)):
        path = Path(os.path.expanduser(str(given))) if given else root / STSB_FILES[split]
        if not path.is_file():
            argument = f"--{split}" if given else "--data-dir"
            raise FileNotFoundError(f"{argument}: STS-B {split} file not found: {path}")
        paths[split] = str(path)
    return paths


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def compare_embeddings(teacher_spec: str = "default", sizes: Sequence[int] = DEFAULT_SIZES,
                       seeds: Sequence[int] = DEFAULT_SEEDS, data_dir: Optional[PathLike] = None, *,
                       methods: Sequence[str] = METHODS, lr_grid: Sequence[float] = DEFAULT_LR_GRID,
                       train_path: Optional[PathLike] = None, dev_path: Optional[PathLike] = None,
                       test_path: Optional[PathLike] = None, reference: bool = True,
                       progress: Optional[Callable[[str], None]] = None, **cfg_overrides) -> dict:
    """Distilled vs directly trained small tables on STS-B, for every size x method x seed.

    Every run gets the same budget (``cfg_overrides`` over :class:`EmbeddingTaskConfig`); its learning
    rate is chosen from the shared ``lr_grid`` by dev Spearman, separately per arm, size and seed. With
    ``reference``, the same task network on the frozen big table (d_big) is reported per seed, plus the
    untrained cosine of the mean-pooled big-table vectors. Returns ``{"rows", "summary", "reference",
    "settings", "environment", "wall_seconds"}``; no tables (they are not kept).
    """
    start = time.perf_counter()
    sizes = [_check_positive_int(s, "sizes") for s in sizes]
    seeds = [int(s) for s in seeds]
    if not sizes or not seeds:
        raise EmbeddingConfigError("sizes and seeds must each name at least one value")
    methods = list(methods)
    for method in methods:
        if method not in METHODS:
            raise EmbeddingConfigError(f"methods must be among {', '.join(METHODS)}, got {method!r}")
    grid = _check_lr_grid(lr_grid)
    base = EmbeddingTaskConfig.from_dict({**cfg_overrides, "d_small": sizes[0]})
    say = progress or (lambda message: None)
    paths = stsb_paths(data_dir, train_path, dev_path, test_path)
    tokenizer, big_table, teacher_name = load_teacher_table(teacher_spec)
    device = _resolve_device(base.device)
    data = _prepare(tokenizer, paths["train"], paths["dev"], paths["test"], base.max_length, device)
    big_table = big_table.to(device)

    teachers: dict[int, dict] = {}

    def teacher_for(seed: int) -> dict:
        if seed not in teachers:
            best = None
            for lr in grid:
                run = _train_frozen_teacher(big_table, data, dataclasses.replace(base, seed=seed, lr=lr,
                                                                                 teacher_weight=0.0))
                if best is None or (math.isfinite(run["dev_spearman"]) and run["dev_spearman"] > best["dev_spearman"]):
                    best = run
            teachers[seed] = best
            say(f"frozen big table (d={big_table.shape[1]}) seed {seed}: dev {best['dev_spearman']:.2f} "
                f"test {best['test_spearman']:.2f} (lr {best['lr']:g})")
        return teachers[seed]

    rows = []
    for size in sizes:
        for method in methods:
            for seed in seeds:
                cfg = dataclasses.replace(base, d_small=size, method=method, seed=seed)
                soft = teacher_for(seed)["train_cosines"] if cfg.teacher_weight > 0 else None
                result = _select_lr(big_table, data, cfg, grid, soft)
                row = {k: result[k] for k in ("method", "d_small", "seed", "lr", "dev_spearman", "test_spearman",
                                              "best_epoch", "train_seconds", "init_dev_spearman", "dev_by_lr")}
                row["table_parameters"] = int(result["table"].numel())
                rows.append(row)
                say(f"d={size} {method} seed {seed}: dev {row['dev_spearman']:.2f} test {row['test_spearman']:.2f} "
                    f"(lr {row['lr']:g}, epoch {row['best_epoch']})")

    summary = []
    for size in sizes:
        for method in methods:
            mine = [r for r in rows if r["d_small"] == size and r["method"] == method]
            test_mean, test_std = _mean_std([r["test_spearman"] for r in mine])
            dev_mean, dev_std = _mean_std([r["dev_spearman"] for r in mine])
            summary.append({"d_small": size, "method": method, "n": len(mine), "test_mean": test_mean,
                            "test_std": test_std, "dev_mean": dev_mean, "dev_std": dev_std,
                            "table_parameters": mine[0]["table_parameters"] if mine else None})
        if set(METHODS) <= set(methods):
            by_seed = {(r["method"], r["seed"]): r["test_spearman"] for r in rows if r["d_small"] == size}
            deltas = [by_seed[("distilled", s)] - by_seed[("direct", s)] for s in seeds]
            mean, std = _mean_std(deltas)
            summary.append({"d_small": size, "method": "distilled-direct", "n": len(deltas), "test_mean": mean,
                            "test_std": std})

    reference_block = None
    if reference:
        frozen = [teacher_for(seed) for seed in seeds]
        with torch.no_grad():
            raw = mean_pool_ids(lambda ids: big_table[ids], data.test.ids, data.test.mask)
            n = len(data.test)
            untrained = _spearman100(F.cosine_similarity(raw[:n], raw[n:], dim=1), data.test.gold)
        test_mean, test_std = _mean_std([t["test_spearman"] for t in frozen])
        dev_mean, dev_std = _mean_std([t["dev_spearman"] for t in frozen])
        reference_block = {
            "d_big": int(big_table.shape[1]), "table_parameters": int(big_table.numel()),
            "frozen_big_table": {"test_mean": test_mean, "test_std": test_std, "dev_mean": dev_mean,
                                 "dev_std": dev_std, "lr": [t["lr"] for t in frozen],
                                 "best_epoch": [t["best_epoch"] for t in frozen]},
            "untrained_mean_pooled_test": untrained,
        }

    return _jsonable({
        "rows": rows, "summary": summary, "reference": reference_block,
        "settings": {"teacher": teacher_name, "vocab_size": int(big_table.shape[0]), "d_big": int(big_table.shape[1]),
                     "sizes": sizes, "seeds": seeds, "methods": methods, "lr_grid": list(grid),
                     **{k: v for k, v in dataclasses.asdict(base).items() if k not in ("d_small", "method", "seed", "lr")},
                     "train": paths["train"], "dev": paths["dev"], "test": paths["test"],
                     "train_pairs": len(data.train), "dev_pairs": len(data.dev), "test_pairs": len(data.test),
                     "train_vocabulary": int(data.train_ids.numel()),
                     "selection": "epoch and learning rate (per run, from lr_grid) by STS-B dev Spearman; "
                                  "test scored once per run for the selected epoch",
                     "direct_init": "N(0, init_std^2), init_std = direct_init_std or 1/sqrt(d_small)"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
                        "threads": torch.get_num_threads(), "device": str(device)},
        "wall_seconds": time.perf_counter() - start,
    })


def _fmt(mean, std) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if std is not None and math.isfinite(std) else f"{mean:.2f}"


def render_markdown(report: dict) -> str:
    """The comparison as a Markdown table (STS-B test Spearman x100, mean ± std over seeds)."""
    summary = {(s["d_small"], s["method"]): s for s in report["summary"]}
    settings = report.get("settings", {})
    sizes = settings.get("sizes") or sorted({s["d_small"] for s in report["summary"]})
    lines = ["| d_small | table params | distilled (test) | direct (test) | distilled − direct | distilled (dev) | direct (dev) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        dist, direct, delta = (summary.get((size, m), {}) for m in ("distilled", "direct", "distilled-direct"))
        params = dist.get("table_parameters") or direct.get("table_parameters")
        lines.append(f"| {size} | {params / 1e6:.2f}M |" if params else f"| {size} | n/a |")
        lines[-1] += " | ".join([
            f" {_fmt(dist.get('test_mean'), dist.get('test_std'))}", _fmt(direct.get("test_mean"), direct.get("test_std")),
            _fmt(delta.get("test_mean"), delta.get("test_std")), _fmt(dist.get("dev_mean"), dist.get("dev_std")),
            _fmt(direct.get("dev_mean"), direct.get("dev_std")) + " |"])
    ref = report.get("reference")
    if ref:
        frozen = ref["frozen_big_table"]
        lines.append(f"| {ref['d_big']} (frozen big table) | {ref['table_parameters'] / 1e6:.2f}M | "
                     f"{_fmt(frozen['test_mean'], frozen['test_std'])} | | | {_fmt(frozen['dev_mean'], frozen['dev_std'])} | |")
    seeds = settings.get("seeds", [])
    notes = [f"STS-B test Spearman x100, mean ± std over {len(seeds)} seed(s); "
             f"teacher {settings.get('teacher', '?')}, task network Linear(d, {settings.get('task_hidden', '?')}) + "
             f"{settings.get('task_activation', '?')}, cosine vs gold/5 (MSE), {settings.get('epochs', '?')} epochs, "
             f"batch {settings.get('batch_size', '?')}, Adam; encoder f = {settings.get('activation', '?')}; "
             f"learning rate per run from {settings.get('lr_grid', '?')} and epoch chosen on dev."]
    if ref:
        notes.append(f"Untrained mean-pooled big-table cosine: {ref['untrained_mean_pooled_test']:.2f} (test).")
    if "wall_seconds" in report:
        env = report.get("environment", {})
        notes.append(f"Wall time {report['wall_seconds']:.0f} s on {env.get('cpu', '?')} "
                     f"({settings.get('num_threads') or env.get('threads', '?')} training thread(s)), "
                     f"torch {env.get('torch', '?')}.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


# ---------------------------------------------------------------------------------------------
# command line: ibkd compress-embeddings
# ---------------------------------------------------------------------------------------------
def _comma_list(convert: Callable, kind: str, example: str) -> Callable[[str], list]:
    """An argparse type for comma-separated values of one kind (at least one)."""

    def parse(text: str) -> list:
        try:
            values = [convert(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}s like {example}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {kind}, got {text!r}")
        return values

    return parse


_int_list = _comma_list(int, "int", "32,64,128")
_float_list = _comma_list(float, "number", "1e-3,3e-3")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``ibkd compress-embeddings``."""
    parser.add_argument("--teacher", default="default", help="teacher whose word-embedding table is distilled "
                        "(folder, hub id, or 'default' = the offline all-MiniLM-L6-v2)")
    parser.add_argument("--dim", type=int, default=None, help="d_small of a single run")
    parser.add_argument("--method", default="distilled", help="distilled (encoding of the big table) or direct (baseline)")
    parser.add_argument("--activation", default="tanh", help=f"encoder non-linearity f: {', '.join(ACTIVATIONS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="folder for the small table (single run)")
    parser.add_argument("--data-dir", default=None, help="folder holding sts/stsbenchmark/ (default ../shared/data)")
    parser.add_argument("--train", default=None, help="STS-B train file (overrides --data-dir)")
    parser.add_argument("--dev", default=None, help="STS-B dev file (overrides --data-dir)")
    parser.add_argument("--test", default=None, help="STS-B test file (overrides --data-dir)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="fixed learning rate (default: choose from --lr-grid on dev)")
    parser.add_argument("--lr-grid", type=_float_list, default=list(DEFAULT_LR_GRID))
    parser.add_argument("--task-hidden", type=int, default=None)
    parser.add_argument("--task-activation", default=None)
    parser.add_argument("--teacher-weight", type=float, default=None, help="weight of the soft-target term (default 0)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads while training (default 1)")
    parser.add_argument("--compare", action="store_true", help="distilled vs direct for --sizes x --seeds")
    parser.add_argument("--sizes", type=_int_list, default=list(DEFAULT_SIZES))
    parser.add_argument("--seeds", type=_int_list, default=list(DEFAULT_SEEDS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--report", default=None, help="JSON file for the comparison")
    return parser


_CLI_FIELDS = {"epochs": "epochs", "batch_size": "batch_size", "task_hidden": "task_hidden",
               "task_activation": "task_activation", "teacher_weight": "teacher_weight", "max_length": "max_length",
               "device": "device", "num_threads": "num_threads"}


def _cli_overrides(args) -> dict:
    values = {field: getattr(args, flag) for flag, field in _CLI_FIELDS.items() if getattr(args, flag, None) is not None}
    values["activation"] = args.activation
    return values


def _run(args) -> int:
    activation_fn(args.activation, "--activation")
    if args.compare:
        methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
        for size in args.sizes:
            _check_positive_int(size, "--sizes")
        grid = [args.lr] if args.lr is not None else args.lr_grid
        report = compare_embeddings(args.teacher, args.sizes, args.seeds, args.data_dir, methods=methods, lr_grid=grid,
                                    train_path=args.train, dev_path=args.dev, test_path=args.test,
                                    progress=lambda m: print(m, file=sys.stderr, flush=True), **_cli_overrides(args))
        if args.report:
            report_path = Path(args.report)
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(report, indent=1) + "\n")
        print(render_markdown(report), end="")
        if args.report:
            print(f"report written to {args.report}")
        return 0
    if args.dim is None:
        raise EmbeddingConfigError("--dim is required for a single run (or use --compare)")
    _check_positive_int(args.dim, "--dim")
    if not args.output:
        raise EmbeddingConfigError("--output is required for a single run (the folder for the small table)")
    if args.method not in METHODS:
        raise EmbeddingConfigError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    paths = stsb_paths(args.data_dir, args.train, args.dev, args.test)
    cfg = EmbeddingTaskConfig.from_dict({**_cli_overrides(args), "d_small": args.dim, "method": args.method,
                                         "seed": args.seed, **({"lr": args.lr} if args.lr is not None else {})})
    tokenizer, big_table, teacher_name = load_teacher_table(args.teacher)
    if args.lr is not None:
        result = train_sts_embedding(tokenizer, big_table, paths["train"], paths["dev"], paths["test"], cfg)
    else:
        result = select_learning_rate(tokenizer, big_table, paths["train"], paths["dev"], paths["test"], cfg,
                                      args.lr_grid)
    meta = {"d_small": cfg.d_small, "activation": cfg.activation, "method": cfg.method, "teacher": teacher_name,
            "vocab_size": int(result["table"].shape[0]), "dev_spearman": result["dev_spearman"],
            "test_spearman": result["test_spearman"], "best_epoch": result["best_epoch"], "lr": result["lr"],
            "seed": cfg.seed, "epochs": cfg.num_train_epochs, "batch_size": cfg.per_device_train_batch_size, "task_hidden": cfg.task_hidden,
            "task_activation": cfg.task_activation, "teacher_weight": cfg.teacher_weight,
            "max_length": cfg.max_length, "dev_by_lr": result.get("dev_by_lr"),
            "data": {"train": paths["train"], "dev": paths["dev"], "test": paths["test"]}}
    save_small_table(args.output, result["table"], tokenizer, meta, task_head=result["task_head"])
    print(f"{cfg.method} table {tuple(result['table'].shape)} (lr {result['lr']:g}, epoch {result['best_epoch']}) "
          f"saved to {args.output}")
    print(f"STS-B dev Spearman x100: {result['dev_spearman']:.2f}")
    print(f"STS-B test Spearman x100: {result['test_spearman']:.2f}")
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """``ibkd compress-embeddings``: bad input is one line on stderr and exit code 2."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as exc:  # EmbeddingConfigError, DataError and the readers' errors
        print(f"ibkd: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ibkd compress-embeddings",
                                     description="Distill the teacher's word-embedding table into a small one "
                                                 "(Mou et al. 2016), or compare with a directly trained table.")
    add_arguments(parser)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
