"""IBKD losses for sentence-transformers.

They follow that library's loss convention — the model first in the constructor,
``forward(sentence_features, labels)``, and a dict of named components returned, which
``SentenceTransformerTrainer`` sums into the training loss and logs one by one — so they drop into
``SentenceTransformerTrainer(model=..., loss=...)`` like any built-in loss. The trainer optimises
every parameter of the loss module, the learned projection P included.

* :class:`IBKDDistillationLoss` — stage 1: unlabeled sentences with pre-computed teacher vectors in
  the ``label`` column.
* :class:`IBKDSupervisedLoss` — stage 2: (anchor, positive[, hard negative ...]) columns.

The HSIC input x is a mean-pooled hidden layer of the student's transformer (the embedding-layer
output by default in stage 1, the penultimate layer in stage 2), read from the first module of the
SentenceTransformer (its Hugging Face model) with hidden states switched on for that forward pass.

Reference: Zhang et al., "Text Representation Distillation via Information Bottleneck Principle",
EMNLP 2023, https://arxiv.org/abs/2311.05472.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..losses import STAGE1_DEFAULTS, STAGE2_DEFAULTS, HSICLoss, IBKDLoss, InfoNCELoss

__all__ = ["IBKDDistillationLoss", "IBKDSupervisedLoss", "embed_with_hidden_layer"]

IBKD_CITATION = """
@inproceedings{zhang-etal-2023-text,
    title = "Text Representation Distillation via Information Bottleneck Principle",
    author = "Zhang, Yanzhao and Long, Dingkun and Li, Zehan and Xie, Pengjun",
    booktitle = "Proceedings of the 2023 Conference on Empirical Methods in Natural Language Processing",
    year = "2023",
    publisher = "Association for Computational Linguistics",
    url = "https://arxiv.org/abs/2311.05472",
}
"""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The SentenceTransformer inside DDP (``.module``) or torch.compile (``._orig_mod``) wrappers,
    which the trainer may have put in place of the loss's model."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _backbone_config(model: nn.Module):
    """Config of the Hugging Face model in the SentenceTransformer's first module."""
    base = _unwrap(model)
    first = next(iter(base.children()), None)
    backbone = getattr(first, "auto_model", None) or getattr(first, "model", None)
    config = getattr(backbone, "config", None)
    if config is None or not hasattr(config, "output_hidden_states"):
        raise TypeError(
            "the IBKD losses read the HSIC input from the student's transformer: the SentenceTransformer's "
            f"first module must wrap a Hugging Face model (a Transformer module), got {type(first).__name__}"
        )
    return config


def _embedding_dim(model: nn.Module) -> int:
    base = _unwrap(model)
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        method = getattr(base, name, None)
        if callable(method):
            dim = method()
            if dim:
                return int(dim)
    raise ValueError("cannot tell the student's embedding dimension: pass student_dim explicitly")


@contextmanager
def _hidden_states_on(config) -> Iterator[None]:
    """Hidden states for one forward pass only: left on, the saved config would carry the flag and
    every inference call would keep all layers' activations."""
    previous = config.output_hidden_states
    config.output_hidden_states = True
    try:
        yield
    finally:
        config.output_hidden_states = previous


def _masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def embed_with_hidden_layer(model: nn.Module, features: dict[str, Any], layer: int) -> tuple[Tensor, Tensor]:
    """One forward pass of a SentenceTransformer returning ``(sentence_embedding, x)`` where x is the
    attention-masked mean of hidden layer ``layer`` of its transformer (0 = embedding-layer output,
    -1 = last layer, -2 = penultimate)."""
    with _hidden_states_on(_backbone_config(model)):
        out = model(features)
    hidden_states = out.get("all_layer_embeddings")
    if hidden_states is None:
        raise RuntimeError("the student's transformer returned no hidden states (all_layer_embeddings)")
    if not -len(hidden_states) <= layer < len(hidden_states):
        raise ValueError(f"input_layer {layer} is out of range for {len(hidden_states)} hidden states")
    return out["sentence_embedding"], _masked_mean(hidden_states[layer], out["attention_mask"])


def _save_state(module: nn.Module, path: Union[str, os.PathLike]) -> None:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "ibkd_projection.pt")
    torch.save(module.state_dict(), path)


def _load_state(module: nn.Module, path: Union[str, os.PathLike]) -> None:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "ibkd_projection.pt")
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


# ---------------------------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------------------------
class _IBKDSentenceLossBase(nn.Module):
    """What both losses share: saving/loading the learned projection, config and citation."""

    _config: dict

    def _projection_state(self) -> nn.Module:
        raise NotImplementedError

    def save_projection(self, path: Union[str, os.PathLike]) -> None:
        """Save the learned projection(s) of the loss (a file, or ``ibkd_projection.pt`` in a folder)."""
        _save_state(self._projection_state(), path)

    def load_projection(self, path: Union[str, os.PathLike]) -> None:
        _load_state(self._projection_state(), path)

    def get_config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def citation(self) -> str:
        return IBKD_CITATION


class IBKDDistillationLoss(_IBKDSentenceLossBase):
    def __init__(
        self,
        model: nn.Module,
        teacher_dim: int,
        *,
        temperature: float = STAGE1_DEFAULTS["temperature"],
        beta: float = STAGE1_DEFAULTS["beta"],
        gamma: Union[float, str] = STAGE1_DEFAULTS["gamma"],
        projection: bool = True,
        projection_dim: Optional[int] = None,
        input_layer: int = 0,
        student_dim: Optional[int] = None,
        gamma_z: Optional[Union[float, str]] = None,
        kernel: str = "rbf",
        normalized_hsic: bool = False,
        backend: str = "auto",
    ) -> None:
        """
        IBKD distillation (stage 1): the student keeps the teacher's information through an InfoNCE
        between its projected embedding P(s) and the teacher embedding t (the other teacher vectors
        of the batch are the negatives), and drops input information it does not need through
        β·HSIC(x, s), x being the mean-pooled embedding-layer output of the student's transformer.
        Wraps :class:`ibkd.losses.IBKDLoss` (fused InfoNCE/HSIC kernels where available).

        Args:
            model: the student SentenceTransformer; its first module must be a Transformer.
            teacher_dim: dimension of the teacher vectors in the label column.
            temperature: τ of the InfoNCE term (paper, stage 1: 1.0).
            beta: weight β of the HSIC term (paper, stage 1: 0.2). 0 gives plain contrastive distillation.
            gamma: RBF bandwidth of HSIC, a float or ``"median"`` (paper, stage 1: 1.0).
            projection: learn P: Linear(student_dim → teacher_dim). Lives on the loss, is trained by
                the trainer with the student, and is not part of the saved model (see
                :meth:`save_projection`). ``False`` needs student_dim == teacher_dim.
            projection_dim: compare in a space of this size instead of the teacher's (see IBKDLoss).
            input_layer: which hidden layer is pooled into x (0 = embedding output).
            student_dim: the student's embedding dim; read from the model by default.
            gamma_z, kernel, normalized_hsic, backend: passed to :class:`ibkd.losses.IBKDLoss`.

        References:
            - Text Representation Distillation via Information Bottleneck Principle (EMNLP 2023):
              https://arxiv.org/abs/2311.05472

        Requirements:
            1. Teacher embeddings pre-computed (e.g. with ``teacher.encode``, or ibkd's teacher cache)
               and stored in a ``label`` column.
            2. Batches of at least 2 sentences (HSIC needs n ≥ 2); large batches give more negatives.

        Inputs:
            +---------------------------------+-----------------------------------------------------+
            | Inputs                          | Labels                                              |
            +=================================+=====================================================+
            | sentence                        | teacher embeddings ``(batch_size, teacher_dim)``    |
            +---------------------------------+-----------------------------------------------------+
            | sentence_1, ..., sentence_N     | ``(batch_size, teacher_dim)`` (shared by all        |
            |                                 | columns) or ``(batch_size, N, teacher_dim)``        |
            +---------------------------------+-----------------------------------------------------+

        Returns (from ``forward``): ``{"infonce": ..., "hsic": ...}`` where ``hsic`` is already
        weighted by β, so the two sum to the IBKD loss (the trainer sums them). With several
        columns each component is the mean over columns. The gradient of the whole loss flows
        through the ``infonce`` entry (the loss minus the detached weighted HSIC value), keeping
        :class:`ibkd.losses.IBKDLoss` the single implementation of the objective.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                from ibkd.integrations.sentence_transformers import IBKDDistillationLoss

                teacher = SentenceTransformer("sentence-transformers/all-mpnet-base-v2")
                student = SentenceTransformer("nreimers/MiniLM-L6-H384-uncased")
                sentences = ["A man is eating food.", "A man is riding a horse.", "A woman plays violin."]
                train_dataset = Dataset.from_dict({"sentence": sentences, "label": teacher.encode(sentences).tolist()})

                loss = IBKDDistillationLoss(student, teacher_dim=teacher.get_embedding_dimension())
                trainer = SentenceTransformerTrainer(model=student, train_dataset=train_dataset, loss=loss)
                trainer.train()
                loss.save_projection("output/ibkd_projection.pt")  # P, to continue training later
        """
        super().__init__()
        self.model = model
        _backbone_config(model)  # fail at construction, not at the first step
        self.student_dim = student_dim or _embedding_dim(model)
        self.teacher_dim = teacher_dim
        self.input_layer = input_layer
        self.ibkd = IBKDLoss(
            self.student_dim, teacher_dim, temperature=temperature, beta=beta, gamma=gamma, projection=projection,
            projection_dim=projection_dim, gamma_z=gamma_z, kernel=kernel, normalized_hsic=normalized_hsic,
            backend=backend,
        )
        self._config = dict(teacher_dim=teacher_dim, temperature=temperature, beta=beta, gamma=gamma,
                            projection=projection, projection_dim=projection_dim, input_layer=input_layer)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor]) -> dict[str, Tensor]:
        if labels is None:
            raise ValueError(
                "IBKDDistillationLoss needs the teacher embeddings in the dataset's 'label' column "
                "(shape (batch_size, teacher_dim))"
            )
        features = list(sentence_features)
        teacher = labels.detach()
        if teacher.dim() == 2:
            targets = [teacher] * len(features)
        elif teacher.dim() == 3 and teacher.shape[1] == len(features):
            targets = list(teacher.unbind(1))
        else:
            raise ValueError(
                f"labels must be (batch_size, teacher_dim) or (batch_size, {len(features)}, teacher_dim), "
                f"got shape {tuple(teacher.shape)}"
            )
        if targets[0].shape[-1] != self.teacher_dim:
            raise ValueError(f"teacher embeddings have dim {targets[0].shape[-1]}, the loss expects {self.teacher_dim}")

        total, weighted_hsic = [], []
        for column, target in zip(features, targets):
            if self.ibkd.beta > 0:
                student, inputs = embed_with_hidden_layer(self.model, column, self.input_layer)
            else:  # no HSIC term: no hidden states needed
                student, inputs = self.model(column)["sentence_embedding"], None
            out = self.ibkd(student, target, inputs)
            total.append(out["loss"])
            weighted_hsic.append(self.ibkd.beta * out["hsic"])
        loss = torch.stack(total).mean()
        hsic = torch.stack(weighted_hsic).mean()
        return {"infonce": loss - hsic, "hsic": hsic}

    def _projection_state(self) -> nn.Module:
        return self.ibkd


# ---------------------------------------------------------------------------------------------
# stage 2
# ---------------------------------------------------------------------------------------------
class IBKDSupervisedLoss(_IBKDSentenceLossBase):
    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = STAGE2_DEFAULTS["temperature"],
        beta: float = STAGE2_DEFAULTS["beta"],
        gamma: Union[float, str] = STAGE2_DEFAULTS["gamma"],
        projection_dim: Optional[int] = STAGE2_DEFAULTS["projection_dim"],
        input_layer: int = -2,
        student_dim: Optional[int] = None,
        gamma_z: Optional[Union[float, str]] = None,
        kernel: str = "rbf",
        normalized_hsic: bool = False,
        backend: str = "auto",
    ) -> None:
        """
        Supervised IBKD (stage 2): InfoNCE between the anchor and its positive, the other positives of
        the batch and every hard negative being negatives, plus β·HSIC(x, s) between the anchor
        embedding s and x, the mean-pooled penultimate layer of the student's transformer. Anchor and
        candidates go through the same optional projection P before the InfoNCE; HSIC uses s itself.
        Works with or without hard-negative columns.

        Args:
            model: the SentenceTransformer to fine-tune; its first module must be a Transformer.
            temperature: τ of the InfoNCE term (paper, stage 2: 0.05).
            beta: weight β of the HSIC term (paper, stage 2: 1.0). 0 gives plain supervised InfoNCE
                (MultipleNegativesRankingLoss with scale 1/τ when ``projection_dim=None``).
            gamma: RBF bandwidth of HSIC, a float or ``"median"`` (paper, stage 2: 0.1).
            projection_dim: size of the shared projection P used for the InfoNCE (paper: optional,
                128); ``None`` compares the embeddings themselves. P lives on the loss, is trained by
                the trainer, and is not used at inference.
            input_layer: which hidden layer is pooled into x (-2 = penultimate).
            student_dim: the model's embedding dim; read from the model by default.
            gamma_z, kernel, normalized_hsic, backend: passed to :class:`ibkd.losses.HSICLoss` /
                :class:`ibkd.losses.InfoNCELoss`.

        References:
            - Text Representation Distillation via Information Bottleneck Principle (EMNLP 2023):
              https://arxiv.org/abs/2311.05472

        Requirements:
            1. (anchor, positive) pairs, optionally with one or more hard-negative columns.
            2. Batches of at least 2 rows.

        Inputs:
            +-------------------------------------------------+--------+
            | Inputs                                          | Labels |
            +=================================================+========+
            | (anchor, positive) pairs                        | none   |
            +-------------------------------------------------+--------+
            | (anchor, positive, negative) triplets           | none   |
            +-------------------------------------------------+--------+
            | (anchor, positive, negative_1, ..., negative_n) | none   |
            +-------------------------------------------------+--------+

        Returns (from ``forward``): ``{"infonce": ..., "hsic": β·HSIC}``; the trainer sums them.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                from ibkd.integrations.sentence_transformers import IBKDSupervisedLoss

                model = SentenceTransformer("output/ibkd-stage1")
                train_dataset = Dataset.from_dict({
                    "anchor": ["A man is eating food.", "A child plays in the park."],
                    "positive": ["A man eats something.", "A kid is playing outside."],
                    "negative": ["A man is riding a horse.", "A child is sleeping."],
                })
                loss = IBKDSupervisedLoss(model)
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        super().__init__()
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise ValueError(f"beta must be a non-negative float, got {beta!r}")
        self.model = model
        _backbone_config(model)
        self.student_dim = student_dim or _embedding_dim(model)
        self.beta = float(beta)
        self.input_layer = input_layer
        self.projection = nn.Linear(self.student_dim, projection_dim) if projection_dim else nn.Identity()
        self.infonce = InfoNCELoss(temperature, backend=backend)
        self.hsic = HSICLoss(gamma, gamma_z, kernel=kernel, normalized=normalized_hsic, backend=backend)
        self._config = dict(temperature=temperature, beta=beta, gamma=gamma, projection_dim=projection_dim,
                            input_layer=input_layer)

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None
    ) -> dict[str, Tensor]:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(
                f"IBKDSupervisedLoss needs (anchor, positive[, negative ...]) columns, got {len(features)} column(s)"
            )
        if self.beta > 0:
            anchor, inputs = embed_with_hidden_layer(self.model, features[0], self.input_layer)
        else:
            anchor, inputs = self.model(features[0])["sentence_embedding"], None
        # positives first, then every hard negative: row i of the keys is the positive of anchor i
        candidates = torch.cat([self.model(column)["sentence_embedding"] for column in features[1:]])
        contrastive = self.infonce(self.projection(anchor), self.projection(candidates))
        hsic = self.beta * self.hsic(inputs, anchor) if self.beta > 0 else contrastive.new_zeros(())
        return {"infonce": contrastive, "hsic": hsic}

    def _projection_state(self) -> nn.Module:
        return self.projection
