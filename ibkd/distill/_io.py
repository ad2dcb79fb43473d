"""Reading input files with errors that name the place, and crash-safe writes.

Reads: :func:`numbered_lines` gives a file's lines with their numbers and turns bytes that are not UTF-8 into
a :class:`DataError` naming the file and line; every parser of user data builds on it so that each of its
errors can say ``<file>:<line>: ...``.

Writes: a reader (or a resumed run) sees the old file or the new one, never a torn one.

Writers stage their output beside the target under a name made by :func:`staging_name` (``.<name>.tmp-<pid>``
for the new content, ``.<name>.old-<pid>`` for the content being replaced). A writer killed mid-way leaves
such a name behind; :func:`is_leftover` recognises them so that the run folder can clean them up, and the
pid in the name tells whether the writer is still alive.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import IO, Callable, Iterator, Optional


class DataError(ValueError):
    """Bad or missing input data (reported by the CLI as one line)."""


def require_file(path, what: str = "file") -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file")
    return path


def numbered_lines(path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file, numbered from 1, each line with its ending. Lines end at
    ``\\n`` only: some corpora hold other Unicode line separators inside a sentence, which ``str.splitlines``
    would split on. A byte-order mark at the start is dropped (spreadsheet programs write one)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[:exc.start].decode("utf-8", "replace")) + 1
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
                                f"convert the file to UTF-8") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield lineno, line


#: What writers of a run folder leave behind when killed: ``.<name>.tmp-<pid>`` and ``.<name>.old-<pid>``
#: (the writers below), and also ``.tmp-*`` and ``<name>.old-<pid>`` that other staging code uses. A visible
#: name must end in the pid: ``report.old-version.txt`` is a user's file, not a leftover.
_LEFTOVER = re.compile(r"^(?:\.tmp-.*|\..+\.tmp-.*|\..+\.old-.*|.+\.old-\d+)$")
_PID_SUFFIX = re.compile(r"-(\d+)$")


def staging_name(path, kind: str = "tmp") -> Path:
    """``path``'s staging sibling for ``kind`` ``"tmp"`` (new content) or ``"old"`` (content being replaced)."""
    if kind not in ("tmp", "old"):
        raise ValueError(f"kind must be 'tmp' or 'old', got {kind!r}")
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a staging name (of a live writer, or one left by a killed one)."""
    return _LEFTOVER.match(name) is not None


def writer_pid(name: str) -> Optional[int]:
    """The pid at the end of a staging name, or None when it carries none."""
    match = _PID_SUFFIX.search(name)
    return int(match.group(1)) if match else None


def atomic_write(path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the
    folder (so the rename itself survives a power cut)."""
    path = Path(path)
    tmp = staging_name(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # An exception (not a kill) must not leave the staging file behind.
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_dir(folder, fill: Callable[[Path], object]) -> None:
    """``fill(staging_folder)`` writes the folder's files; every file is fsynced, then the staging folder
    replaces ``folder`` (the previous content is moved aside first and removed last, so at every instant
    either the old or the new folder is complete under one of the names)."""
    folder = Path(folder)
    tmp, old = staging_name(folder), staging_name(folder, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                fsync_dir(f)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_leftovers(path) -> list[Path]:
    """Remove the staging files and folders (:func:`is_leftover`) that killed writers left below ``path``;
    those whose writer is still running here (another process, e.g. one filling a shared teacher cache) are
    kept. Returns what was removed."""
    path = Path(path)
    removed = []
    for folder, dirs, files in os.walk(path):
        for name in list(dirs) + files:
            if not is_leftover(name):
                continue
            pid = writer_pid(name)
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            target = Path(folder) / name
            if name in dirs:
                dirs.remove(name)
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            removed.append(target)
    return removed
