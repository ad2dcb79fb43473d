"""Peak extra memory of one forward(+backward), measured in fresh child processes.

CPU: ``ru_maxrss`` is a process-lifetime high-water mark, so one process cannot measure two things.
We start two children that do exactly the same setup — import ibkd, build the inputs (directly in
their final dtype, no transient copies), run a tiny warm-up of the same op and backend so that code,
thread pools and allocator arenas are loaded — and then

* the *baseline* child records ``ru_maxrss`` and exits;
* the *run* child runs the full-size forward(+backward) once and records ``ru_maxrss``.

Extra memory = run peak − baseline peak: what the call adds on top of its inputs (its outputs, the
gradients and every temporary). The run child also reports its own pre-run ``ru_maxrss`` and current
RSS, as a consistency check of the baseline.

CUDA: the caching allocator's counters are exact, so it is measured in-process
(:func:`cuda_extra_memory`): peak ``max_memory_allocated`` minus the allocation before the call.

Usage as a script (what the parent runs)::

    python benchmarks/memory.py '{"op": "infonce", "backend": "reference", "size": 4096, "dim": 384}' run
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP_SIZE = 64


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(case_json: str, phase: str) -> dict:
    sys.path.insert(0, HERE)
    import torch  # noqa: F401

    from bench_common import Case, ensure_backend, make_step

    case = Case(**json.loads(case_json))
    reason = ensure_backend(case.backend)
    if reason:
        return {"error": reason}
    step, _inputs = make_step(case)  # the full-size inputs
    warm_case = dataclasses.replace(case, size=min(WARMUP_SIZE, case.size), dim=min(WARMUP_SIZE, case.dim))
    warm_step, _warm_inputs = make_step(warm_case)
    warm_step()
    result = {"baseline_maxrss": _maxrss_bytes(), "baseline_rss": _current_rss_bytes()}
    if phase == "run":
        out = step()
        del out
        result["run_maxrss"] = _maxrss_bytes()
    return result


def _spawn(case_dict: dict, phase: str, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), json.dumps(case_dict), phase],
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"child exited with {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_extra_memory(case, timeout: float = 1800.0) -> dict:
    """Extra peak RSS in bytes of ``case`` (a :class:`bench_common.Case`), from two child processes."""
    case_dict = dataclasses.asdict(case)
    base = _spawn(case_dict, "baseline", timeout)
    if "error" in base:
        return base
    run = _spawn(case_dict, "run", timeout)
    if "error" in run:
        return run
    return {
        "extra_bytes": max(0, run["run_maxrss"] - base["baseline_maxrss"]),
        "baseline_maxrss": base["baseline_maxrss"],
        "run_child_baseline_maxrss": run["baseline_maxrss"],
        "run_child_baseline_rss": run["baseline_rss"],
        "run_maxrss": run["run_maxrss"],
        "method": "ru_maxrss(run child) - ru_maxrss(baseline child); same setup + warm-up in both",
    }


def cuda_extra_memory(step) -> dict:
    """Peak bytes the CUDA caching allocator hands out during ``step()`` beyond what was live before."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return {"extra_bytes": peak - before, "method": "torch.cuda.max_memory_allocated - memory_allocated before"}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2])))
