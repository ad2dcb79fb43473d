"""Peak extra memory of one forward(+backward), measured in fresh child processes.

CPU: the peak RSS (``VmHWM``; see :func:`_maxrss_bytes` for why not ``ru_maxrss``) is a
process-lifetime high-water mark, so one process cannot measure two things.
We start two children that do exactly the same setup — import ibkd, build the inputs (directly in
their final dtype, no transient copies), run a tiny warm-up of the same op and backend so that code,
thread pools and allocator arenas are loaded — and then

* the *baseline* child records its peak RSS and exits;
* the *run* child runs the full-size forward(+backward) once and records its peak RSS.

Extra memory = run peak − baseline peak: what the call adds on top of its inputs (its outputs, the
gradients and every temporary). The run child also reports its own pre-run peak and current
RSS, as a consistency check of the baseline.

CUDA: the caching allocator's counters are exact, so it is measured in-process
(:func:`cuda_extra_memory`): peak ``max_memory_allocated`` minus the allocation before the call.

Usage as a script (what the parent runs)::

    python benchmarks/memory.py '{"op": "infonce", "backend": "reference", "size": 4096, "dim": 384}' run

and to re-measure the memory of recorded cases in place::

    python benchmarks/memory.py --remeasure benchmarks/results/cpu-amd-epyc-2c.json reference
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
    """Peak RSS of this process's address space: ``VmHWM`` from /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's high-water mark over fork+exec into
    the child's ``ru_maxrss``, so a child spawned from a big pytest process reports the parent's
    peak (observed: 864 MB in every child, whatever it did). ``VmHWM`` belongs to the address space
    created by exec, so it starts fresh. ``ru_maxrss`` is used only where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_call_peak(call) -> dict:
    """Peak RSS of one ``call()`` above the RSS just before it, in this process (call it after a
    full-size warm-up): freed heap pages are returned first (malloc_trim) so the call re-faults them, and
    ``VmHWM`` is reset to the current RSS (clear_refs=5). The call's result is dropped only after the
    peak is read. Bytes: ``rss_before_bytes``, ``peak_bytes``, ``extra_bytes``."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = call()
    peak = _status_kib("VmHWM")
    del result
    return {"extra_bytes": max(0, peak - before) * 1024, "rss_before_bytes": before * 1024, "peak_bytes": peak * 1024}


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
        "method": "VmHWM(run child) - VmHWM(baseline child); same setup + warm-up in both",
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


def remeasure(results_path: str, backends: list[str]) -> None:
    """Re-measure the CPU memory of the cases of ``backends`` in a results file, in place (ratios are
    recomputed). Used when the memory method changes; times are left as they were measured."""
    sys.path.insert(0, HERE)
    from bench_common import Case
    from bench_harness import _targets, _with_ratios

    with open(results_path) as f:
        doc = json.load(f)
    fields = {f.name for f in dataclasses.fields(Case)}
    for c in doc["cases"]:
        if c["device"] == "cpu" and c["backend"] in backends:
            c["memory"] = cpu_extra_memory(Case(**{k: c[k] for k in fields}))
            print(c["id"], c["memory"].get("extra_bytes"), file=sys.stderr)
    doc["cases"] = _with_ratios(doc["cases"])
    doc["targets"] = _targets(doc["cases"])
    with open(results_path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(results_path + ".tmp", results_path)


if __name__ == "__main__":
    if sys.argv[1] == "--remeasure":  # memory.py --remeasure results/x.json reference[,cpu]
        remeasure(sys.argv[2], sys.argv[3].split(","))
    else:
        print(json.dumps(_child(sys.argv[1], sys.argv[2])))
