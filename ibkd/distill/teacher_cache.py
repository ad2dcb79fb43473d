"""Teacher embeddings of a corpus, computed once and kept on disk, memory-mapped.

A cache lives in ``<cache_dir>/<key>/`` where the key hashes the teacher identity (name + weights hash),
pooling, normalisation, max length and the corpus hash. Files:

* ``embeddings.f32`` — N × D float32, row-major, preallocated; filled in chunks;
* ``progress.json`` — rows done so far (fsynced after each chunk), so an interrupted build continues;
* ``meta.json`` — the key fields, N, D and the SHA-256 and size of the finished matrix; written last;
* ``pca<d>.npy`` + ``pca<d>.json`` — optional PCA of the matrix to ``d`` dims, and its SHA-256 and size;
* ``build.lock`` — held (``flock``) by the one process building the cache; others wait, then read it.

A folder without ``meta.json`` is an unfinished build and is continued. Once finished, every read checks the
files against their recorded size and SHA-256 (:mod:`ibkd.distill.integrity`): damage (flipped bits,
truncation, an emptied file, an unreadable ``meta.json``) is an :class:`~ibkd.distill.integrity.IntegrityError`
naming the file and saying that deleting the cache folder rebuilds it; it is never used, and never rebuilt
behind the user's back (damage on a disk that held finished files is worth knowing about).
:func:`load_teacher_matrix` reads user-provided ``.pt``/``.npy`` matrices instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ._io import atomic_write, atomic_write_text, clean_leftovers
from .data import DataError, corpus_hash
from .integrity import IntegrityError, check_file, file_record

log = logging.getLogger("ibkd.distill.teacher_cache")

CACHE_VERSION = 1


def cache_key(teacher_identity: dict, sentences: Sequence[str]) -> tuple[str, dict]:
    fields = dict(version=CACHE_VERSION, teacher=teacher_identity, corpus_sha256=corpus_hash(sentences),
                  rows=len(sentences))
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return key, fields


def _remedy(folder: Path) -> str:
    return f"delete the cache folder {folder} and run again to rebuild it"


def _read_json(path: Path, folder: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError
        return meta
    except (OSError, UnicodeDecodeError, ValueError):
        raise IntegrityError(f"teacher cache: {path} is unreadable: {_remedy(folder)}") from None


def _finished_cache(folder: Path, fields: dict) -> Optional[dict]:
    """The verified ``meta.json`` of the finished cache in ``folder``; None when the build is unfinished (no
    ``meta.json``). Raises :class:`IntegrityError` when a finished cache is damaged."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    meta = _read_json(meta_path, folder)
    try:
        if meta["key_fields"] != json.loads(json.dumps(fields)):
            # The folder name is a hash of these fields: a mismatch means meta.json was altered.
            raise IntegrityError(f"teacher cache: {meta_path} records another teacher or corpus than its folder "
                                 f"name says: {_remedy(folder)}")
        # Caches written before sizes were recorded: the size follows from the shape.
        record = {"sha256": meta["sha256"], "size": meta.get("size", int(meta["rows"]) * int(meta["dim"]) * 4)}
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"teacher cache: {meta_path} lacks the checksum fields: {_remedy(folder)}") from None
    check_file(folder / "embeddings.f32", record, what="teacher cache", remedy=_remedy(folder))
    return meta


def _build(folder: Path, teacher, sentences: Sequence[str], key: str, fields: dict, *, batch_size: int, device,
           amp: str, progress: bool, chunk_rows: int) -> dict:
    """Fill ``embeddings.f32`` in chunks (continuing an interrupted build), then write ``meta.json``."""
    data_path, progress_path, meta_path = folder / "embeddings.f32", folder / "progress.json", folder / "meta.json"
    n, dim = len(sentences), teacher.dim
    done = 0
    if progress_path.exists() and data_path.exists() and data_path.stat().st_size == n * dim * 4:
        try:
            state = json.loads(progress_path.read_text())
            if state.get("key") == key:
                done = int(state["rows_done"])
        except (json.JSONDecodeError, KeyError, ValueError):
            done = 0
    if done:
        log.info("teacher cache: resuming at row %d of %d", done, n)
    else:
        with open(data_path, "wb") as f:
            f.truncate(n * dim * 4)
    matrix = np.memmap(data_path, dtype=np.float32, mode="r+", shape=(n, dim))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=done, desc="teacher embeddings", unit="sent", dynamic_ncols=True)
    while done < n:
        stop = min(done + chunk_rows, n)
        matrix[done:stop] = teacher.encode(list(sentences[done:stop]), batch_size=batch_size, device=device,
                                           amp=amp).numpy()
        matrix.flush()
        atomic_write_text(progress_path, json.dumps({"key": key, "rows_done": stop}))
        if bar is not None:
            bar.update(stop - done)
        done = stop
    if bar is not None:
        bar.close()
    del matrix
    meta = {"key_fields": fields, "rows": n, "dim": dim, **file_record(data_path)}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    progress_path.unlink(missing_ok=True)
    return meta


@contextlib.contextmanager
def _build_lock(folder: Path):
    """One builder per cache folder at a time (rows of ``ibkd reproduce --workers``, or two runs started
    together, share a cache): the others wait here and then find it finished. An advisory ``flock``, so
    a killed builder releases it; where ``fcntl`` does not exist (Windows) builds are not serialised."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / "build.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_teacher_cache(teacher, sentences: Sequence[str], cache_dir, *, batch_size: int = 128,
                        device=None, amp: str = "auto", progress: bool = True,
                        chunk_rows: int = 2048, pca_dim: Optional[int] = None) -> np.ndarray:
    """Teacher embeddings (N × D, float32, memory-mapped read-only) of ``sentences``; built or reused.

    ``teacher`` is an :class:`ibkd.distill.models.Encoder`. The build runs in chunks of ``chunk_rows`` rows and
    records its progress after each, so a rerun after an interruption continues where it stopped.
    """
    if len(sentences) == 0:
        raise DataError("the corpus is empty: nothing to embed")
    key, fields = cache_key(teacher.identity(), sentences)
    folder = Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    clean_leftovers(folder)  # a cache_dir outside the output folder is not cleaned when the run claims it
    data_path, n, dim = folder / "embeddings.f32", len(sentences), teacher.dim

    meta = _finished_cache(folder, fields)
    if meta is not None:
        log.info("teacher cache hit: %s", folder)
    else:
        with _build_lock(folder):
            meta = _finished_cache(folder, fields)  # another process may have finished it while this one waited
            if meta is None:
                meta = _build(folder, teacher, sentences, key, fields, batch_size=batch_size, device=device, amp=amp,
                              progress=progress, chunk_rows=chunk_rows)
            else:
                log.info("teacher cache hit (built by another process meanwhile): %s", folder)
    embeddings = np.memmap(data_path, dtype=np.float32, mode="r", shape=(n, dim))
    if pca_dim:
        return pca_cached(embeddings, pca_dim, folder, source_sha256=meta["sha256"])
    return embeddings


def pca_cached(matrix: np.ndarray, dim: int, folder: Path, *, source_sha256: Optional[str] = None) -> np.ndarray:
    """Project ``matrix`` onto its top-``dim`` principal components (centred), cached in ``folder`` as
    ``pca<dim>.npy`` with its checksum in ``pca<dim>.json``; ``source_sha256`` (the matrix's checksum) ties
    the projection to the matrix it came from. A damaged projection is an :class:`IntegrityError`."""
    n, d = matrix.shape
    if not 0 < dim <= d:
        raise ValueError(f"pca_dim must be in 1..{d}, got {dim}")
    folder = Path(folder)
    path, record_path = folder / f"pca{dim}.npy", folder / f"pca{dim}.json"
    if record_path.exists():
        record = _read_json(record_path, folder)
        if "sha256" not in record or "size" not in record:
            raise IntegrityError(f"teacher cache: {record_path} lacks the checksum fields: {_remedy(folder)}")
        if record.get("source_sha256") == source_sha256 and record.get("shape") == [n, dim]:
            check_file(path, record, what="teacher cache", remedy=_remedy(folder))
            return np.load(path, mmap_mode="r")
        log.info("teacher cache: %s was computed from another matrix; recomputing", path)
    elif path.exists():
        # The writer was killed between the projection and its record (or wrote no record): recompute.
        log.info("teacher cache: %s has no checksum record; recomputing", path)
    reduced = pca(np.asarray(matrix), dim)
    atomic_write(path, lambda f: np.save(f, reduced))
    atomic_write_text(record_path, json.dumps({"shape": [n, dim], "source_sha256": source_sha256,
                                                **file_record(path)}, indent=1))
    return np.load(path, mmap_mode="r")


def pca(matrix: np.ndarray, dim: int) -> np.ndarray:
    """Centred PCA via the D × D covariance (float64): rows projected on the top-``dim`` components."""
    x = torch.from_numpy(np.asarray(matrix, dtype=np.float64))
    x = x - x.mean(0, keepdim=True)
    eigvals, eigvecs = torch.linalg.eigh(x.T @ x)
    top = eigvecs[:, torch.argsort(eigvals, descending=True)[:dim]]
    return (x @ top).float().numpy()


def load_teacher_matrix(path, expected_rows: int) -> np.ndarray:
    """A user-provided N × D teacher matrix (``.npy``, or ``.pt`` holding a tensor/array or a dict with
    exactly one); the row count must equal the corpus size."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"teacher embeddings file not found: {path}")
    if path.suffix == ".npy":
        matrix = np.load(path, mmap_mode="r")
    elif path.suffix in (".pt", ".pth", ".bin"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            tensors = [v for v in obj.values() if isinstance(v, (torch.Tensor, np.ndarray))]
            if len(tensors) != 1:
                raise DataError(f"{path}: expected one tensor, found a dict with keys {list(obj)}")
            obj = tensors[0]
        matrix = obj.float().numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj, dtype=np.float32)
    else:
        raise DataError(f"{path}: teacher embeddings must be a .npy or .pt file")
    if matrix.ndim != 2:
        raise DataError(f"{path}: teacher embeddings must be a 2-D matrix (N × D), got shape {tuple(matrix.shape)}")
    if matrix.shape[0] != expected_rows:
        raise DataError(f"{path}: teacher embeddings have {matrix.shape[0]} rows but the corpus has "
                        f"{expected_rows} sentences (after skipping empty lines); they must be aligned")
    return matrix
