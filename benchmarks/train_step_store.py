"""Where the training-step benchmark keeps its cases: a published file of quiet cases, merged run by run.

A B = 16384 fp32 case takes ~40 minutes of timing on 2 cores, and the shared host's speed drifts over
such spans: whole-session ceiling brackets (start and end of a ~100 minute run) kept marking runs noisy
although most of their cases were timed on a steady machine. So every case carries its own bracket (the
GEMM ceiling measured just before and just after its timing process, ``protocol.judge_noise`` on it),
and the store keeps:

* ``train-step-<machine>[-padded].json``: the published cases, every one quiet under its own bracket.
  A quiet case replaces the published case of the same (B, dtype) as soon as it is measured, so a run
  that is stopped keeps what it finished, and a later run re-measures only what is missing or noisy.
  The file lists every run that contributed (``runs``) and each case says when it was measured.
* ``train-step-<machine>[-padded]-<start stamp>-noisy.json``: this run's noisy cases, never rendered,
  one file per run (a later run must not overwrite an earlier run's record).

Cases of different settings (rounds, chunk sizes, threads, wait policy, schema) are never mixed: a run
whose settings differ from the published file's stops before measuring anything, with the difference.
Two runs writing the same file at once would interleave their cases: the first holds ``<file>.lock``
(its pid), a second one stops; a lock whose process is gone is taken over.
"""

from __future__ import annotations

import json
import os

SCHEMA = 2


class StoreError(RuntimeError):
    """A run that must not write into the published file (other settings, another run holding it)."""


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is not readable JSON ({type(e).__name__}: {e}); move it aside and re-run") from e


def _write(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def settings_difference(a: dict, b: dict) -> list[str]:
    """The settings that differ between two runs, as 'name: a vs b'."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def case_key(case: dict) -> tuple:
    return int(case["batch"]), str(case["dtype"])


def _sort_key(case: dict) -> tuple:
    order = {"float32": 0, "bfloat16": 1}
    return int(case["batch"]), order.get(case["dtype"], 9), str(case["dtype"])


class Store:
    """The published file of one (machine, padded?) and this run's noisy file; see the module docstring."""

    def __init__(self, published_path: str, noisy_path: str, run_header: dict):
        """``run_header``: this run's machine, settings, note, started_at and start ceiling."""
        self.published_path, self.noisy_path = published_path, noisy_path
        self.lock_path = published_path + ".lock"
        self.run = {k: run_header[k] for k in ("started_at", "note") if k in run_header}
        self.run.update({"ceiling": dict(run_header.get("ceiling") or {}), "cases": [], "noisy_cases": []})
        self._lock()
        try:
            existing = _read(published_path)
            if existing is not None:
                if existing.get("schema") != SCHEMA:
                    raise StoreError(f"{published_path} has schema {existing.get('schema')!r}, this run writes "
                                     f"{SCHEMA} (per-case ceilings): move it aside and re-run")
                diff = settings_difference(existing.get("settings") or {}, run_header["settings"])
                if diff:
                    raise StoreError(f"{published_path} holds cases measured with other settings ("
                                     + "; ".join(diff) + "): move it aside, or run with its settings")
                self.published = existing
            else:
                self.published = {"schema": SCHEMA, "kind": "train-step", "machine": run_header["machine"],
                                  "settings": run_header["settings"], "runs": [], "cases": []}
            self.published["runs"].append(self.run)
            self.noisy = {"schema": SCHEMA, "kind": "train-step", "noisy": True, "machine": run_header["machine"],
                          "settings": run_header["settings"], "runs": [self.run], "cases": []}
        except BaseException:
            self.release()
            raise

    # ------------------------------------------------------------------ lock
    def _lock(self) -> None:
        os.makedirs(os.path.dirname(self.lock_path) or ".", exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.lock_path) as f:
                        pid = int(f.read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    raise StoreError(f"another training-step benchmark (pid {pid}) is writing {self.published_path}; "
                                     "wait for it (two runs on 2 cores would also time each other)") from None
                os.remove(self.lock_path)  # its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._locked = True
            return
        raise StoreError(f"could not take {self.lock_path}")

    def release(self) -> None:
        if getattr(self, "_locked", False):
            try:
                os.remove(self.lock_path)
            except FileNotFoundError:
                pass
            self._locked = False

    # ------------------------------------------------------------------ cases
    def add(self, case: dict) -> str:
        """Records a measured case (its ``noisy`` verdict set); returns the path it went to."""
        key = case_key(case)
        if case.get("noisy", True):
            self.noisy["cases"].append(case)
            self.run["noisy_cases"].append(list(key))
            _write(self.noisy_path, self.noisy)
            return self.noisy_path
        cases = [c for c in self.published["cases"] if case_key(c) != key] + [case]
        self.published["cases"] = sorted(cases, key=_sort_key)
        self.run["cases"].append(list(key))
        self._write_published()
        return self.published_path

    def _write_published(self) -> None:
        # a run that published nothing leaves the published file as it was (its noisy file says it all)
        if self.run["cases"]:
            _write(self.published_path, self.published)

    def finish(self, end_ceiling: dict | None, finished_at: str) -> None:
        self.run["ceiling"]["end"] = end_ceiling
        self.run["finished_at"] = finished_at
        if self.noisy["cases"]:
            _write(self.noisy_path, self.noisy)
        self._write_published()
        self.release()
