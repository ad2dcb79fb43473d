"""GradCache variants of the IBKD sentence-transformers losses: any batch size in the memory of one
mini-batch."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .features import batch_rows, take_rows
from .losses import IBKDDistillationLoss, IBKDSupervisedLoss, _unwrap

__all__ = ["CachedIBKDDistillationLoss", "CachedIBKDSupervisedLoss"]


# ---------------------------------------------------------------------------------------------
# GradCache variants
# ---------------------------------------------------------------------------------------------
class _RngSnapshot:
    """The RNG state before a chunk's first (no-grad) pass, replayed for its second pass so that dropout
    draws the same masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _GradCacheMixin:
    """GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
    Setup", https://arxiv.org/abs/2101.06983): embed the batch in mini-batches without a graph, compute the
    objective on the (detached) embeddings, and when the trainer backpropagates, re-embed each mini-batch
    with a graph and push the cached embedding gradients through it. Memory is that of one mini-batch of
    the encoder plus the embeddings; gradients equal the uncached loss's (up to float rounding)."""

    mini_batch_size: int

    def _set_mini_batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"mini_batch_size must be a positive int, got {value!r}")
        self.mini_batch_size = value
        self._config["mini_batch_size"] = value

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> dict[str, Tensor]:
        features = list(sentence_features)
        self._check_inputs(features, labels)
        chunks, snapshots, embedded = [], [], []
        with torch.no_grad():
            for i, column in enumerate(features):
                rows = batch_rows(column)
                parts, col_chunks, col_snaps = [], [], []
                for start in range(0, rows, self.mini_batch_size):
                    chunk = take_rows(column, slice(start, start + self.mini_batch_size), total=rows)
                    col_snaps.append(_RngSnapshot(_unwrap_device(self.model)))
                    # a copy goes to the model: a SentenceTransformer writes its outputs (token embeddings,
                    # every hidden layer) into the dict it is given, and the kept inputs would hold them
                    # for the whole step (~0.4 MB per row at 384-d, max_length 64)
                    parts.append(self._embed_column(dict(chunk), i))
                    col_chunks.append(chunk)
                s = torch.cat([p[0] for p in parts])
                x = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
                embedded.append((s.detach().requires_grad_(), None if x is None else x.detach().requires_grad_()))
                chunks.append(col_chunks)
                snapshots.append(col_snaps)
        out = self._remember(self._objective(embedded, labels))
        leaves = [t for pair in embedded for t in pair if t is not None]
        if out["loss"].requires_grad and torch.is_grad_enabled():
            # torch's multi-grad hook sits on each leaf and holds the leaves' grad accumulators, which hold the
            # leaves: a cycle through autograd's C++ objects that the garbage collector cannot see, so every step's
            # embeddings and their gradients stayed alive (~6 KiB per row per step). Removing the hook once it has
            # fired breaks it; the hook itself holds no tensor of the step.
            has_x = [x is not None for _, x in embedded]
            handle = None

            def replay(grads) -> None:
                handle.remove()
                self._replay(chunks, snapshots, has_x, grads)

            handle = torch.autograd.graph.register_multi_grad_hook(leaves, replay, mode="all")
        return self._components(out)

    def _embed_column(self, chunk: dict[str, Tensor], index: int) -> tuple[Tensor, Optional[Tensor]]:
        return self.embed(chunk)

    def _replay(self, chunks: list, snapshots: list, has_x: list, grads) -> None:
        with torch.enable_grad():  # autograd runs hooks with grad mode off
            self._replay_chunks(chunks, snapshots, has_x, grads)

    def _replay_chunks(self, chunks: list, snapshots: list, has_x: list, grads) -> None:
        """``has_x[i]``: whether column i has an HSIC input leaf (its gradient follows the output's in ``grads``)."""
        grads = iter(grads)
        for i, (col_chunks, col_snaps, with_x) in enumerate(zip(chunks, snapshots, has_x)):
            g_s = next(grads)
            g_x = next(grads) if with_x else None
            start = 0
            for chunk, snapshot in zip(col_chunks, col_snaps):
                with snapshot.replay():
                    s_c, x_c = self._embed_column(dict(chunk), i)
                stop = start + s_c.shape[0]
                outputs, cotangents = [], []
                if g_s is not None:
                    outputs.append(s_c)
                    cotangents.append(g_s[start:stop])
                if x_c is not None and g_x is not None:
                    outputs.append(x_c)
                    cotangents.append(g_x[start:stop])
                if outputs:
                    torch.autograd.backward(outputs, cotangents)
                start = stop


def _unwrap_device(model: nn.Module) -> torch.device:
    param = next(_unwrap(model).parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class CachedIBKDDistillationLoss(_GradCacheMixin, IBKDDistillationLoss):
    def __init__(self, model: nn.Module, teacher_dim: int, *, mini_batch_size: int = 32, **kwargs: Any) -> None:
        """
        :class:`IBKDDistillationLoss` with GradCache: the batch is embedded in mini-batches of
        ``mini_batch_size`` without a graph, the IBKD objective is computed on the whole batch, and on
        backward each mini-batch is embedded again with a graph and receives its cached gradient. Memory
        no longer grows with the batch size (only the embeddings do), so the contrastive batch can be as
        large as the teacher cache allows; the gradients equal the uncached loss's. Dropout masks are
        replayed (the RNG state of each mini-batch is kept).

        Args:
            model: the student SentenceTransformer.
            teacher_dim: dimension of the teacher vectors in the label column.
            mini_batch_size: rows embedded at once (memory vs speed; no effect on the result).
            **kwargs: as :class:`IBKDDistillationLoss`.

        References:
            - Text Representation Distillation via Information Bottleneck Principle (EMNLP 2023):
              https://arxiv.org/abs/2311.05472
            - Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache):
              https://arxiv.org/abs/2101.06983

        Inputs: as :class:`IBKDDistillationLoss`.

        Example:
            ::

                loss = CachedIBKDDistillationLoss(student, teacher_dim=768, mini_batch_size=64)
                args = SentenceTransformerTrainingArguments("out", per_device_train_batch_size=4096)
                SentenceTransformerTrainer(model=student, args=args, train_dataset=train_dataset, loss=loss).train()
        """
        super().__init__(model, teacher_dim, **kwargs)
        self._set_mini_batch_size(mini_batch_size)


class CachedIBKDSupervisedLoss(_GradCacheMixin, IBKDSupervisedLoss):
    def __init__(self, model: nn.Module, *, mini_batch_size: int = 32, **kwargs: Any) -> None:
        """
        :class:`IBKDSupervisedLoss` with GradCache (see :class:`CachedIBKDDistillationLoss`): any batch
        size at the memory of one mini-batch, gradients equal to the uncached loss's.

        Args:
            model: the SentenceTransformer to fine-tune.
            mini_batch_size: rows embedded at once.
            **kwargs: as :class:`IBKDSupervisedLoss`.

        References:
            - Text Representation Distillation via Information Bottleneck Principle (EMNLP 2023):
              https://arxiv.org/abs/2311.05472
            - Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache):
              https://arxiv.org/abs/2101.06983

        Inputs: as :class:`IBKDSupervisedLoss`.
        """
        super().__init__(model, **kwargs)
        self._set_mini_batch_size(mini_batch_size)

    def _embed_column(self, chunk: dict[str, Tensor], index: int) -> tuple[Tensor, Optional[Tensor]]:
        return self.embed(chunk, anchor=index == 0)
