"""Evaluation of sentence encoders: STS (Spearman ×100 of cosine) and BEIR-style retrieval.

Independent of any model class. Every function takes ``model``: either a callable
``encode(list[str]) -> (n, d) tensor/array`` or any object with ``.encode(list[str])`` (an
:class:`ibkd.distill.models.Encoder`, a ``sentence_transformers.SentenceTransformer``, ...), and a
``batch_size``: texts are encoded in length-sorted chunks of that size, each distinct text once.

Tasks
-----
* STS-B (:func:`load_stsb`): the tab-separated files of ``stsbenchmark`` (quoting off, score in
  column 5, sentences in columns 6 and 7, extra trailing fields ignored).
* STS12–16 in SentEval format (:func:`load_senteval_sts`): ``STS.input.<name>.txt`` (two
  tab-separated sentences per line) + ``STS.gs.<name>.txt`` (one score per line; a blank score
  skips the pair). The headline number is the "all" setting of SimCSE: Spearman over all subsets
  concatenated; per-subset numbers and their (weighted) means are reported beside it.
* SICK-R (:func:`load_sick`): ``SICK.txt`` rows whose ``SemEval_set`` is ``TEST``, score
  ``relatedness_score``.
* The same STS tasks from the Hugging Face hub (:func:`load_hub_sts`, needs ``datasets`` and a
  network or a warm hub cache).
* Retrieval on BEIR folders (:func:`evaluate_retrieval`): exact search in corpus chunks (top-k per
  chunk merged into a running top-k, never a full queries × corpus matrix); MRR@10, nDCG@10,
  Recall@100 and Recall@1000.

Every result also carries ``parameters`` (when the model is an ``nn.Module`` or a bound method of
one), ``embedding_dim``, ``sentences_encoded``, ``encode_seconds`` and ``sentences_per_second``.

Conventions: STS correlations are ×100 (the literature's convention); retrieval metrics are
fractions in [0, 1] (BEIR's convention).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .stsb import read_stsb

PathLike = Union[str, "os.PathLike[str]"]

#: default chunk of corpus texts encoded and searched at a time in retrieval
CORPUS_CHUNK_SIZE = 50_000
#: default block of queries scored against one corpus chunk at a time
QUERY_CHUNK_SIZE = 1024

#: Hugging Face hub datasets for the STS tasks: (dataset id, default split). All have the columns
#: ``sentence1``, ``sentence2``, ``score``. The MTEB copies of STS12–16 hold the SentEval "all"
#: setting (every subset of the year's test set). Note: ``mteb/sickr-sts`` holds all 9,927 SICK pairs,
#: not only the 4,927 pairs of the SemEval TEST split that :func:`load_sick` reads from ``SICK.txt``.
HUB_STS_DATASETS: dict[str, tuple[str, str]] = {
    "stsb": ("mteb/stsbenchmark-sts", "test"),
    "sts12": ("mteb/sts12-sts", "test"),
    "sts13": ("mteb/sts13-sts", "test"),
    "sts14": ("mteb/sts14-sts", "test"),
    "sts15": ("mteb/sts15-sts", "test"),
    "sts16": ("mteb/sts16-sts", "test"),
    "sickr": ("mteb/sickr-sts", "test"),
}
STS_TASKS = tuple(HUB_STS_DATASETS)
RETRIEVAL_TASKS = ("beir", "retrieval")


class STSData(NamedTuple):
    """Scored sentence pairs: ``sents1[i]`` and ``sents2[i]`` with gold score ``scores[i]``."""

    sents1: list[str]
    sents2: list[str]
    scores: list[float]


class BEIRData(NamedTuple):
    """A BEIR split: ``qrels[query_id][doc_id] = relevance`` (only queries with a judgment)."""

    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]


# ---------------------------------------------------------------------------------------------
# correlation
# ---------------------------------------------------------------------------------------------
def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group_of_sorted = np.cumsum(starts_group) - 1
    bounds = np.r_[np.flatnonzero(starts_group), len(values)]
    mean_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[group_of_sorted]
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation in float64; NaN when either side is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {len(x)}")
    xc, yc = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denominator if denominator > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of the average ranks, ties handled like scipy)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    return pearson(_average_ranks(x), _average_ranks(y))


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
# STS loading
# ---------------------------------------------------------------------------------------------
def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 file split on newlines only (some STS sentences contain other Unicode line
    separators, which ``str.splitlines`` would split on), without the final empty line."""
    text = path.read_text(encoding="utf-8")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


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


def load_senteval_sts(folder: PathLike) -> dict[str, STSData]:
    """Read a SentEval-format STS folder (e.g. ``STS12-en-test``): for every ``STS.input.<name>.txt``
    the gold file ``STS.gs.<name>.txt``; pairs whose gold line is blank are skipped (not scored).
    Returns ``{name: STSData}`` sorted by name."""
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        raise FileNotFoundError(f"STS folder {folder} does not exist or is not a folder")
    inputs = sorted(folder.glob("STS.input.*.txt"))
    if not inputs:
        raise FileNotFoundError(f"STS folder {folder} has no STS.input.<name>.txt files")
    subsets = {}
    for input_path in inputs:
        name = input_path.name[len("STS.input."):-len(".txt")]
        gold_path = folder / f"STS.gs.{name}.txt"
        if not gold_path.is_file():
            raise FileNotFoundError(f"{input_path.name} has no gold file {gold_path.name} in {folder}")
        pairs, golds = _read_lines(input_path), _read_lines(gold_path)
        if len(pairs) != len(golds):
            raise ValueError(
                f"{input_path} has {len(pairs)} lines but {gold_path.name} has {len(golds)}: "
                "they must align line by line"
            )
        sents1, sents2, scores = [], [], []
        for line_no, (pair, gold) in enumerate(zip(pairs, golds), start=1):
            if not gold.strip():
                continue
            fields = pair.split("\t")
            if len(fields) < 2:
                raise ValueError(f"{input_path}:{line_no}: expected two tab-separated sentences")
            try:
                score = float(gold)
            except ValueError:
                raise ValueError(f"{gold_path}:{line_no}: gold score is not a number: {gold!r}") from None
            sents1.append(fields[0])
            sents2.append(fields[1])
            scores.append(score)
        if scores:
            subsets[name] = STSData(sents1, sents2, scores)
    if not subsets:
        raise ValueError(f"STS folder {folder} has no scored pairs")
    return subsets


SICK_FILENAMES = ("SICK.txt", "SICK_test_annotated.txt")


def load_sick(path: PathLike, split: str = "TEST") -> STSData:
    """Read SICK relatedness from ``SICK.txt`` (a file, or a folder holding it): tab-separated with a
    header; rows whose ``SemEval_set`` equals ``split`` (``TEST``, ``TRAIN``, ``TRIAL``), score
    ``relatedness_score``. A file without a ``SemEval_set`` column (SentEval's
    ``SICK_test_annotated.txt``) is taken whole."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        found = [path / name for name in SICK_FILENAMES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"SICK folder {path} has none of {', '.join(SICK_FILENAMES)}")
        path = found[0]
    path = _require_file(path, "SICK file")
    lines = _read_lines(path)
    if not lines:
        raise ValueError(f"{path} is empty")
    header = lines[0].split("\t")
    columns = {name.strip(): i for i, name in enumerate(header)}
    for needed in ("sentence_A", "sentence_B", "relatedness_score"):
        if needed not in columns:
            raise ValueError(f"{path}: header has no {needed!r} column (header: {header})")
    a, b, score_col = columns["sentence_A"], columns["sentence_B"], columns["relatedness_score"]
    set_col = columns.get("SemEval_set")
    sents1, sents2, scores = [], [], []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < len(header):
            raise ValueError(f"{path}:{line_no}: expected {len(header)} tab-separated fields, got {len(fields)}")
        if set_col is not None and fields[set_col].strip() != split:
            continue
        try:
            score = float(fields[score_col])
        except ValueError:
            raise ValueError(f"{path}:{line_no}: relatedness_score is not a number: {fields[score_col]!r}") from None
        sents1.append(fields[a])
        sents2.append(fields[b])
        scores.append(score)
    if not scores:
        raise ValueError(f"{path} has no rows with SemEval_set == {split!r}")
    return STSData(sents1, sents2, scores)


def load_hub_sts(task: str, split: Optional[str] = None, *, dataset_id: Optional[str] = None) -> STSData:
    """An STS task from the Hugging Face hub (see :data:`HUB_STS_DATASETS`), via ``datasets``.
    ``dataset_id`` overrides the dataset for ``task`` (it must have sentence1/sentence2/score)."""
    if task not in HUB_STS_DATASETS and dataset_id is None:
        raise ValueError(f"task must be one of {', '.join(STS_TASKS)}, got {task!r}")
    default_id, default_split = HUB_STS_DATASETS.get(task, (None, "test"))
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("loading STS tasks from the hub needs `datasets` (pip install datasets)") from exc
    data = datasets.load_dataset(dataset_id or default_id, split=split or default_split)
    missing = {"sentence1", "sentence2", "score"} - set(data.column_names)
    if missing:
        raise ValueError(f"hub dataset {dataset_id or default_id} lacks columns {sorted(missing)}")
    return STSData(list(data["sentence1"]), list(data["sentence2"]), [float(s) for s in data["score"]])


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

        >>> evaluate_sts(encoder, "../shared/data/sts/stsbenchmark/sts-dev.csv", batch_size=128)["spearman"]
    """
    data = _as_sts_data(pairs_or_path)
    if len(data.scores) < 2:
        raise ValueError(f"STS evaluation needs at least 2 scored pairs, got {len(data.scores)}")
    stats = _stats_for(model, batch_size)
    with stats.evaluating():
        cosine = _cosine_scores(stats, data)
    task = name or (Path(str(pairs_or_path)).stem if isinstance(pairs_or_path, (str, os.PathLike)) else "sts")
    return {"task": task, **_correlations(cosine, data.scores), **stats.summary()}


def evaluate_sts_subsets(model: Any, subsets: Mapping[str, STSData], *, batch_size: int = 64,
                         name: str = "sts") -> dict:
    """STS over several subsets. The headline ``spearman``/``pearson`` are the "all" setting (every
    subset concatenated, one correlation); ``subsets`` holds each subset's numbers and
    ``mean_spearman``/``wmean_spearman`` their plain and size-weighted means (SentEval's numbers)."""
    if not subsets:
        raise ValueError("subsets is empty")
    stats = _stats_for(model, batch_size)
    per_subset, all_cosine, all_gold = {}, [], []
    with stats.evaluating():
        for subset_name, data in subsets.items():
            cosine = _cosine_scores(stats, data)
            per_subset[subset_name] = _correlations(cosine, data.scores) if len(data.scores) >= 2 else {
                "spearman": float("nan"), "pearson": float("nan"), "n": len(data.scores)}
            all_cosine.append(cosine)
            all_gold.extend(data.scores)
    sizes = np.array([s["n"] for s in per_subset.values()], dtype=np.float64)
    values = np.array([s["spearman"] for s in per_subset.values()], dtype=np.float64)
    result = {"task": name, **_correlations(np.concatenate(all_cosine), all_gold)}
    result["mean_spearman"] = float(values.mean())
    result["wmean_spearman"] = float((values * sizes).sum() / sizes.sum())
    result["subsets"] = per_subset
    return {**result, **stats.summary()}


def evaluate_senteval_sts(model: Any, folder: PathLike, *, batch_size: int = 64, name: Optional[str] = None) -> dict:
    """SentEval-format STS12–16 folder, "all" setting (see :func:`evaluate_sts_subsets`)."""
    return evaluate_sts_subsets(model, load_senteval_sts(folder), batch_size=batch_size,
                                name=name or Path(str(folder)).name)


def evaluate_sick(model: Any, path: PathLike, *, batch_size: int = 64) -> dict:
    """SICK-R: the SemEval TEST rows of ``SICK.txt`` (see :func:`load_sick`)."""
    return evaluate_sts(model, load_sick(path), batch_size=batch_size, name="sickr")


def evaluate_hub_sts(model: Any, task: str, *, split: Optional[str] = None, batch_size: int = 64,
                     dataset_id: Optional[str] = None) -> dict:
    """An STS task from the hub (see :data:`HUB_STS_DATASETS`)."""
    return evaluate_sts(model, load_hub_sts(task, split, dataset_id=dataset_id), batch_size=batch_size, name=task)


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None


def load_beir(folder: PathLike, split: str = "test") -> BEIRData:
    """Read a BEIR folder: ``corpus.jsonl`` (``_id``, ``title``, ``text``; a document's text is
    ``title + " " + text``), ``queries.jsonl`` (``_id``, ``text``), ``qrels/<split>.tsv``
    (query-id, corpus-id, score; a header line is skipped). Keeps the queries that have at least one
    judgment with score > 0 and a text in queries.jsonl, in qrels order."""
    folder = Path(os.path.expanduser(str(folder)))
    corpus_path = _require_file(folder / "corpus.jsonl", "BEIR corpus")
    queries_path = _require_file(folder / "queries.jsonl", "BEIR queries")
    qrels_path = _require_file(folder / "qrels" / f"{split}.tsv", "BEIR qrels")

    qrels: dict[str, dict[str, int]] = {}
    for line_no, line in enumerate(_read_lines(qrels_path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            raise ValueError(f"{qrels_path}:{line_no}: expected query-id, corpus-id, score")
        try:
            relevance = int(float(fields[2]))
        except ValueError:
            if line_no == 1:  # header
                continue
            raise ValueError(f"{qrels_path}:{line_no}: score is not a number: {fields[2]!r}") from None
        qrels.setdefault(fields[0], {})[fields[1]] = relevance

    corpus_ids, corpus_texts = [], []
    for line_no, row in _read_jsonl(corpus_path):
        if "_id" not in row:
            raise ValueError(f"{corpus_path}:{line_no}: document has no '_id'")
        corpus_ids.append(str(row["_id"]))
        corpus_texts.append(f"{row.get('title') or ''} {row.get('text') or ''}".strip())
    query_text = {}
    for line_no, row in _read_jsonl(queries_path):
        if "_id" not in row:
            raise ValueError(f"{queries_path}:{line_no}: query has no '_id'")
        query_text[str(row["_id"])] = str(row.get("text") or "")

    kept = {q: rels for q, rels in qrels.items() if q in query_text and any(r > 0 for r in rels.values())}
    if not kept:
        raise ValueError(f"{folder}: no query in qrels/{split}.tsv has a relevant document and a text")
    if not corpus_ids:
        raise ValueError(f"{corpus_path} has no documents")
    return BEIRData(corpus_ids, corpus_texts, list(kept), [query_text[q] for q in kept], kept)


def _topk_lowest_index_on_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row ordered by (score desc, column asc). ``torch.topk`` may pick any of the
    tied columns at the cut; rows where ties straddle the cut are redone with a stable sort, so the
    result equals the first k columns of a stable descending sort of the row."""
    values, columns = scores.topk(k, dim=1)
    kth = values[:, -1:]
    straddling = (scores == kth).sum(1) > (values == kth).sum(1)
    if straddling.any():
        rows = straddling.nonzero().squeeze(1)
        exact = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows], columns[rows] = exact.values[:, :k], exact.indices[:, :k]
    by_column = columns.argsort(dim=1)
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    by_score = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_score), columns.gather(1, by_score)


class RunningTopK:
    """Top-k corpus rows per query over a corpus seen chunk by chunk (memory: queries × k, plus one
    query block × corpus chunk of scores). Ties are broken by the lower corpus index, so the result
    equals a stable sort of the full queries × corpus score matrix.

    Per chunk: :meth:`start_chunk`, :meth:`add` for every query block, then :meth:`advance`."""

    def __init__(self, num_queries: int, k: int, device=None):
        if not (isinstance(k, int) and k > 0):
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.scores = torch.full((num_queries, 0), float("-inf"), device=device)
        self.indices = torch.zeros((num_queries, 0), dtype=torch.long, device=device)
        self.seen = 0

    def start_chunk(self, chunk_size: int) -> None:
        """Widen the running top-k to min(k, rows seen so far) before the blocks of a new chunk."""
        width = min(self.k, self.seen + chunk_size)
        pad = width - self.scores.shape[1]
        if pad > 0:
            self.scores = F.pad(self.scores, (0, pad), value=float("-inf"))
            self.indices = F.pad(self.indices, (0, pad), value=-1)

    def add(self, chunk_scores: torch.Tensor, rows: slice = slice(None)) -> None:
        """Merge the scores of query ``rows`` against the current corpus chunk (columns are the
        chunk's rows; chunk row j is corpus row ``seen + j``)."""
        k = min(self.k, chunk_scores.shape[1])
        values, columns = _topk_lowest_index_on_ties(chunk_scores.float(), k)
        # Earlier chunks hold lower corpus indices and come first: a stable sort keeps them first on
        # ties. Padding (-inf) sorts last and is always cut: there are >= width real candidates.
        merged_values = torch.cat([self.scores[rows], values], dim=1)
        merged_indices = torch.cat([self.indices[rows], columns + self.seen], dim=1)
        keep = torch.sort(merged_values, dim=1, descending=True, stable=True).indices[:, : self.scores.shape[1]]
        self.scores[rows] = merged_values.gather(1, keep)
        self.indices[rows] = merged_indices.gather(1, keep)

    def advance(self, chunk_size: int) -> None:
        self.seen += chunk_size


def _split(tensor: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, tensor.shape[0], size):
        yield tensor[start:start + size]


def exact_search(queries: torch.Tensor, corpus: Union[torch.Tensor, Iterable[torch.Tensor]], k: int, *,
                 score: str = "cos", corpus_chunk_size: int = CORPUS_CHUNK_SIZE,
                 query_chunk_size: int = QUERY_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k search of ``queries`` (Q, d) over ``corpus``: a (C, d) matrix, searched in chunks of
    ``corpus_chunk_size`` rows, or an iterable of consecutive chunks (C_i, d) (e.g. encoded lazily).

    ``score``: "cos" (cosine) or "dot". Returns ``(scores, indices)``, each (Q, min(k, C)), rows
    ordered by score descending, ties by lower corpus index. Never forms the full Q × C matrix.
    """
    if score not in ("cos", "dot"):
        raise ValueError(f"score must be 'cos' or 'dot', got {score!r}")
    if queries.ndim != 2:
        raise ValueError(f"queries must be a (Q, d) matrix, got shape {tuple(queries.shape)}")
    queries = queries.float()
    if score == "cos":
        queries = F.normalize(queries, dim=1)
    if isinstance(corpus, torch.Tensor):
        if corpus.ndim != 2:
            raise ValueError(f"corpus must be a (C, d) matrix, got shape {tuple(corpus.shape)}")
        corpus = _split(corpus, corpus_chunk_size)
    top = RunningTopK(queries.shape[0], k, device=queries.device)
    for chunk in corpus:
        if chunk.ndim != 2 or chunk.shape[1] != queries.shape[1]:
            raise ValueError(f"corpus chunks must be (C_i, {queries.shape[1]}), got shape {tuple(chunk.shape)}")
        if chunk.shape[0] == 0:
            continue
        chunk = chunk.to(device=queries.device, dtype=torch.float32)
        if score == "cos":
            chunk = F.normalize(chunk, dim=1)
        top.start_chunk(chunk.shape[0])
        for start in range(0, queries.shape[0], query_chunk_size):
            rows = slice(start, start + query_chunk_size)
            top.add(queries[rows] @ chunk.T, rows)
        top.advance(chunk.shape[0])
    if top.seen == 0:
        raise ValueError("the corpus is empty")
    return top.scores, top.indices


def ranking_metrics(rankings: Sequence[Sequence[Any]], qrels: Sequence[Mapping[Any, int]], *,
                    mrr_k: int = 10, ndcg_k: int = 10, recall_ks: Sequence[int] = (100, 1000)) -> dict:
    """Mean over queries of MRR@mrr_k, nDCG@ndcg_k and Recall@k (trec_eval definitions).

    ``rankings[q]``: document ids, best first; ``qrels[q]``: ``{doc_id: relevance}``. A document is
    relevant when its relevance is > 0. nDCG uses linear gains ``rel / log2(rank + 1)``, the ideal
    ranking being the query's judged relevances sorted descending; Recall@k divides by the number of
    relevant documents of the query (retrievable or not).
    """
    if len(rankings) != len(qrels):
        raise ValueError(f"rankings and qrels must have one entry per query, got {len(rankings)} and {len(qrels)}")
    if not rankings:
        raise ValueError("no queries to score")
    depth = max(mrr_k, ndcg_k, *recall_ks)
    discounts = 1.0 / np.log2(np.arange(2, depth + 2))
    mrr, ndcg, recall = 0.0, 0.0, {k: 0.0 for k in recall_ks}
    for ranking, judged in zip(rankings, qrels):
        gains = np.array([max(judged.get(doc, 0), 0) for doc in list(ranking)[:depth]], dtype=np.float64)
        relevant = gains > 0
        first = np.flatnonzero(relevant[:mrr_k])
        mrr += 1.0 / (first[0] + 1) if len(first) else 0.0
        ideal = np.sort(np.array([r for r in judged.values() if r > 0], dtype=np.float64))[::-1][:ndcg_k]
        idcg = float(ideal @ discounts[: len(ideal)])
        dcg = float(gains[:ndcg_k] @ discounts[: len(gains[:ndcg_k])])
        ndcg += dcg / idcg if idcg > 0 else 0.0
        num_relevant = sum(1 for r in judged.values() if r > 0)
        for k in recall_ks:
            recall[k] += float(relevant[:k].sum()) / num_relevant if num_relevant else 0.0
    n = len(rankings)
    result = {f"mrr@{mrr_k}": mrr / n, f"ndcg@{ndcg_k}": ndcg / n}
    result.update({f"recall@{k}": recall[k] / n for k in recall_ks})
    return result


def evaluate_retrieval(model: Any, folder_or_data: Union[PathLike, BEIRData], *, split: str = "test",
                       batch_size: int = 64, corpus_chunk_size: int = CORPUS_CHUNK_SIZE,
                       query_chunk_size: int = QUERY_CHUNK_SIZE, score: str = "cos",
                       mrr_k: int = 10, ndcg_k: int = 10, recall_ks: Sequence[int] = (100, 1000),
                       ignore_identical_ids: bool = True, query_prefix: str = "", document_prefix: str = "") -> dict:
    """Retrieval on a BEIR folder: the corpus is encoded and searched chunk by chunk (exact search,
    top-k per chunk merged), so memory is bounded by the chunk size, not the corpus size.

    ``ignore_identical_ids`` drops a retrieved document whose id equals the query id (BEIR's default:
    some datasets put the query itself in the corpus). ``query_prefix``/``document_prefix`` are
    prepended to the texts (for models trained with instructions).

    Returns ``{"task", "mrr@10", "ndcg@10", "recall@100", "recall@1000", "num_queries",
    "corpus_size", "parameters", "embedding_dim", ...}`` (metrics as fractions in [0, 1]).
    """
    if not (isinstance(corpus_chunk_size, int) and corpus_chunk_size > 0):
        raise ValueError(f"corpus_chunk_size must be a positive int, got {corpus_chunk_size!r}")
    data = folder_or_data if isinstance(folder_or_data, BEIRData) else load_beir(folder_or_data, split)
    stats = _stats_for(model, batch_size)
    depth = max(mrr_k, ndcg_k, *recall_ks) + (1 if ignore_identical_ids else 0)
    with stats.evaluating():
        queries = stats.encode([query_prefix + q for q in data.query_texts])

        def corpus_chunks() -> Iterator[torch.Tensor]:
            for start in range(0, len(data.corpus_texts), corpus_chunk_size):
                yield stats.encode([document_prefix + t for t in data.corpus_texts[start:start + corpus_chunk_size]])

        _, indices = exact_search(queries, corpus_chunks(), depth, score=score, query_chunk_size=query_chunk_size)
    indices = indices.cpu().numpy()
    rankings = []
    for query_id, row in zip(data.query_ids, indices):
        ranked = [data.corpus_ids[i] for i in row if i >= 0]
        if ignore_identical_ids:
            ranked = [doc for doc in ranked if doc != query_id]
        rankings.append(ranked)
    metrics = ranking_metrics(rankings, [data.qrels[q] for q in data.query_ids],
                              mrr_k=mrr_k, ndcg_k=ndcg_k, recall_ks=recall_ks)
    name = Path(str(folder_or_data)).name if not isinstance(folder_or_data, BEIRData) else "beir"
    return {"task": name, **metrics, "num_queries": len(data.query_ids), "corpus_size": len(data.corpus_ids),
            **stats.summary()}


# ---------------------------------------------------------------------------------------------
# one entry point
# ---------------------------------------------------------------------------------------------
def evaluate(model: Any, task: str, path: Optional[PathLike] = None, *, batch_size: int = 64,
             split: Optional[str] = None, **kwargs) -> dict:
    """Run one task by name.

    * ``"stsb"``: ``path`` is an STS-B file, or the ``stsbenchmark`` folder (then ``split`` picks
      ``sts-<split>.csv``, default ``test``); without ``path`` the hub copy.
    * ``"sts12"`` … ``"sts16"``: ``path`` is a SentEval folder; without ``path`` the hub copy.
    * ``"sickr"``: ``path`` is ``SICK.txt`` or its folder; without ``path`` the hub copy.
    * ``"beir"`` / ``"retrieval"``: ``path`` is a BEIR folder (``split`` picks the qrels file).
    """
    task = task.lower()
    if task in RETRIEVAL_TASKS:
        if path is None:
            raise ValueError("retrieval needs path: a BEIR folder with corpus.jsonl, queries.jsonl and qrels/")
        return evaluate_retrieval(model, path, split=split or "test", batch_size=batch_size, **kwargs)
    if task not in STS_TASKS:
        raise ValueError(f"task must be one of {', '.join(STS_TASKS + RETRIEVAL_TASKS)}, got {task!r}")
    if kwargs:
        raise TypeError(f"unexpected options for an STS task: {', '.join(sorted(kwargs))}")
    if path is None:
        return evaluate_hub_sts(model, task, split=split, batch_size=batch_size)
    path = Path(os.path.expanduser(str(path)))
    if task == "stsb":
        if path.is_dir():
            path = path / f"sts-{split or 'test'}.csv"
        result = evaluate_sts(model, path, batch_size=batch_size, name="stsb")
        result["split"] = split or path.stem.replace("sts-", "")
        return result
    if task == "sickr":
        return evaluate_sick(model, path, batch_size=batch_size)
    return evaluate_senteval_sts(model, path, batch_size=batch_size, name=task)


def format_result(result: Mapping[str, Any]) -> str:
    """One line for logs: the headline metrics, then size and speed."""
    keys = [k for k in ("spearman", "pearson", "mrr@10", "ndcg@10", "recall@100", "recall@1000") if k in result]
    metrics = " ".join(f"{k}={result[k]:.2f}" if k in ("spearman", "pearson") else f"{k}={result[k]:.4f}" for k in keys)
    params = result.get("parameters")
    params_text = f"{params / 1e6:.2f}M params" if params else "params n/a"
    speed = result.get("sentences_per_second", float("nan"))
    return (f"{result.get('task', '?')}: {metrics} (n={result.get('n', result.get('num_queries'))}, "
            f"dim={result.get('embedding_dim')}, {params_text}, {speed:.0f} sent/s)")
