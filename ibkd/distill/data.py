"""Readers for the corpora and labeled sets that ``ibkd`` trains and evaluates on.

* :func:`read_sentences` — unlabeled sentences: ``.txt`` (one per line), ``.jsonl`` / ``.csv`` / ``.tsv``
  (one column), or a ``datasets`` dataset (``hf:<id>[:<split>]``, a ``save_to_disk`` folder, or an object).
  Empty lines are skipped and counted.
* :func:`read_labeled` — stage-2 data: triplets (``sent0,sent1,hard_neg``, the SimCSE csv), pairs
  (``sent0,sent1``), scored pairs (``sent0,sent1,score``) or an STS-B file (scored pairs).
* :func:`read_stsb` — STS Benchmark tsv: no header, quoting off, first 7 fields
  (genre, file, year, id, score, sentence 1, sentence 2).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

TEXT_COLUMNS = ("text", "sentence", "sent0", "sentence1", "anchor")


class DataError(ValueError):
    """Bad or missing input data (reported by the CLI as one line)."""


@dataclass
class ReadStats:
    path: str
    rows: int = 0
    empty_skipped: int = 0

    def __str__(self) -> str:
        return f"{self.path}: {self.rows} rows, {self.empty_skipped} empty skipped"


@dataclass
class LabeledData:
    """Stage-2 examples: anchors[i] ↔ positives[i]; optional hard negatives and scores."""

    anchors: list
    positives: list
    hard_negatives: Optional[list] = None
    scores: Optional[list] = None
    stats: Optional[ReadStats] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.anchors)


def _check_file(path: Union[str, Path]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"file not found: {path}")
    return path


def corpus_hash(sentences: Sequence[str]) -> str:
    """SHA-256 of the sentences in order (separated by a byte that cannot appear in text)."""
    digest = hashlib.sha256()
    for s in sentences:
        digest.update(s.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _pick_column(columns: Sequence[str], column: Optional[str], path) -> str:
    if column is not None:
        if column not in columns:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(columns)})")
        return column
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise DataError(f"{path}: cannot tell the text column among {list(columns)}; pass column=")


def _read_dataset(spec, column: Optional[str], stats: ReadStats) -> list:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("reading a datasets dataset needs the 'datasets' package (pip install datasets)") from exc
    if isinstance(spec, str):
        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        else:
            ds = datasets.load_from_disk(spec)
    else:
        ds = spec
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    col = _pick_column(ds.column_names, column, stats.path)
    return list(ds[col])


def read_sentences(source, column: Optional[str] = None, limit: Optional[int] = None):
    """Return ``(sentences, stats)``; whitespace is stripped, empty rows are skipped and counted."""
    stats = ReadStats(path=str(source) if isinstance(source, (str, Path)) else type(source).__name__)
    if not isinstance(source, (str, Path)) or str(source).startswith("hf:") or (
            Path(source).is_dir() and (Path(source) / "dataset_info.json").exists()):
        raw = _read_dataset(str(source) if isinstance(source, Path) else source, column, stats)
    else:
        path = _check_file(source)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            raw = []
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        stats.empty_skipped += 1
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                    raw.append(row.get(_pick_column(list(row), column, path)) if isinstance(row, dict) else row)
        elif suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                col = _pick_column(reader.fieldnames or [], column, path)
                raw = [row.get(col) for row in reader]
        else:  # plain text, one sentence per line
            with path.open(encoding="utf-8") as f:
                raw = [line.rstrip("\n") for line in f]
    sentences = []
    for item in raw:
        text = "" if item is None else str(item).strip()
        if not text:
            stats.empty_skipped += 1
            continue
        sentences.append(text)
        if limit is not None and len(sentences) >= limit:
            break
    stats.rows = len(sentences)
    return sentences, stats


def read_stsb(path):
    """STS-B tsv → ``(sents1, sents2, scores)``; quoting disabled, extra trailing fields ignored.
    One parser serves training and evaluation (:func:`ibkd.distill.evaluation.load_stsb`); its errors come back
    here as :class:`DataError`, and sentences are stripped."""
    from .evaluation import load_stsb

    path = _check_file(path)
    try:
        s1, s2, scores = load_stsb(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    return [s.strip() for s in s1], [s.strip() for s in s2], list(scores)


def stsb_sentences(path) -> list:
    """Unique sentences of an STS-B file, in first-seen order (extra unlabeled training text)."""
    s1, s2, _ = read_stsb(path)
    return list(dict.fromkeys(s for pair in zip(s1, s2) for s in pair if s))


def read_labeled(path, min_score: Optional[float] = None) -> LabeledData:
    """Stage-2 data from a csv/tsv with a header (``sent0,sent1[,hard_neg][,score]``), a jsonl with the
    same keys, or an STS-B file (no header). Scored pairs with ``min_score`` keep only rows at or above
    it as positives. Rows with an empty anchor or positive are skipped and counted; an empty hard
    negative drops hard negatives for the whole set (they must be all present or all absent)."""
    path = _check_file(path)
    stats = ReadStats(path=str(path))
    suffix = path.suffix.lower()
    rows: list[dict] = []
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    else:
        with path.open(encoding="utf-8", newline="") as f:
            first = f.readline()
        delimiter = "\t" if "\t" in first else ","
        header = [h.strip() for h in first.rstrip("\r\n").split(delimiter)]
        if "sent0" not in header and "anchor" not in header:
            s1, s2, scores = read_stsb(path)  # headerless: STS-B format
            rows = [{"sent0": a, "sent1": b, "score": s} for a, b, s in zip(s1, s2, scores)]
        else:
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f, delimiter=delimiter))
    anchors, positives, negatives, scores = [], [], [], []
    has_neg = any(r.get("hard_neg") not in (None, "") for r in rows)
    has_score = any(r.get("score") not in (None, "") for r in rows)
    for r in rows:
        a = str(r.get("sent0", r.get("anchor")) or "").strip()
        p = str(r.get("sent1", r.get("positive")) or "").strip()
        if not a or not p:
            stats.empty_skipped += 1
            continue
        score = float(r["score"]) if has_score and r.get("score") not in (None, "") else None
        if min_score is not None and score is not None and score < min_score:
            continue
        n = str(r.get("hard_neg") or "").strip() if has_neg else ""
        if has_neg and not n:
            has_neg = False  # a missing hard negative → train without any (never crash)
        anchors.append(a)
        positives.append(p)
        negatives.append(n)
        scores.append(score)
    stats.rows = len(anchors)
    return LabeledData(anchors, positives, negatives if has_neg else None, scores if has_score else None, stats)
