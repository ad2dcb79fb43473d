"""The STS Benchmark files: where they lie under the data folder and how they are read. The one place that
knows either; everything else asks :func:`stsb_path` and :func:`read_stsb`.

Layout: ``<data_dir>/sts/stsbenchmark/sts-{train,dev,test}.csv`` (the archive of the benchmark's site,
unpacked under ``sts/``). Format: tab-separated, no header, no quoting (sentences hold unbalanced double
quotes), fields genre, file, year, id, score (0–5), sentence 1, sentence 2, then in some rows extra fields
(the sources of the pair), ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

from ._io import DataError, numbered_lines, require_file

STSB_SPLITS = ("train", "dev", "test")
#: the benchmark's folder relative to the data folder
STSB_DIR = Path("sts") / "stsbenchmark"
_FIELDS = 7


def stsb_dir(data_dir: Union[str, Path]) -> Path:
    """The folder holding the three split files under ``data_dir``."""
    return Path(data_dir).expanduser() / STSB_DIR


def stsb_path(data_dir: Union[str, Path], split: str) -> Path:
    """``<data_dir>/sts/stsbenchmark/sts-<split>.csv`` (not checked for existence: callers report a missing
    file together with where ``data_dir`` came from)."""
    if split not in STSB_SPLITS:
        raise ValueError(f"STS-B split must be one of {', '.join(STSB_SPLITS)}, got {split!r}")
    return stsb_dir(data_dir) / f"sts-{split}.csv"


def is_stsb_row(line: str) -> bool:
    """Whether a line has the shape of an STS-B row (enough tab-separated fields, a numeric score): tells an
    STS-B file from a csv with a header."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) < _FIELDS:
        return False
    try:
        float(fields[4])
    except ValueError:
        return False
    return True


def read_stsb(path: Union[str, Path]) -> tuple[list[tuple[str, str]], list[float]]:
    """``(pairs, scores)`` of an STS-B file: ``pairs[i] = (sentence1, sentence2)`` as in the file (not
    stripped), ``scores[i]`` its gold score. Blank lines are skipped. A row with too few fields, a score that is
    not a finite number, bytes that are not UTF-8, or a file without a pair is a :class:`DataError` naming the
    file and line."""
    path = require_file(path, "STS-B file")
    pairs, scores = [], []
    for lineno, line in numbered_lines(path):
        line = line.rstrip("\n")
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < _FIELDS:
            raise DataError(f"{path}:{lineno}: expected at least {_FIELDS} tab-separated fields (genre, file, year, "
                            f"id, score, sentence 1, sentence 2), got {len(fields)}")
        try:
            score = float(fields[4])
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DataError(f"{path}:{lineno}: score (field 5) is not a number: {fields[4]!r}")
        pairs.append((fields[5], fields[6]))
        scores.append(score)
    if not scores:
        raise DataError(f"{path} contains no sentence pairs")
    return pairs, scores


def stsb_sentences(path: Union[str, Path]) -> list[str]:
    """Unique sentences of an STS-B file, stripped, in first-seen order (extra unlabeled training text)."""
    pairs, _ = read_stsb(path)
    return list(dict.fromkeys(s.strip() for pair in pairs for s in pair if s.strip()))
