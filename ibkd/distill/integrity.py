"""Checksums for what a run writes and later reads back (checkpoints, the teacher cache).

A folder is sealed by :func:`write_checksums`: ``ibkd_checksums.json`` lists the SHA-256 and size of every
file in it and is written last, atomically, so its presence means the folder was written completely.
:func:`verify_checksums` checks a sealed folder before anything in it is used; damage of any kind (flipped
bits, truncation, an emptied or deleted file, a missing or unreadable manifest) is reported as one
:class:`IntegrityError` line naming the file and what to do, never silently used and never a traceback from
deep inside a loader. :func:`newest_valid_checkpoint` applies this to the ``checkpoint-<step>`` folders that
Hugging Face's Trainer writes (a folder without a manifest there is one the run was killed while saving).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Optional

from ._io import atomic_write_text, is_leftover

log = logging.getLogger("ibkd.distill.integrity")

MANIFEST = "ibkd_checksums.json"
#: the folder names Hugging Face's Trainer gives its checkpoints (``transformers.trainer_utils``)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_BLOCK = 1 << 20


class IntegrityError(ValueError):
    """A file that was written by ibkd does not read back as written (reported by the CLI as one line)."""


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints and caches can be far larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path) -> dict:
    path = Path(path)
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def check_file(path, record: dict, *, what: str, remedy: str) -> None:
    """Raise :class:`IntegrityError` unless ``path`` has ``record``'s size and SHA-256. The size is checked
    first: it tells truncation from corruption and costs no read."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{what}: {path} is missing: {remedy}")
    size, expected = path.stat().st_size, int(record["size"])
    if size != expected:
        if size == 0:
            problem = f"is empty (expected {expected} bytes)"
        elif size < expected:
            problem = f"is truncated ({size} of {expected} bytes)"
        else:
            problem = f"has {size} bytes, expected {expected}"
        raise IntegrityError(f"{what}: {path} {problem}: {remedy}")
    if file_sha256(path) != record["sha256"]:
        raise IntegrityError(f"{what}: {path} is corrupted (its SHA-256 does not match the one recorded when "
                             f"it was written): {remedy}")


def _files(folder: Path) -> list[Path]:
    # A writer's staging files are not part of the folder's content (and may vanish while we read).
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not any(is_leftover(part) for part in
                                                                     p.relative_to(folder).parts))


def write_checksums(folder) -> Path:
    """Seal ``folder``: write ``ibkd_checksums.json`` (``{"files": {relative path: {"sha256", "size"}}}``)
    for every file below it. Call it after the last file is written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot seal {folder}: not a folder")
    files = {p.relative_to(folder).as_posix(): file_record(p) for p in _files(folder)}
    path = folder / MANIFEST
    atomic_write_text(path, json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True) + "\n")
    return path


def _default_remedy(what: str) -> str:
    if what == "checkpoint":
        return "delete it (resume then uses the previous checkpoint) or start over with --overwrite_output_dir"
    return "delete it and write it again"


def verify_checksums(folder, *, what: str = "checkpoint", remedy: Optional[str] = None) -> None:
    """Check every file ``folder``'s manifest lists; raise :class:`IntegrityError` (one line naming the file
    and ``remedy``) on the first that does not match, or when the manifest is missing or unreadable.
    Files added after sealing are not checked (nothing in ibkd adds any)."""
    folder = Path(folder)
    remedy = remedy or _default_remedy(what)
    if not folder.is_dir():
        raise IntegrityError(f"{what} {folder} does not exist or is not a folder")
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        records = [(name, {"sha256": str(r["sha256"]), "size": int(r["size"])}) for name, r in files.items()]
    except FileNotFoundError:
        raise IntegrityError(f"{what} {folder} has no checksums ({MANIFEST}): it was not written completely; "
                             f"{remedy}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"{what} {folder}: its checksums ({path}) are unreadable, so nothing in it can be "
                             f"trusted; {remedy}") from None
    for name, record in records:
        check_file(folder / name, record, what=what, remedy=remedy)


def checkpoints(output_dir) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def newest_valid_checkpoint(output_dir) -> Optional[Path]:
    """The newest complete ``checkpoint-<step>`` folder of ``output_dir``, verified; None when there is none.

    A checkpoint without a manifest was being written when the run was stopped (the manifest is written
    last): the run is continued from the one before it, with a warning naming the skipped folder, as that is
    the crash ``--resume`` exists for. A checkpoint whose manifest is present but whose files do not match
    it is damaged: that is an :class:`IntegrityError`, never a quiet fall back to an older checkpoint
    (that would repeat steps the user believes are done); the message names the file and says to delete
    the checkpoint to fall back to the previous one."""
    found = checkpoints(output_dir)
    for i in range(len(found) - 1, -1, -1):
        folder = found[i]
        if not (folder / MANIFEST).exists():
            log.warning("%s has no checksums (%s): it was not completely written (the run stopped while saving "
                        "it); using the checkpoint before it", folder, MANIFEST)
            continue
        if i:
            remedy = (f"delete {folder} to resume from the previous checkpoint ({found[i - 1].name}), or start "
                      f"over with --overwrite_output_dir")
        else:
            remedy = f"delete {folder} to start from scratch, or start over with --overwrite_output_dir"
        verify_checksums(folder, what="checkpoint", remedy=remedy)
        return folder
    return None
