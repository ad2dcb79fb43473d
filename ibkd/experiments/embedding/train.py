"""Training a small word-embedding table on STS-B (the task of the experiment, offline here).

:func:`train_sts_embedding`: each sentence is the mean of its word vectors over real tokens
([CLS]/[SEP]/[PAD] masked with the tokenizer's special-token mask), a shared task network
``act(Linear(d, task_hidden))`` maps it, the cosine of the two sides is regressed on gold/5 with MSE
(optionally plus ``teacher_weight`` x MSE to the cosine of the same task network trained on the frozen big
table). The epoch is selected by dev Spearman (x100); test is scored once, for the selected epoch, and
never used for any choice. :func:`select_learning_rate` does that for every learning rate of a grid and
keeps the best on dev.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...distill.embedding_table import (EmbeddingConfigError, EncodingDistiller, activation_fn, check_positive_int,
                                        check_table)
from .model import (Arm, DirectArm, DirectEmbedding, DistilledArm, FrozenArm, PathLike, TaskHead, TokenizedPairs,
                    pair_cosines, spearman100, split_cosines, tokenize_pairs)

METHODS = ("distilled", "direct")
DEFAULT_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)


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
            check_positive_int(getattr(self, name), name)
        if check_positive_int(self.batch_size, "batch_size") < 2:
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
            check_positive_int(self.num_threads, "num_threads")
        resolve_device(self.device)
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "EmbeddingTaskConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise EmbeddingConfigError(f"unknown EmbeddingTaskConfig field(s): {', '.join(unknown)}")
        return cls(**values).validate()


def resolve_device(device: str) -> torch.device:
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



@dataclass
class Prepared:
    train: TokenizedPairs
    dev: TokenizedPairs
    test: TokenizedPairs
    train_ids: torch.Tensor  # unique ids of the real tokens of the training data


def prepare(tokenizer, train_path, dev_path, test_path, max_length: int, device) -> Prepared:
    splits = [tokenize_pairs(tokenizer, p, max_length, argument=a).to(device)
              for p, a in ((train_path, "train_path"), (dev_path, "dev_path"), (test_path, "test_path"))]
    train = splits[0]
    return Prepared(*splits, train_ids=torch.unique(train.ids[train.mask]))


def _batches(ids, mask, index):
    n = ids.shape[0] // 2
    rows = torch.cat([index, index + n])
    return ids[rows], mask[rows]


def _fit(arm: Arm, head: TaskHead, data: Prepared, cfg: EmbeddingTaskConfig,
         teacher_cosines: Optional[torch.Tensor] = None) -> dict:
    """Adam on arm + head; dev Spearman after every epoch; restores the best epoch (ties: the earliest).
    Test is never looked at here."""
    params = [p for p in list(arm.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    order_rng = torch.Generator().manual_seed(int(cfg.seed))
    train = data.train
    n = len(train)
    target = train.gold / 5.0
    init_dev = spearman100(split_cosines(arm, head, data.dev), data.dev.gold)
    best = (-math.inf, 0, arm.snapshot(), copy.deepcopy(head.state_dict()))
    curve, losses = [], []
    for epoch in range(1, cfg.epochs + 1):
        arm.train()
        head.train()
        permutation = torch.randperm(n, generator=order_rng).to(train.ids.device)
        total, count = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            index = permutation[start:start + cfg.batch_size]
            if index.numel() < 2:  # a 1-pair tail batch (n = 1 mod batch_size) adds noise and nothing else
                continue
            ids, mask = _batches(train.ids, train.mask, index)
            cosines = pair_cosines(arm, head, ids, mask)
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
        dev = spearman100(split_cosines(arm, head, data.dev), data.dev.gold)
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


def _seeded_head_and_arm(cfg: EmbeddingTaskConfig, big_table: torch.Tensor, data: Prepared, method: str):
    """Task network and arm from ``cfg.seed``: the head is drawn first, so every arm of a seed starts from
    the same task network. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        d_in = cfg.d_small if method in METHODS else big_table.shape[1]
        head = TaskHead(d_in, cfg.task_hidden, cfg.task_activation)
        if method == "distilled":
            arm: Arm = DistilledArm(EncodingDistiller(big_table, cfg.d_small, cfg.activation))
        elif method == "direct":
            arm = DirectArm(DirectEmbedding(big_table.shape[0], cfg.d_small, cfg.direct_init_std), data.train_ids)
        else:
            arm = FrozenArm(big_table)
    device = data.train.ids.device
    return head.to(device), arm.to(device)


def train_frozen_teacher(big_table: torch.Tensor, data: Prepared, cfg: EmbeddingTaskConfig) -> dict:
    """The same task network on the frozen big table; returns its scores and its cosines on train."""
    head, arm = _seeded_head_and_arm(cfg, big_table, data, "frozen")
    start = time.perf_counter()
    with _torch_threads(cfg.num_threads):
        fit = _fit(arm, head, data, cfg)
        with torch.no_grad():
            train_cos = split_cosines(arm, head, data.train)
            test = spearman100(split_cosines(arm, head, data.test), data.test.gold)
    return {**fit, "test_spearman": test, "train_cosines": train_cos, "lr": cfg.lr,
            "train_seconds": time.perf_counter() - start}


def train_prepared(big_table: torch.Tensor, data: Prepared, cfg: EmbeddingTaskConfig,
                    teacher_cosines: Optional[torch.Tensor] = None) -> dict:
    cfg.validate()
    if teacher_cosines is None and cfg.teacher_weight > 0:
        teacher_cosines = train_frozen_teacher(big_table, data, cfg)["train_cosines"]
    head, arm = _seeded_head_and_arm(cfg, big_table, data, cfg.method)
    start = time.perf_counter()
    with _torch_threads(cfg.num_threads):
        fit = _fit(arm, head, data, cfg, teacher_cosines)
        train_seconds = time.perf_counter() - start
        with torch.no_grad():
            test = spearman100(split_cosines(arm, head, data.test), data.test.gold)
        table = arm.final_table().detach().cpu()
    return {"method": cfg.method, "d_small": cfg.d_small, "seed": int(cfg.seed), "lr": float(cfg.lr),
            "dev_spearman": fit["dev_spearman"], "test_spearman": test, "best_epoch": fit["best_epoch"],
            "train_seconds": train_seconds, "table": table,
            "task_head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
            "init_dev_spearman": fit["init_dev_spearman"], "dev_curve": fit["dev_curve"],
            "train_loss": fit["train_loss"], "activation": cfg.activation, "task_activation": cfg.task_activation,
            "teacher_weight": float(cfg.teacher_weight)}


def _check_big_table(big_table, tokenizer) -> torch.Tensor:
    return check_table(big_table, "big_table", tokenizer).detach().float()


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
    device = resolve_device(cfg.device)
    data = prepare(tokenizer, train_path, dev_path, test_path, cfg.max_length, device)
    return train_prepared(big_table.to(device), data, cfg)


def select_lr_prepared(big_table, data: Prepared, cfg: EmbeddingTaskConfig, lr_grid: Sequence[float],
               teacher_cosines=None) -> dict:
    """Train once per learning rate of ``lr_grid``; keep the run with the best dev Spearman."""
    best, dev_by_lr = None, {}
    for lr in lr_grid:
        result = train_prepared(big_table, data, dataclasses.replace(cfg, lr=float(lr)), teacher_cosines)
        dev_by_lr[repr(float(lr))] = result["dev_spearman"]
        if best is None or (math.isfinite(result["dev_spearman"]) and
                            not result["dev_spearman"] <= best["dev_spearman"]):
            best = result
    best["dev_by_lr"] = dev_by_lr
    return best


def check_lr_grid(lr_grid) -> tuple:
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
    grid = check_lr_grid(lr_grid)
    big_table = _check_big_table(big_table, tokenizer)
    device = resolve_device(cfg.device)
    data = prepare(tokenizer, train_path, dev_path, test_path, cfg.max_length, device)
    return select_lr_prepared(big_table.to(device), data, cfg, grid)
