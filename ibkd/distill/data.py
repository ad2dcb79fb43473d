"""Readers for the corpora and labeled sets that ``ibkd`` trains and evaluates on.

* :func:`read_sentences` — unlabeled sentences: ``.txt`` (one per line), ``.jsonl`` / ``.csv`` / ``.tsv``
  (one column), or a ``datasets`` dataset (``hf:<id>[:<split>]``, a ``save_to_disk`` folder, or an object).
  Empty lines are skipped and counted.
* :func:`read_labeled` — stage-2 data: triplets (``sent0,sent1,hard_neg``, the SimCSE csv), pairs
  (``sent0,sent1``), scored pairs (``sent0,sent1,score``) or an STS-B file (scored pairs).
* STS-B files are read by :mod:`ibkd.distill.stsb`.

Every error on a file's content is a :class:`DataError` that starts with ``<file>:<line>:`` (the line where the
offending row starts), so a user can open the file at the place: invalid JSON, a missing column, a row with
the wrong number of fields, a score that is not a number, bytes that are not UTF-8, a broken quoted field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ._io import DataError, numbered_lines, require_file
from .stsb import is_stsb_row, stsb_sentences
from .stsb import read_stsb as _read_stsb_pairs

__all__ = ["DataError", "ReadStats", "LabeledData", "TEXT_COLUMNS", "corpus_hash", "read_sentences", "read_labeled",
           "read_stsb", "stsb_sentences"]

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
log = logging.getLogger("ibkd.distill.data")

TEXT_COLUMNS = ("text", "sentence", "sent0", "sentence1", "anchor")
_ANCHOR, _POSITIVE = ("sent0", "anchor"), ("sent1", "positive")


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


def corpus_hash(sentences: Sequence[str]) -> str:
    """SHA-256 of the sentences in order (separated by a byte that cannot appear in text)."""
    digest = hashlib.sha256()
    for s in sentences:
        digest.update(s.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _pick_column(columns: Sequence[str], column: Optional[str], where) -> str:
    if column is not None:
        if column not in columns:
            raise DataError(f"{where}: no column {column!r} (columns: {', '.join(map(str, columns))})")
        return column
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise DataError(f"{where}: cannot tell the text column among {list(columns)}; pass column= (one of "
                    f"{', '.join(TEXT_COLUMNS)} is found by itself)")


# -- row readers: (line, row) of a file, every error naming the line ---------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """``(line, value)`` of every non-blank line of a JSON-lines file; blank lines yield ``(line, None)``."""
    for lineno, line in numbered_lines(path):
        if not line.strip():
            yield lineno, None
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[int, list]]:
    """``(line where the record starts, fields)`` of a csv/tsv file; blank lines yield ``(line, [])``.

    ``strict``: a quoted field that is never closed, or text after a closing quote, is an error at its line.
    The lenient default reads the first as "the rest of the file is one field" and silently mangles the
    second."""
    lines = numbered_lines(path)
    reader = csv.reader((line for _, line in lines), delimiter=delimiter, strict=True)
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            kind = "tsv" if delimiter == "\t" else "csv"
            raise DataError(f"{path}:{start}: malformed {kind} ({exc}); a field that starts with a double quote "
                            f"must end with one, and inner quotes are doubled") from None
        yield start, record
        start = reader.line_num + 1


def _header_and_rows(path: Path, delimiter: str) -> Iterator[tuple[int, Optional[dict]]]:
    """``(line, {column: value})`` of a csv/tsv file with a header line; blank lines yield ``(line, None)``.
    The first item is ``(line, header)`` with the header as a dict of column → column."""
    records = _csv_records(path, delimiter)
    header_line, header = next(((lineno, record) for lineno, record in records if record), (1, None))
    if header is None:
        return
    header = [h.strip() for h in header]
    yield header_line, dict(zip(header, header))
    for lineno, record in records:
        if not record:
            yield lineno, None
            continue
        if len(record) != len(header):
            raise DataError(f"{path}:{lineno}: {len(record)} fields, but the header has {len(header)} "
                            f"({', '.join(header)})")
        yield lineno, dict(zip(header, record))


def _text(value, path: Path, lineno: int, column: str) -> str:
    """A cell as text ("" for null); anything but a string (a number, a list, an object) is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: {column!r} holds {type(value).__name__} {json.dumps(value)[:60]}, "
                        f"not text")
    return value


# -- unlabeled sentences -----------------------------------------------------------------------------------

def _read_dataset(spec, column: Optional[str], stats: ReadStats) -> list:
    import datasets

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


def _jsonl_texts(path: Path, column: Optional[str]) -> Iterator[str]:
    """A JSON string per line is a sentence; an object gives its text column, chosen on the first object and
    required in every other."""
    for lineno, row in _jsonl_rows(path):
        if row is None or isinstance(row, str):
            yield row or ""
        elif isinstance(row, dict):
            if column is None:
                column = _pick_column(list(row), None, f"{path}:{lineno}")
            elif column not in row:
                raise DataError(f"{path}:{lineno}: no {column!r} key (this row has: {', '.join(row) or 'none'})")
            yield _text(row[column], path, lineno, column)
        else:
            raise DataError(f"{path}:{lineno}: expected a JSON object or string, got {type(row).__name__}")


def _csv_texts(path: Path, column: Optional[str], delimiter: str) -> Iterator[str]:
    rows = _header_and_rows(path, delimiter)
    first = next(rows, None)
    if first is None:
        return
    column = _pick_column(list(first[1]), column, f"{path}:{first[0]}")
    for _, row in rows:
        yield "" if row is None else row[column]


def _txt_texts(path: Path) -> Iterator[str]:
    for _, line in numbered_lines(path):
        yield line.rstrip("\n")


def read_sentences(source, column: Optional[str] = None, limit: Optional[int] = None):
    """Return ``(sentences, stats)``; whitespace is stripped, empty rows are skipped and counted."""
    stats = ReadStats(path=str(source) if isinstance(source, (str, Path)) else type(source).__name__)
    if not isinstance(source, (str, Path)) or str(source).startswith("hf:") or (
            Path(source).is_dir() and (Path(source) / "dataset_info.json").exists()):
        raw = iter(_read_dataset(str(source) if isinstance(source, Path) else source, column, stats))
    else:
        path = require_file(source)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            raw = _jsonl_texts(path, column)
        elif suffix in (".csv", ".tsv"):
            raw = _csv_texts(path, column, "\t" if suffix == ".tsv" else ",")
        else:  # plain text, one sentence per line
            raw = _txt_texts(path)
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
    """An STS-B file as ``(sents1, sents2, scores)``, sentences stripped (the shape the trainers take); the
    file itself is read by :func:`ibkd.distill.stsb.read_stsb`."""
    pairs, scores = _read_stsb_pairs(path)
    return [a.strip() for a, _ in pairs], [b.strip() for _, b in pairs], scores


# -- labeled pairs -----------------------------------------------------------------------------------------

def _labeled_rows(path: Path) -> Iterator[tuple[Optional[int], Optional[dict]]]:
    """``(line, row)`` with the keys of the file (``sent0``/``anchor``, ``sent1``/``positive``, optional
    ``hard_neg``, ``score``); STS-B files give rows without line numbers (their reader checks them)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for lineno, row in _jsonl_rows(path):
            if row is None:
                continue
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with sent0 and sent1, got "
                                f"{type(row).__name__}")
            for names in (_ANCHOR, _POSITIVE):
                if not any(n in row for n in names):
                    raise DataError(f"{path}:{lineno}: no {' or '.join(names)} key (this row has: "
                                    f"{', '.join(row) or 'none'})")
            yield lineno, row
        return
    with closing(numbered_lines(path)) as lines:
        first = next((line for _, line in lines if line.strip()), "")
    if is_stsb_row(first):  # headerless: STS-B format
        pairs, scores = _read_stsb_pairs(path)
        for (a, b), s in zip(pairs, scores):
            yield None, {"sent0": a, "sent1": b, "score": s}
        return
    rows = _header_and_rows(path, "\t" if "\t" in first else ",")
    header_line, header = next(rows, (1, {}))
    header = list(header)
    for names in (_ANCHOR, _POSITIVE):
        if not any(n in header for n in names):
            raise DataError(f"{path}:{header_line}: the header ({', '.join(header) or 'empty'}) has no "
                            f"{' or '.join(names)} column; stage-2 data needs a header sent0,sent1[,hard_neg][,score], "
                            f"or STS-B rows")
    yield from rows


def _score(value, path: Path, lineno: Optional[int]) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        score = math.nan if isinstance(value, bool) else float(value)  # JSON true is no score
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise DataError(f"{path}:{lineno}: score {value!r} is not a number")
    return score


def read_labeled(path, min_score: Optional[float] = None) -> LabeledData:
    """Stage-2 data from a csv/tsv with a header (``sent0,sent1[,hard_neg][,score]``), a jsonl with the
    same keys, or an STS-B file (no header). Scored pairs with ``min_score`` keep only rows at or above
    it as positives. Rows with an empty anchor or positive are skipped and counted; scores are all present
    or all absent. An empty hard negative drops hard negatives for the whole set (they must be all present
    or all absent), with a warning naming the row."""
    path = require_file(path)
    stats = ReadStats(path=str(path))
    rows = []
    for lineno, r in _labeled_rows(path):
        if r is None:
            continue
        a = _text(r.get("sent0", r.get("anchor")), path, lineno, "sent0")
        p = _text(r.get("sent1", r.get("positive")), path, lineno, "sent1")
        n = _text(r.get("hard_neg"), path, lineno, "hard_neg")
        rows.append((lineno, a.strip(), p.strip(), n.strip(), _score(r.get("score"), path, lineno)))
    has_neg = any(n for *_, n, _ in rows)
    scored = [lineno for lineno, *_, s in rows if s is not None]
    if scored and len(scored) != len(rows):
        lineno = next(lineno for lineno, *_, s in rows if s is None)
        raise DataError(f"{path}:{lineno}: no score, but other rows (e.g. line {scored[0]}) have one")
    anchors, positives, negatives, scores = [], [], [], []
    for lineno, a, p, n, score in rows:
        if not a or not p:
            stats.empty_skipped += 1
            continue
        if min_score is not None and score is not None and score < min_score:
            continue
        if has_neg and not n:
            log.warning("%s:%s: no hard negative; training on this set without hard negatives", path, lineno)
            has_neg = False
        anchors.append(a)
        positives.append(p)
        negatives.append(n)
        scores.append(score)
    stats.rows = len(anchors)
    return LabeledData(anchors, positives, negatives if has_neg else None, scores if scored else None, stats)
