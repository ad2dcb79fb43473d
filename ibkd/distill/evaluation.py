"""STS evaluation of sentence encoders: Spearman ×100 of the cosine against the gold scores, with the
model's size and encode throughput measured on the way.

Why not sentence-transformers' ``EmbeddingSimilarityEvaluator`` here: it evaluates a ``SentenceTransformer``
(and the trainer uses it, :mod:`ibkd.distill.evaluator`), while this module takes any encoder: a raw
:class:`ibkd.distill.models.Encoder` (the compact student, a layer subset before it is exported), a
``SentenceTransformer``, or a plain function ``encode(list[str]) -> (n, d)``. It also measures what the
evaluator does not: parameter count, output dim and sentences per second, which ``ibkd eval`` and
``ibkd reproduce`` report beside the score. Each distinct text is encoded once, in length-sorted chunks of
``batch_size`` (less padding).

Result keys: ``task``, ``spearman``, ``pearson`` (×100, scipy's), ``n``, ``parameters`` (when the model is an
``nn.Module`` or a bound method of one), ``embedding_dim``, ``sentences_encoded``, ``encode_seconds``,
``sentences_per_second``.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats
from torch import nn

from .stsb import read_stsb

PathLike = Union[str, "os.PathLike[str]"]


class STSData(NamedTuple):
    """Scored sentence pairs: ``sents1[i]`` and ``sents2[i]`` with gold score ``scores[i]``."""

    sents1: list[str]
    sents2: list[str]
    scores: list[float]


# ---------------------------------------------------------------------------------------------
# correlation
# ---------------------------------------------------------------------------------------------
def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {len(x)}")
    return x, y


def _statistic(test, x, y) -> float:
    # a constant side has no correlation: NaN, which is the answer (scipy's warning would only repeat it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(test(x, y)[0])


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (scipy) in float64; NaN when either side is constant."""
    return _statistic(scipy_stats.pearsonr, *_paired(x, y))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (scipy; ties get average ranks); NaN when either side is constant."""
    return _statistic(scipy_stats.spearmanr, *_paired(x, y))


# ---------------------------------------------------------------------------------------------
# encoding with bookkeeping
# ---------------------------------------------------------------------------------------------
def count_parameters(model: Any) -> Optional[int]:
    """Parameter count of an ``nn.Module`` (or of the module a bound method belongs to), else None."""
    module = _module_of(model)
    if module is None:
        return None
    return sum(p.numel() for p in module.parameters())


def _module_of(model: Any) -> Optional[nn.Module]:
    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)  # a bound method such as encoder.encode
    return owner if isinstance(owner, nn.Module) else None


def _to_float_tensor(output: Any, expected_rows: int) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        tensor = output.detach()
    elif isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        tensor = torch.stack([t.detach() for t in output])
    else:
        tensor = torch.as_tensor(np.asarray(output))
    if tensor.ndim != 2 or tensor.shape[0] != expected_rows:
        raise ValueError(
            f"encode must return a ({expected_rows}, dim) matrix for {expected_rows} texts, "
            f"got shape {tuple(tensor.shape)}"
        )
    return tensor.float()


class EncodeStats:
    """Wraps a model into ``encode(texts) -> float32 tensor`` and measures what it costs."""

    def __init__(self, model: Any, batch_size: int = 64):
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if hasattr(model, "encode") and callable(model.encode):
            self._fn = model.encode
        elif callable(model):
            self._fn = model
        else:
            raise TypeError(f"model must be callable or have an .encode method, got {type(model).__name__}")
        try:
            accepted = set(inspect.signature(self._fn).parameters)
        except (TypeError, ValueError):
            accepted = set()
        self._extra_kwargs = {}
        if "show_progress_bar" in accepted:  # sentence-transformers
            self._extra_kwargs["show_progress_bar"] = False
        self._passes_batch_size = "batch_size" in accepted
        self.model = model
        self.module = _module_of(model)
        self.batch_size = batch_size
        self.parameters = count_parameters(model)
        self.embedding_dim: Optional[int] = None
        self.sentences_encoded = 0
        self.encode_seconds = 0.0

    def _encode_chunk(self, texts: list[str]) -> torch.Tensor:
        kwargs = dict(self._extra_kwargs)
        if self._passes_batch_size:
            kwargs["batch_size"] = len(texts)
        return _to_float_tensor(self._fn(texts, **kwargs), len(texts))

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of ``texts`` (n, d) in float32; each distinct text is encoded once, in
        length-sorted batches (less padding), and the rows are put back in the input order."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        unique = list(dict.fromkeys(texts))
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]), reverse=True)
        pieces = []
        for start in range(0, len(order), self.batch_size):
            chunk = [unique[i] for i in order[start:start + self.batch_size]]
            with self._timed(len(chunk)):
                pieces.append(self._encode_chunk(chunk))
        if not pieces:
            raise ValueError("nothing to encode: the text list is empty")
        sorted_embeddings = torch.cat([p.to(pieces[0].device) for p in pieces])
        self._note_dim(sorted_embeddings)
        embeddings = torch.empty_like(sorted_embeddings)
        embeddings[torch.tensor(order, device=embeddings.device)] = sorted_embeddings
        row_of = {text: i for i, text in enumerate(unique)}
        return embeddings[torch.tensor([row_of[t] for t in texts], device=embeddings.device)]

    @contextmanager
    def _timed(self, count: int):
        start = time.perf_counter()
        yield
        self.encode_seconds += time.perf_counter() - start
        self.sentences_encoded += count

    def _note_dim(self, embeddings: torch.Tensor) -> None:
        if self.embedding_dim is None:
            self.embedding_dim = int(embeddings.shape[1])

    @contextmanager
    def evaluating(self):
        """Eval mode (no dropout) and no autograd for the duration; the previous mode is restored."""
        was_training = self.module.training if self.module is not None else None
        if self.module is not None:
            self.module.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            if was_training:
                self.module.train()

    def summary(self) -> dict:
        seconds = self.encode_seconds
        return {
            "parameters": self.parameters,
            "embedding_dim": self.embedding_dim,
            "sentences_encoded": self.sentences_encoded,
            "encode_seconds": seconds,
            "sentences_per_second": self.sentences_encoded / seconds if seconds > 0 else float("nan"),
        }


def _stats_for(model: Any, batch_size: int) -> EncodeStats:
    return model if isinstance(model, EncodeStats) else EncodeStats(model, batch_size)


# ---------------------------------------------------------------------------------------------
# STS data
# ---------------------------------------------------------------------------------------------
def _require_file(path: PathLike, what: str) -> Path:
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    return path


def load_stsb(path: PathLike) -> STSData:
    """Read an STS-B file (``sts-{train,dev,test}.csv``) with :func:`ibkd.distill.stsb.read_stsb`: errors
    name the file and line."""
    pairs, scores = read_stsb(_require_file(path, "STS-B file"))
    return STSData([a for a, _ in pairs], [b for _, b in pairs], scores)


def _as_sts_data(pairs_or_path: Union[STSData, Sequence, PathLike]) -> STSData:
    if isinstance(pairs_or_path, (str, os.PathLike)):
        return load_stsb(pairs_or_path)
    if isinstance(pairs_or_path, (tuple, list)) and len(pairs_or_path) == 3:
        sents1, sents2, scores = (list(x) for x in pairs_or_path)
        if not (len(sents1) == len(sents2) == len(scores)):
            raise ValueError(
                f"sents1, sents2 and scores must have the same length, got {len(sents1)}, {len(sents2)}, {len(scores)}"
            )
        return STSData(sents1, sents2, [float(s) for s in scores])
    raise TypeError("pairs_or_path must be a path to an STS-B file or a (sents1, sents2, scores) triple")


# ---------------------------------------------------------------------------------------------
# STS evaluation
# ---------------------------------------------------------------------------------------------
def _cosine_scores(stats: EncodeStats, data: STSData) -> np.ndarray:
    emb = stats.encode(list(data.sents1) + list(data.sents2))
    n = len(data.scores)
    return F.cosine_similarity(emb[:n], emb[n:], dim=1).double().cpu().numpy()


def _correlations(cosine: np.ndarray, gold: Sequence[float]) -> dict:
    return {"spearman": 100.0 * spearman(cosine, gold), "pearson": 100.0 * pearson(cosine, gold), "n": len(gold)}


def evaluate_sts(model: Any, pairs_or_path: Union[STSData, Sequence, PathLike], *, batch_size: int = 64,
                 name: Optional[str] = None) -> dict:
    """Spearman and Pearson (×100) between the cosine of the two sentences' embeddings and the gold
    scores, for an STS-B file path or a ``(sents1, sents2, scores)`` triple.

    Returns ``{"task", "spearman", "pearson", "n", "parameters", "embedding_dim",
    "sentences_encoded", "encode_seconds", "sentences_per_second"}``.

    Example::

        >>> evaluate_sts(encoder, stsb_path(data_dir, "dev"), batch_size=128)["spearman"]
    """
    data = _as_sts_data(pairs_or_path)
    if len(data.scores) < 2:
        raise ValueError(f"STS evaluation needs at least 2 scored pairs, got {len(data.scores)}")
    stats = _stats_for(model, batch_size)
    with stats.evaluating():
        cosine = _cosine_scores(stats, data)
    task = name or (Path(str(pairs_or_path)).stem if isinstance(pairs_or_path, (str, os.PathLike)) else "sts")
    return {"task": task, **_correlations(cosine, data.scores), **stats.summary()}
