"""The IBKD losses for sentence-transformers (stage 1 and stage 2); see the package docstring."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ...losses import IBKDLoss, SupervisedIBKDLoss, load_loss_state, save_loss_state
from .length_chunks import check_length_chunk_size, embed_by_length

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



# ---------------------------------------------------------------------------------------------
# what every loss here shares
# ---------------------------------------------------------------------------------------------
class _IBKDSentenceLoss(nn.Module):
    """Embeds the columns with the SentenceTransformer and hands the vectors to the library objective
    ``self.ibkd``; saves and loads that objective's state (P, a calibrated β)."""

    ibkd: Union[IBKDLoss, SupervisedIBKDLoss]

    def __init__(self, model: nn.Module, input_layer: int, config: dict,
                 length_chunk_size: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        _backbone_config(model)  # fail at construction, not at the first step
        self.input_layer = input_layer
        self.length_chunk_size = check_length_chunk_size(length_chunk_size)
        self._config = dict(config, length_chunk_size=self.length_chunk_size)
        self.last_output: dict[str, Tensor] = {}

    def embed(self, column: dict[str, Tensor], *, with_inputs: Optional[bool] = None) -> tuple[Tensor, Optional[Tensor]]:
        """(sentence embedding, x) of one column; x only when the objective needs it (``with_inputs``
        overrides). With ``length_chunk_size``, embedded in length-sorted chunks without their padding."""
        # the trainer switches the model between train and eval, not the loss: β calibrates in training only
        self.ibkd.train(self.model.training)
        if with_inputs is None:
            with_inputs = self.ibkd.uses_inputs

        def once(features: dict[str, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
            if with_inputs:
                return embed_with_hidden_layer(self.model, features, self.input_layer)
            return self.model(features)["sentence_embedding"], None

        return embed_by_length(once, column, self.length_chunk_size)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> dict[str, Tensor]:
        features = list(sentence_features)
        self._check_inputs(features, labels)
        return self._components(self._remember(self._objective([self.embed(column) for column in features], labels)))

    def _remember(self, out: dict) -> dict:
        """Keeps the objective's detached output (unweighted terms, β, gradient norms) as ``last_output``:
        a trainer logs it per step, the summed components alone hide β and the raw HSIC."""
        self.last_output = {k: v.detach() for k, v in out.items() if isinstance(v, Tensor)}
        return out

    def _check_inputs(self, features: list, labels: Optional[Tensor]) -> None:
        raise NotImplementedError

    def _objective(self, embedded: list, labels: Optional[Tensor]) -> dict:
        """The library objective's output dict over the embedded columns."""
        raise NotImplementedError

    @staticmethod
    def _components(out: dict) -> dict[str, Tensor]:
        """The trainer sums and logs these: β·HSIC (a detached value) and the rest of the loss, through
        which the gradient of the whole objective flows."""
        if "hsic" not in out:  # the mse / none baselines: one term
            return {"mse" if "mse" in out else "loss": out["loss"]}
        weighted_hsic = (out["beta"].to(out["hsic"]) * out["hsic"]).detach()
        return {"infonce": out["loss"] - weighted_hsic, "hsic": weighted_hsic}

    def save_projection(self, path: Union[str, os.PathLike]) -> None:
        """Save the objective's state (P, and β once calibrated) as safetensors: a ``.safetensors`` file, or
        ``ibkd_projection.safetensors`` in a folder."""
        save_loss_state(self.ibkd, path)

    def load_projection(self, path: Union[str, os.PathLike]) -> None:
        """Load what :meth:`save_projection` wrote; an older ``ibkd_projection.pt`` still loads."""
        load_loss_state(self.ibkd, path)

    def get_config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def citation(self) -> str:
        return IBKD_CITATION


def _mean_over_columns(outs: list[dict]) -> dict:
    if len(outs) == 1:
        return outs[0]
    keys = [k for k in ("loss", "mse", "hsic", "beta") if k in outs[0]]
    return {key: torch.stack([o[key].to(outs[0]["loss"]) for o in outs]).mean() for key in keys}


# ---------------------------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------------------------
class IBKDDistillationLoss(_IBKDSentenceLoss):
    def __init__(self, model: nn.Module, teacher_dim: int, *, input_layer: int = 0,
                 student_dim: Optional[int] = None, length_chunk_size: Optional[int] = None,
                 **objective_kwargs: Any) -> None:
        """
        IBKD distillation (stage 1): the student keeps the teacher's information through an InfoNCE
        between its projected embedding P(s) and the teacher embedding t (the other teacher vectors
        of the batch are the negatives), and drops input information it does not need through
        β·HSIC(x, s), x being the mean-pooled embedding-layer output of the student's transformer.
        The objective is :class:`ibkd.losses.IBKDLoss` (fused InfoNCE/HSIC kernels where available),
        with the same defaults as ``ibkd distill``.

        Args:
            model: the student SentenceTransformer; its first module must be a Transformer.
            teacher_dim: dimension of the teacher vectors in the label column.
            input_layer: which hidden layer is pooled into x (0 = embedding output).
            student_dim: the student's embedding dim; read from the model by default.
            length_chunk_size: embed the batch in chunks of this many rows sorted by length, each cut to
                its own longest sentence (same vectors up to float rounding, fewer padded tokens: ~3x
                faster on CPU for short sentences, see :mod:`.length_chunks`); None or 0: one forward.
            **objective_kwargs: options of :class:`ibkd.losses.IBKDLoss`, with its defaults:
                ``temperature=1.0``; ``beta="auto"`` (β set in the first training steps so that the HSIC
                gradient is ``beta_target_ratio=0.07`` times the InfoNCE gradient at the student output,
                then frozen; a number means exactly that β, 0 gives contrastive distillation);
                ``gamma=1.0`` (or ``"median"``); ``normalize_hsic_inputs=True``; ``projection=True`` with
                ``projection_init="identity"`` (P starts at the identity when the dims match);
                ``projection_dim=None``; ``method="ibkd"`` (or ``"contrastive"``, ``"mse"``);
                ``gather_across_devices=None`` (on under ``torchrun``); ``cka``, ``gamma_z``, ``kernel``,
                ``track_grad_norms``, ``backend``.

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

        Returns (from ``forward``): ``{"infonce": ..., "hsic": β·HSIC}``; the trainer sums and logs them.
        With several columns each is the mean over columns.

        Relations:
            - :class:`CachedIBKDDistillationLoss` is the same objective with GradCache (any batch size).
            - With ``method="mse"`` this is sentence-transformers' ``MSELoss`` through a learned P.

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
                loss.save_projection("output/")  # P and the calibrated beta, as safetensors
        """
        super().__init__(model, input_layer, dict(teacher_dim=teacher_dim, input_layer=input_layer, **objective_kwargs),
                         length_chunk_size)
        self.student_dim = student_dim or _embedding_dim(model)
        self.teacher_dim = teacher_dim
        self.ibkd = IBKDLoss(self.student_dim, teacher_dim, **objective_kwargs)

    def _check_inputs(self, features: list, labels: Optional[Tensor]) -> None:
        self._targets(labels, len(features))

    def _targets(self, labels: Optional[Tensor], columns: int) -> list[Tensor]:
        if labels is None:
            raise ValueError("IBKDDistillationLoss needs the teacher embeddings in the dataset's 'label' column "
                             "(shape (batch_size, teacher_dim))")
        teacher = labels.detach()
        if teacher.dim() == 2:
            targets = [teacher] * columns
        elif teacher.dim() == 3 and teacher.shape[1] == columns:
            targets = list(teacher.unbind(1))
        else:
            raise ValueError(f"labels must be (batch_size, teacher_dim) or (batch_size, {columns}, teacher_dim), "
                             f"got shape {tuple(teacher.shape)}")
        if targets[0].shape[-1] != self.teacher_dim:
            raise ValueError(f"teacher embeddings have dim {targets[0].shape[-1]}, the loss expects {self.teacher_dim}")
        return targets

    def _objective(self, embedded: list, labels: Optional[Tensor]) -> dict:
        targets = self._targets(labels, len(embedded))
        return _mean_over_columns([self.ibkd(s, t, x) for (s, x), t in zip(embedded, targets)])


# ---------------------------------------------------------------------------------------------
# stage 2
# ---------------------------------------------------------------------------------------------
class IBKDSupervisedLoss(_IBKDSentenceLoss):
    def __init__(self, model: nn.Module, *, input_layer: int = -2, student_dim: Optional[int] = None,
                 length_chunk_size: Optional[int] = None, **objective_kwargs: Any) -> None:
        """
        Supervised IBKD (stage 2): InfoNCE between the anchor and its positive, the other positives of
        the batch and every hard negative being negatives, plus β·HSIC(x, s) between the anchor
        embedding s and x, the mean-pooled penultimate layer of the student's transformer. Anchor and
        candidates go through the same projection P before the InfoNCE; HSIC uses s itself. Works with
        or without hard-negative columns. The objective is :class:`ibkd.losses.SupervisedIBKDLoss`,
        with the same defaults as ``ibkd finetune``.

        Args:
            model: the SentenceTransformer to fine-tune; its first module must be a Transformer.
            input_layer: which hidden layer is pooled into x (-2 = penultimate).
            student_dim: the model's embedding dim; read from the model by default.
            length_chunk_size: as :class:`IBKDDistillationLoss` (every column, length-sorted chunks).
            **objective_kwargs: options of :class:`ibkd.losses.SupervisedIBKDLoss`, with its defaults:
                ``temperature=0.05``; ``beta="auto"`` (a number means exactly that β; 0 gives
                MultipleNegativesRankingLoss with scale 1/τ when ``projection_dim=None``); ``gamma=0.1``;
                ``projection_dim=128`` (``None``: compare the embeddings themselves);
                ``normalize_hsic_inputs=True``; ``gather_across_devices=None`` (on under ``torchrun``);
                ``beta_target_ratio``, ``beta_calibration_steps``, ``cka``, ``gamma_z``, ``kernel``,
                ``track_grad_norms``, ``backend``.

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

        Relations:
            - :class:`CachedIBKDSupervisedLoss` is the same objective with GradCache.
            - With ``beta=0`` and ``projection_dim=None``: ``MultipleNegativesRankingLoss(scale=1/τ)``.

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
        super().__init__(model, input_layer, dict(input_layer=input_layer, **objective_kwargs), length_chunk_size)
        self.student_dim = student_dim or _embedding_dim(model)
        self.ibkd = SupervisedIBKDLoss(self.student_dim, **objective_kwargs)

    def embed(self, column: dict[str, Tensor], *, anchor: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        return super().embed(column, with_inputs=None if anchor else False)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> dict[str, Tensor]:
        features = list(sentence_features)
        self._check_inputs(features, labels)
        embedded = [self.embed(column, anchor=i == 0) for i, column in enumerate(features)]
        return self._components(self._remember(self._objective(embedded, labels)))

    def _check_inputs(self, features: list, labels: Optional[Tensor]) -> None:
        if len(features) < 2:
            raise ValueError(
                f"IBKDSupervisedLoss needs (anchor, positive[, negative ...]) columns, got {len(features)} column(s)")

    def _objective(self, embedded: list, labels: Optional[Tensor]) -> dict:
        (anchor, inputs), (positive, _), *negatives = embedded
        return self.ibkd(anchor, positive, inputs, negatives=[n for n, _ in negatives])


