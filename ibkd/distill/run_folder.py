"""Who may write into an output folder, and what happens to what is already there.

:func:`claim_output_dir` is called once per run, before any work, by the process that writes the folder
(rank 0 under torchrun):

* it takes an exclusive ``flock`` on ``<output_dir>/.ibkd.lock``: a second run into the same folder is
  refused instead of interleaving its files with the first (the kernel drops the lock when the holder
  exits, however it exits, so a killed run never blocks the next);
* a folder holding a previous run is refused unless the user says what to do with it: ``overwrite``
  removes that run's artifacts (only those: other files, and a ``teacher_cache/`` whose content is
  verified on every read, stay), ``resume`` continues it from its newest complete checkpoint, verified
  (:func:`~ibkd.distill.integrity.newest_valid_checkpoint`);
* staging files left by killed writers are removed.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from ._io import clean_leftovers, fsync_dir, staging_name
from .integrity import CHECKPOINT_RE, newest_valid_checkpoint

LOCK_NAME = ".ibkd.lock"
#: names a run writes at the top of its output folder (``checkpoint-<step>`` folders are matched apart):
#: their presence means the folder holds a run, and ``overwrite`` removes exactly these.
RUN_ARTIFACTS = ("final", "best", "train_log.jsonl", "config.yaml", "summary.json", "loss_curves.png",
                 "runs",  # TensorBoard's default logging_dir under Hugging Face's Trainer
                 "eval")  # where sentence-transformers' trainer has its evaluators write their CSVs
#: kept by ``overwrite``: content-addressed and checksummed, so reusing it is safe and saves the teacher pass
KEEP_ON_OVERWRITE = ("teacher_cache", LOCK_NAME)


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (reported by the CLI as one line)."""


class RunLock:
    """The claim on an output folder: holds the lock until :meth:`release` (or the end of a ``with`` block,
    or the process). ``resume_from`` is the verified checkpoint to resume from when the claim was made
    with ``resume=True`` (None: the run stopped before its first checkpoint, so it starts again at step 0)."""

    def __init__(self, path: Path, fd: int, resume_from: Optional[Path] = None):
        self.path, self._fd, self.resume_from = path, fd, resume_from

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock. The lock file stays: removing it could let a run that opened it just before
        lock a file no longer in the folder while a third run locks a new one."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held}, resume_from={self.resume_from})"


def _holder(lock_path: Path, wait_s: float = 1.0) -> str:
    """``" (pid N, started T)"`` from the holder's lock file, or "" when it is not written within ``wait_s``
    (the holder writes it right after taking the lock, so a run refused in between waits that long)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = json.loads(lock_path.read_text(encoding="utf-8"))
            pid, host, started = info["pid"], info.get("host"), info.get("started", "?")
            break
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return ""
            time.sleep(0.02)
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f" (pid {pid}{where}, started {started})"


def _lock(path: Path) -> int:
    lock_path = path / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunFolderError(f"{path} is in use by another ibkd run{_holder(lock_path)}: wait for it or choose "
                             f"another --output_dir") from None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n"
    # Written in place (not by rename): the lock belongs to this inode, which other runs must keep opening.
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    os.fsync(fd)
    return fd


def previous_run(path) -> list[str]:
    """The names in ``path`` that belong to a run (sorted), or [] when it holds none."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name in RUN_ARTIFACTS or CHECKPOINT_RE.match(p.name))


def _remove(path: Path) -> None:
    """Move ``path`` aside under a staging name, then delete it: a kill during a long delete leaves a
    leftover that the next claim removes, never a half-deleted artifact that looks like a run."""
    aside = staging_name(path, "old")
    os.replace(path, aside)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink()


def claim_output_dir(path, *, resume: bool, overwrite: bool) -> RunLock:
    """Create ``path`` if needed and claim it for this run (see the module docstring).

    Raises :class:`RunFolderError` (one line) when another run holds the folder, when it holds a previous
    run and neither ``resume`` nor ``overwrite`` is given, when ``resume`` finds no run, or when both are
    given; :class:`ibkd.distill.integrity.IntegrityError` when the checkpoint to resume from is damaged.
    """
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in the output folder and --overwrite_output_dir "
                             "deletes it: pass one of them")
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--output_dir {path} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    lock = RunLock(path, fd)
    try:
        clean_leftovers(path)
        found = previous_run(path)
        if resume:
            if not found:
                raise RunFolderError(f"--resume: {path} holds no run to resume: drop --resume to start one")
            lock.resume_from = newest_valid_checkpoint(path)
        elif found and not overwrite:
            raise RunFolderError(f"{path} holds a previous run: pass --overwrite_output_dir to replace it or "
                                 f"--resume to continue it")
        elif found:
            for name in found:
                _remove(path / name)
            fsync_dir(path)
    except BaseException:
        lock.release()
        raise
    return lock
