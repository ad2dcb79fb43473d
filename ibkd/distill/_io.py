"""Crash-safe file writes: a reader (or a resumed run) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, IO


def atomic_write(path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the
    folder (so the rename itself survives a power cut)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def fsync_dir(folder) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
