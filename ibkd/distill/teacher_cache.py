"""Teacher embeddings of a corpus, computed once and kept on disk, memory-mapped.

A cache lives in ``<cache_dir>/<key>/`` where the key hashes the teacher identity (name + weights hash),
pooling, normalisation, max length and the corpus hash. Files:

* ``embeddings.f32`` — N × D float32, row-major, preallocated; filled in chunks;
* ``progress.json`` — rows done so far (fsynced after each chunk), so an interrupted build continues;
* ``meta.json`` — the key fields, N, D and the SHA-256 of the finished matrix; written last.

On load the meta must match the key, the file size must be N·D·4 bytes and the checksum must match;
anything else (mismatch, truncation, corruption) is reported and the cache is rebuilt — never reused.
Optional PCA to a smaller dim is cached beside it. :func:`load_teacher_matrix` reads user-provided
``.pt``/``.npy`` matrices instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ._io import atomic_write, atomic_write_text
from .data import DataError, corpus_hash

log = logging.getLogger("ibkd.distill.teacher_cache")

CACHE_VERSION = 1


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(teacher_identity: dict, sentences: Sequence[str]) -> tuple[str, dict]:
    fields = dict(version=CACHE_VERSION, teacher=teacher_identity, corpus_sha256=corpus_hash(sentences),
                  rows=len(sentences))
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return key, fields


def _valid_cache(folder: Path, fields: dict, dim: Optional[int] = None) -> Optional[str]:
    """None when the finished cache in ``folder`` is usable, else the reason it is not."""
    meta_path, data_path = folder / "meta.json", folder / "embeddings.f32"
    if not meta_path.exists():
        return "no meta.json (unfinished)"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return "unreadable meta.json"
    if meta.get("key_fields") != json.loads(json.dumps(fields)):
        return "key mismatch (teacher, pooling, max length or corpus changed)"
    expected = meta["rows"] * meta["dim"] * 4
    if not data_path.exists() or data_path.stat().st_size != expected:
        size = data_path.stat().st_size if data_path.exists() else 0
        return f"embeddings file has {size} bytes, expected {expected} (truncated?)"
    if meta.get("sha256") != _file_sha256(data_path):
        return "checksum mismatch (corrupted)"
    return None


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
    data_path, progress_path, meta_path = folder / "embeddings.f32", folder / "progress.json", folder / "meta.json"
    n, dim = len(sentences), teacher.dim

    reason = _valid_cache(folder, fields)
    if reason is None:
        log.info("teacher cache hit: %s", folder)
    else:
        if meta_path.exists():  # a finished cache that fails the checks: rebuild from scratch
            log.warning("teacher cache %s unusable (%s); rebuilding", folder, reason)
            meta_path.unlink()
            progress_path.unlink(missing_ok=True)
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
        atomic_write_text(meta_path, json.dumps({"key_fields": fields, "rows": n, "dim": dim,
                                            "sha256": _file_sha256(data_path)}, indent=1))
        progress_path.unlink(missing_ok=True)
    embeddings = np.memmap(data_path, dtype=np.float32, mode="r", shape=(n, dim))
    if pca_dim:
        return pca_cached(embeddings, pca_dim, folder)
    return embeddings


def pca_cached(matrix: np.ndarray, dim: int, folder: Path) -> np.ndarray:
    """Project ``matrix`` onto its top-``dim`` principal components (centred), cached in ``folder``."""
    n, d = matrix.shape
    if not 0 < dim <= d:
        raise ValueError(f"pca_dim must be in 1..{d}, got {dim}")
    path = folder / f"pca{dim}.npy"
    if path.exists():
        out = np.load(path, mmap_mode="r")
        if out.shape == (n, dim):
            return out
    reduced = pca(np.asarray(matrix), dim)
    atomic_write(path, lambda f: np.save(f, reduced))
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
