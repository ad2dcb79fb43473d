"""Benchmark harness helpers: timing (pytest-benchmark / CUDA events), the results registry, and the
results-file writer called from ``conftest.pytest_sessionfinish``. A module of its own (not
conftest) so the benchmark files import it by a unique name.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import time

import pytest
import torch

import bench_common as bc

HERE = os.path.dirname(os.path.abspath(__file__))

RESULTS_DIR = os.path.join(HERE, "results", "quick" if bc.QUICK else "")
_RECORDS: list[dict] = []
_EXTRA: dict = {}

CPU_TARGET_SECONDS = 2.0 if bc.QUICK else 8.0  # timed seconds per case, at least MIN_ROUNDS calls
MIN_ROUNDS, MAX_ROUNDS = 3, 20


def backends_for(device: str) -> list[str]:
    env = os.environ.get("IBKD_BENCH_BACKENDS")
    if env:
        return [b.strip() for b in env.split(",") if b.strip()]
    return ["reference", "cpu"] if device == "cpu" else ["reference", "reference-compile", "gradcache", "triton", "cuda"]


def skip_unless_runnable(case: bc.Case):
    if case.backend == "gradcache" and case.op != "infonce":
        pytest.skip("gradcache is an InfoNCE peer")
    reason = bc.ensure_backend(case.backend)
    if reason:
        pytest.skip(f"backend {case.backend!r} unavailable: {reason}")


# --- timing ------------------------------------------------------------------------------------


def _stats_from_benchmark(benchmark) -> dict | None:
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None or not getattr(stats, "data", None):
        return None
    return {
        "median_s": stats.median,
        "mean_s": stats.mean,
        "stddev_s": stats.stddev if len(stats.data) > 1 else 0.0,
        "min_s": stats.min,
        "rounds": len(stats.data),
        "timer": "time.perf_counter via pytest-benchmark",
    }


def time_cpu(benchmark, step) -> dict:
    """One warm-up call (also sizes the number of rounds), then pytest-benchmark's pedantic timing."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(CPU_TARGET_SECONDS / max(first, 1e-6))))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = _stats_from_benchmark(benchmark)
    if stats is None:  # --benchmark-disable: pytest-benchmark ran the step once, untimed
        stats = {"median_s": first, "mean_s": first, "stddev_s": 0.0, "min_s": first, "rounds": 1,
                 "timer": "single warm-up call (pytest-benchmark disabled)"}
    stats["first_call_s"] = first
    return stats


def time_cuda(benchmark, step) -> dict:
    """Median of CUDA-event timings (triton.testing.do_bench); pytest-benchmark times synced calls."""
    from triton.testing import do_bench

    times_ms = do_bench(step, warmup=25, rep=200, return_mode="all")

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
    return {
        "median_s": statistics.median(times_ms) / 1e3,
        "mean_s": statistics.mean(times_ms) / 1e3,
        "stddev_s": (statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0) / 1e3,
        "min_s": min(times_ms) / 1e3,
        "rounds": len(times_ms),
        "timer": "triton.testing.do_bench (CUDA events)",
    }


# --- results registry --------------------------------------------------------------------------


def record(case: bc.Case, timing: dict | None, memory: dict | None, status: str = "ok", **extra) -> dict:
    row = {
        "id": case.id, "group": case.group, "op": case.op, "backend": case.backend, "size": case.size,
        "dim": case.dim, "dtype": case.dtype, "mode": case.mode, "device": case.device, "status": status,
        "time": timing, "memory": memory,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load": bc.load_snapshot(),
    }
    flops = case.flops()
    if flops and timing:
        row["tflops"] = flops / timing["median_s"] / 1e12
    row.update(extra)
    _RECORDS.append(row)
    write_results()  # after every case, so an interrupted run keeps what it measured
    return row


def set_extra(key: str, value) -> None:
    """Run-level facts (e.g. the measured bf16 GEMM rate, the largest batch per backend)."""
    _EXTRA[key] = value


def _with_ratios(cases: list[dict]) -> list[dict]:
    """Each case's time and memory relative to the reference backend of its group."""
    ref = {c["group"]: c for c in cases if c["backend"] == "reference" and c.get("status") == "ok"}
    for c in cases:
        r = ref.get(c["group"])
        c.pop("vs_reference", None)
        if r is None or c.get("status") != "ok" or not c.get("time") or not r.get("time"):
            continue
        vs = {"time_ratio": c["time"]["median_s"] / r["time"]["median_s"]}
        m, rm = (c.get("memory") or {}).get("extra_bytes"), (r.get("memory") or {}).get("extra_bytes")
        if m is not None and rm:
            vs["mem_ratio"] = m / rm
        c["vs_reference"] = vs
    return cases


def _targets(cases: list[dict]) -> list[dict]:
    out = []
    by_key = {(c["op"], c["backend"], c["size"], c["dim"], c["dtype"], c["mode"], c["device"]): c for c in cases}
    for t in bc.CPU_TARGETS:
        c = by_key.get((t["op"], "cpu", t["size"], t["dim"], t["dtype"], t["mode"], "cpu"))
        row = dict(t, backend="cpu", time_ratio=None, mem_ratio=None, time_pass=None, mem_pass=None)
        if c and c.get("vs_reference"):
            vs = c["vs_reference"]
            row["time_ratio"] = vs.get("time_ratio")
            row["mem_ratio"] = vs.get("mem_ratio")
            row["time_pass"] = row["time_ratio"] is not None and row["time_ratio"] <= t["max_time_ratio"]
            row["mem_pass"] = row["mem_ratio"] is not None and row["mem_ratio"] <= t["max_mem_ratio"]
        out.append(row)
    return out


def write_results():
    """Write (merge) every recorded case into results/<machine-id>.json; returns the paths."""
    paths = []
    if not _RECORDS:
        return paths
    by_device: dict[str, list[dict]] = {}
    for r in _RECORDS:
        by_device.setdefault(r["device"], []).append(r)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    for device, rows in by_device.items():
        path = os.path.join(RESULTS_DIR, bc.machine_id(device) + ".json")
        previous = {}
        if os.path.exists(path) and os.environ.get("IBKD_BENCH_FRESH", "0") != "1":
            with open(path) as f:
                previous = json.load(f)
        cases = {c["id"]: c for c in previous.get("cases", [])}
        cases.update({r["id"]: r for r in rows})
        merged = _with_ratios(sorted(cases.values(), key=lambda c: (c["op"], c["mode"], c["dtype"], c["dim"], c["size"], c["backend"])))
        extra = dict(previous.get("extra", {}))
        extra.update({k: v for k, v in _EXTRA.items() if k.startswith(device)})
        doc = {
            "schema": 1,
            "kind": device,
            "quick": bc.QUICK,
            "machine": bc.machine_info(device),
            "note": os.environ.get("IBKD_BENCH_NOTE", previous.get("note", "")),
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {"temperature": bc.TEMPERATURE, "hsic_gamma": "0.5/D", "hsic_kernel": "rbf",
                         "inputs_require_grad": "both (fwd+bwd)", "infonce_N": "= B", "normalize": True},
            "cases": merged,
            "targets": _targets(merged) if device == "cpu" else [],
            "extra": extra,
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
        paths.append(path)
    return paths
