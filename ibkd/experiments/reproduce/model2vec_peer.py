"""Model2Vec's distill of the teacher as a peer row: the small-and-fast reference point (issue 13, 1b and 5).

Model2Vec (``pip install 'ibkd[peers]'``, i.e. ``model2vec[distill]``) turns a sentence encoder into a static model: every token of
the teacher's vocabulary is encoded once by the teacher (mean-pooled), the vectors are reduced by PCA
(default 256 dimensions) and SIF-weighted, and a sentence is the mean of its tokens' vectors; no transformer
runs at encode time. :func:`distill_model2vec` calls its documented API (``model2vec.distill.distill`` with
the package's defaults except ``pca_dims``) and saves the static model (``StaticModel.save_pretrained``);
:class:`StaticEncoder` is the adapter the reproduction's scoring takes (``encode(texts, batch_size=...)``,
its vectors as the module's one frozen parameter, so the parameter count is ``vocabulary x dims``);
:func:`run_model2vec_row` is the row (same result keys as the other rows of
:mod:`ibkd.experiments.reproduce.run`). Its ``train_seconds`` is the time of the distillation.

Nothing here imports :mod:`ibkd.experiments.reproduce.run` (which runs this row): the row takes the teacher
spec and the scoring function as arguments (run passes its own ``teacher_spec`` and ``evaluate_encoder``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ...distill.models import resolve_model_path

MODEL_FOLDER = "model"
DEFAULT_PCA_DIMS = 256  # model2vec.distill.distill's own default

PathLike = Union[str, "os.PathLike[str]"]


class Model2VecError(ValueError):
    """A bad argument of the Model2Vec peer, or model2vec missing (one line)."""


def _model2vec_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("model2vec")
    except Exception:  # noqa: BLE001 - only for the record
        return None


def _distill_fn():
    try:
        from model2vec.distill import distill
    except ImportError as exc:
        raise Model2VecError(f"the Model2Vec peer needs model2vec with its distill extra: pip install "
                             f"'ibkd[peers]' (model2vec[distill]); {exc}") from None
    return distill


class StaticEncoder(nn.Module):
    """A Model2Vec ``StaticModel`` as a sentence encoder for :func:`ibkd.distill.evaluation.evaluate_sts`:
    ``encode(texts, batch_size=...)`` is the static model's own ``encode`` (its tokenizer, truncation and
    normalisation) returned as a float32 tensor. The token vectors (and per-token weights, where the model
    has them) are frozen parameters of this module, so ``count_parameters`` gives the static model's size."""

    def __init__(self, static_model):
        super().__init__()
        self.static = static_model
        self.vectors = nn.Parameter(torch.as_tensor(np.array(static_model.embedding)), requires_grad=False)
        weights = getattr(static_model, "weights", None)
        self.weights = None if weights is None else nn.Parameter(torch.as_tensor(np.array(weights)),
                                                                 requires_grad=False)

    @classmethod
    def load(cls, folder: PathLike) -> "StaticEncoder":
        try:
            from model2vec import StaticModel
        except ImportError as exc:
            raise Model2VecError(f"loading a Model2Vec model needs model2vec: pip install model2vec; {exc}") from None
        folder = Path(os.path.expanduser(str(folder)))
        if not folder.is_dir():
            raise FileNotFoundError(f"Model2Vec model folder {folder} does not exist")
        return cls(StaticModel.from_pretrained(str(folder)))

    @property
    def dim(self) -> int:
        return int(self.static.dim)

    def encode(self, sentences: Sequence[str], *, batch_size: int = 1024) -> torch.Tensor:
        out = self.static.encode(list(sentences), batch_size=batch_size, show_progress_bar=False,
                                 use_multiprocessing=False)
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(len(sentences), -1))

    def forward(self, sentences: Sequence[str]) -> torch.Tensor:
        return self.encode(sentences)


def distill_model2vec(teacher_path_or_id: Optional[str], out_folder: PathLike, pca_dims: Optional[int] = DEFAULT_PCA_DIMS,
                      *, device: Optional[str] = None) -> dict:
    """Distill ``teacher_path_or_id`` (a folder, a hub id, or ``"default"``: the offline all-MiniLM-L6-v2,
    :func:`ibkd.distill.models.resolve_model_path`) with ``model2vec.distill.distill(model_name, pca_dims=...)``
    (every other argument at Model2Vec's default; ``device``: Model2Vec's choice when None) and save the static
    model to ``out_folder`` (replaced). Returns ``{folder, distill_seconds, parameters, embedding_dim,
    vocab_size, pca_dims, teacher, model2vec_version}``."""
    if pca_dims is not None and (isinstance(pca_dims, bool) or not isinstance(pca_dims, int) or pca_dims < 1):
        raise Model2VecError(f"pca_dims must be a positive int or None (no PCA), got {pca_dims!r}")
    distill = _distill_fn()
    try:
        path = resolve_model_path(teacher_path_or_id)
    except FileNotFoundError as exc:
        raise Model2VecError(f"teacher_path_or_id: {exc}") from None
    out = Path(os.path.expanduser(str(out_folder)))
    started = time.perf_counter()
    static = distill(model_name=path, pca_dims=pca_dims, device=device)
    seconds = time.perf_counter() - started
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    static.save_pretrained(str(out))
    parameters = int(np.asarray(static.embedding).size) + (0 if static.weights is None else int(np.asarray(static.weights).size))
    return {"folder": str(out), "distill_seconds": seconds, "parameters": parameters, "embedding_dim": int(static.dim),
            "vocab_size": int(np.asarray(static.embedding).shape[0]), "pca_dims": pca_dims,
            "teacher": str(teacher_path_or_id), "model2vec_version": _model2vec_version()}


# -- the row -----------------------------------------------------------------------------------------

def run_model2vec_row(row, ctx, folder: Path, *, teacher: str, evaluate: Callable[[Any, dict, int], dict]) -> dict:
    """The Model2Vec row: distill the teacher (``ctx.spec["common"]["teacher"]``, or ``teacher``) with
    ``row.info.get("pca_dims", 256)`` into ``folder/model`` and score it on STS-B dev/test with ``evaluate``
    (``run.evaluate_encoder``'s signature; default: the same computation). Returns ``{train_seconds,
    distill_seconds, student, student_path, dev_spearman, test_spearman, parameters, embedding_dim,
    sentences_per_second, sentences_per_second_by_split, pca_dims, vocab_size, model2vec_version}``."""
    info = getattr(row, "info", None) or {}
    pca_dims = info.get("pca_dims", DEFAULT_PCA_DIMS)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = distill_model2vec(teacher, folder / MODEL_FOLDER, pca_dims=pca_dims,
                             device=info.get("device"))
    if ctx.num_threads:
        torch.set_num_threads(ctx.num_threads)
    encoder = StaticEncoder.load(made["folder"])
    scores = evaluate(encoder, ctx.sts, ctx.spec.get("eval_batch_size", 128))
    return {"train_seconds": made["distill_seconds"], "distill_seconds": made["distill_seconds"],
            "student": made["folder"], "student_path": MODEL_FOLDER, **scores, "pca_dims": pca_dims,
            "vocab_size": made["vocab_size"], "model2vec_version": made["model2vec_version"]}
