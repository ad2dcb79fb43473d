"""Data-parallel support of the objectives: every rank's rows as negatives, and loss parameters that stay
identical on every rank.

The scheme (used by :class:`~ibkd.losses.IBKDLoss` and :class:`~ibkd.losses.SupervisedIBKDLoss` when
``gather_across_devices`` is on): each rank all-gathers the rows of every rank and computes the *same*
loss over the global batch. InfoNCE then sees every rank's teacher rows as negatives, and HSIC, which
does not decompose over rows, is estimated on the global batch exactly as a single process would.
The backward of the gather hands each rank the gradient of its own rows multiplied by the world size,
because data-parallel training (DDP, the Hugging Face and sentence-transformers trainers) *averages*
the encoder gradients over ranks: the average of the ranks' shares times the world size is the sum of
the shares, i.e. the gradient of the single-process run on the concatenated batch.

The loss's own parameters (the projection P) live outside the DDP-wrapped model, so nothing would
keep them in step: they are broadcast from rank 0 on first use, and their gradients are averaged over
ranks by a hook (they are equal already up to rounding, since every rank computes the same loss).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside of distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_gather(gather_across_devices: Optional[bool]) -> bool:
    """``None`` means: gather when a process group with more than one rank is running."""
    if gather_across_devices is None:
        return world()[1] > 1
    return bool(gather_across_devices) and world()[1] > 1


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different row counts); backward: this rank's rows of the
    incoming gradient, times the world size (see the module docstring)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        counts = torch.tensor([local.shape[0]], device=local.device)
        all_counts = [torch.zeros_like(counts) for _ in range(size)]
        dist.all_gather(all_counts, counts)
        rows = [int(c) for c in all_counts]
        longest = max(rows)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous())
        ctx.rank, ctx.rows, ctx.size = rank, rows, size
        return torch.cat([part[:n] for part, n in zip(parts, rows)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = sum(ctx.rows[: ctx.rank])
        return grad[start:start + ctx.rows[ctx.rank]] * ctx.size


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``local``, concatenated in rank order; differentiable when ``local`` requires
    grad (the gradient of this rank's rows comes back scaled for data-parallel averaging)."""
    if world()[1] == 1:
        return local
    if local.requires_grad:
        return _GatherRows.apply(local)
    with torch.no_grad():
        return _GatherRows.apply(local)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``values`` (a new tensor; gloo has no AVG)."""
    if world()[1] == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world()[1]


class ReplicatedParameters:
    """Keeps an ``nn.Module``'s own parameters identical on every rank: broadcast from rank 0 on the first
    distributed call, gradients averaged over ranks as they are computed.

    The averaging hook runs inside backward; every rank runs the same graph in the same order, so the
    collectives match across ranks."""

    def __init__(self) -> None:
        self._synced_for: Optional[int] = None

    def ensure(self, module: nn.Module, skip: tuple = ()) -> None:
        rank, size = world()
        if size == 1:
            return
        key = id(dist.group.WORLD)
        if self._synced_for == key:
            return
        skipped = {id(p) for m in skip for p in m.parameters()} | {id(b) for m in skip for b in m.buffers()}
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                if id(tensor) not in skipped:
                    dist.broadcast(tensor.data, src=0)
        for param in module.parameters():
            if param.requires_grad and id(param) not in skipped:
                param.register_hook(_average_gradient)
        self._synced_for = key


def _average_gradient(grad: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return grad
    return all_reduce_mean(grad)
