"""The CPU benchmark protocol: fused kernels against their peers, interleaved, with a ceiling check.

One command runs everything and, when the run is clean, renders the results into the README:

    python benchmarks/protocol.py --publish          # the full protocol (~20 min on 2 cores)
    python benchmarks/protocol.py --quick            # smoke run, small sizes -> results/quick/
    python benchmarks/protocol.py --render-only      # redraw tables/plot from the last results file
    pytest benchmarks/test_protocol.py               # the same full run as a pytest entry point

What one run does (benchmarks/README.md, "Protocol", explains why):

1. **Ceiling, start.** In a fresh process with the run's thread count: the float32 GEMM rate of
   torch.mm (MKL), of the kernels' own tile GEMM (``ibkd._C.tile_gemm``: oneDNN on this machine)
   and of a bf16 torch.mm (oneDNN), at 4096×384 @ 384×4096.
2. **Timing.** For each case and each OpenMP wait policy (default, ``OMP_WAIT_POLICY=PASSIVE``) one
   fresh worker process (the policy is read when libgomp starts) builds the inputs and every peer,
   warms each up once (torch.compile's compile time is this first call minus its median: reported,
   not counted), then times ``rounds`` rounds; each round calls every peer once, in an order that
   rotates from round to round (eager, fused, compile, … then fused, compile, eager, …), so slow
   drifts of the machine hit all peers alike. The median over rounds is reported, with min and max.
3. **Memory.** For each case and peer, one fresh process: import, inputs, one full-size warm-up call
   (so compilation and one-time allocations are done: memory is measured after the library and the
   peer are loaded), ``malloc_trim``, reset the peak RSS (``/proc/self/clear_refs`` = 5), one call;
   extra memory = peak RSS (VmHWM) − RSS before the call.
4. **Crossover.** eager vs fused at small sizes (default policy), the size from which fused wins.
5. **Ceiling, end.** As in 1. If any of the three rates moved by more than 20 %, the run is marked
   noisy: written to ``results/protocol-<machine>-noisy.json`` and not rendered into the README.

Peers: ``eager`` (the reference backend, plain PyTorch), ``compile`` (the same reference function
under ``torch.compile``, inductor), ``gradcache`` (InfoNCE only: the loss computed in query chunks of
32 rows with one backward per chunk into cached embedding gradients, as sentence-transformers'
Cached* losses do with their default mini_batch_size=32), ``fused`` (the ``cpu`` backend).
bf16 cases: inputs in bfloat16 and every peer called under ``torch.autocast("cpu", torch.bfloat16)``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEMPERATURE = 0.05
GRADCACHE_MINI_BATCH = 32  # sentence-transformers' CachedMultipleNegativesRankingLoss default
NOISE_LIMIT = 0.20
CEILING_SHAPE = (4096, 384, 4096)  # M, K, N

# --------------------------------------------------------------------------------------- cases


def full_plan():
    fp32 = [
        dict(op="infonce", size=16384, dim=384, dtype="float32", rounds=3),
        dict(op="infonce", size=1024, dim=384, dtype="float32", rounds=9),
        dict(op="hsic", size=8192, dim=384, dtype="float32", rounds=3),
        dict(op="hsic", size=1024, dim=384, dtype="float32", rounds=9),
    ]
    # bf16: the targets are for the default wait policy only; PASSIVE would add ~4 minutes
    bf16 = [
        dict(op="infonce", size=16384, dim=384, dtype="bfloat16", rounds=3, policies=["default"]),
        dict(op="hsic", size=8192, dim=384, dtype="bfloat16", rounds=3, policies=["default"]),
    ]
    crossover = [dict(op=op, size=s, dim=384, dtype="float32", rounds=7) for op in ("infonce", "hsic")
                 for s in (128, 256, 512)]
    return fp32 + bf16, crossover


def quick_plan():
    main = [
        dict(op="infonce", size=512, dim=64, dtype="float32", rounds=3),
        dict(op="hsic", size=256, dim=64, dtype="float32", rounds=3),
        dict(op="infonce", size=512, dim=64, dtype="bfloat16", rounds=3),
    ]
    crossover = [dict(op="infonce", size=s, dim=64, dtype="float32", rounds=3) for s in (64, 128)]
    return main, crossover


def peers_for(op: str) -> list[str]:
    return ["eager", "fused", "compile", "gradcache"] if op == "infonce" else ["eager", "fused", "compile"]


# Targets of issue 14 (fp32: 2 threads, default wait policy; the lead must also hold under PASSIVE).
TARGETS = [
    dict(op="infonce", size=16384, dtype="float32", vs="compile", max_time_ratio=0.95, max_mem_ratio=0.10),
    dict(op="infonce", size=16384, dtype="float32", vs="eager", max_time_ratio=0.60, max_mem_ratio=0.10),
    dict(op="infonce", size=1024, dtype="float32", vs="eager", max_time_ratio=1.00),
    dict(op="hsic", size=8192, dtype="float32", vs="eager", max_time_ratio=0.25, max_mem_ratio=0.10),
    dict(op="hsic", size=1024, dtype="float32", vs="eager", max_time_ratio=0.70),
    dict(op="infonce", size=16384, dtype="bfloat16", vs="eager", max_time_ratio=0.70),
    dict(op="infonce", size=16384, dtype="bfloat16", vs="compile", max_time_ratio=1.00),
    dict(op="hsic", size=8192, dtype="bfloat16", vs="eager", max_time_ratio=0.70),
    dict(op="hsic", size=8192, dtype="bfloat16", vs="compile", max_time_ratio=1.00),
]


def case_key(c: dict) -> str:
    return f"{c['op']}-{c['dtype']}-s{c['size']}-d{c['dim']}"


# ------------------------------------------------------------------------------ the timed calls


def kernel_flops(op: str, size: int, dim: int, threads: int) -> float:
    """FLOPs of the fused cpu kernels' GEMMs as they perform them (forward + backward).

    InfoNCE (N = B, not symmetric, whole rows per tile): S = (cQ)Kᵀ, dQ = G K, dK = Gᵀ(cQ): 6·B·N·D.
    HSIC: per tile pair of the upper triangle, the two Gram tiles forward, again backward, and the
    products W X, V Z (plus their transposes for an off-diagonal pair)."""
    if op == "infonce":
        return 6.0 * size * size * dim
    from ibkd import _C

    bs = _C.hsic_tile_side(size, threads)  # the tile side depends on the thread count
    nb = math.ceil(size / bs)
    sizes = [min(bs, size - i * bs) for i in range(nb)]
    total = 0.0
    for i in range(nb):
        for j in range(i, nb):
            gram = 2.0 * sizes[i] * sizes[j] * (dim + dim)
            total += 2 * gram + gram * (2 if j > i else 1)
    return total


def _inputs(op, size, dim, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, dim, generator=g)
    b = torch.randn(size, dim, generator=g)
    if op == "infonce":
        b.mul_(0.5).add_(a)  # correlated positives, as in distillation
    dt = getattr(torch, dtype)
    return a.to(dt).requires_grad_(), b.to(dt).requires_grad_()


def make_step(op, peer, size, dim, dtype):
    """(step, leaves): step() runs one forward + backward of ``peer`` and returns the gradients."""
    import contextlib

    import torch
    import torch.nn.functional as TF

    import ibkd.functional as F

    a, b = _inputs(op, size, dim, dtype)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext
    if op == "infonce":

        def loss_fn(q, k, backend):
            return F.infonce(q, k, temperature=TEMPERATURE, backend=backend, check_finite=False)

    else:
        gamma = 0.5 / dim  # ‖a_i − a_j‖² ≈ 2D for standard normal rows: K_ij ≈ e^-1

        def loss_fn(x, z, backend):
            return F.hsic(x, z, gamma=gamma, backend=backend, check_finite=False)

    if peer in ("eager", "fused"):
        backend = "reference" if peer == "eager" else "cpu"

        def step():
            with amp():
                loss = loss_fn(a, b, backend)
            return torch.autograd.grad(loss, (a, b))

    elif peer == "compile":
        compiled = torch.compile(lambda p, q: loss_fn(p, q, "reference"), dynamic=False)

        def step():
            with amp():
                loss = compiled(a, b)
            return torch.autograd.grad(loss, (a, b))

    elif peer == "gradcache":
        if op != "infonce":
            raise ValueError("gradcache is an InfoNCE peer")

        def step():
            # GradCache: the embeddings are cached leaves; the loss is computed in chunks of query
            # rows against all keys, each chunk's backward accumulates into the cached gradients,
            # which would then be pushed through the encoder (not part of the loss cost).
            q = a.detach().requires_grad_()
            k = b.detach().requires_grad_()
            n = q.shape[0]
            with amp():
                for s in range(0, n, GRADCACHE_MINI_BATCH):
                    e = min(n, s + GRADCACHE_MINI_BATCH)
                    logits = TF.normalize(q[s:e].float(), dim=1) @ TF.normalize(k.float(), dim=1).T / TEMPERATURE
                    labels = torch.arange(s, e)
                    loss = TF.cross_entropy(logits, labels, reduction="sum") / n
                    loss.backward()
            return q.grad, k.grad

    else:
        raise ValueError(peer)
    return step, (a, b)


# ------------------------------------------------------------------------------------- workers


def _set_threads(threads):
    import torch

    torch.set_num_threads(threads)


def worker_time(spec: dict) -> dict:
    """Runs in a fresh process: every peer of one case, warmed up, then interleaved rounds."""
    import torch

    _set_threads(spec["threads"])
    out = {"peers": {}, "order": []}
    steps = {}
    for peer in spec["peers"]:
        step, _ = make_step(spec["op"], peer, spec["size"], spec["dim"], spec["dtype"])
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        steps[peer] = step
        out["peers"][peer] = {"first_call_s": first, "times_s": []}
        gc.collect()
    peers = list(spec["peers"])
    for r in range(spec["rounds"]):
        order = peers[r % len(peers):] + peers[: r % len(peers)]
        out["order"].append(order)
        for peer in order:
            gc.collect()
            t0 = time.perf_counter()
            grads = steps[peer]()
            dt = time.perf_counter() - t0
            del grads
            out["peers"][peer]["times_s"].append(dt)
    for peer, rec in out["peers"].items():
        ts = rec["times_s"]
        rec["median_s"] = statistics.median(ts)
        rec["min_s"], rec["max_s"] = min(ts), max(ts)
        if peer == "compile":
            rec["compile_s"] = max(0.0, rec["first_call_s"] - rec["median_s"])
    out["torch_threads"] = torch.get_num_threads()
    return out


def worker_memory(spec: dict) -> dict:
    """Runs in a fresh process: peak RSS of one call above the RSS just before it (after a warm-up)."""
    _set_threads(spec["threads"])
    step, _ = make_step(spec["op"], spec["peer"], spec["size"], spec["dim"], spec["dtype"])
    step()  # warm-up at full size: compilation, thread pools, one-time allocations
    from memory import measure_call_peak

    return {**measure_call_peak(step),
            "method": "VmHWM - VmRSS before the call; warm-up call, malloc_trim, clear_refs=5 first"}


def worker_ceiling(spec: dict) -> dict:
    """GEMM rates at the run's thread count: MKL sgemm (torch.mm), the kernels' tile GEMM, bf16 torch.mm."""
    import torch

    from ibkd import _C

    _set_threads(spec["threads"])
    m, k, n = CEILING_SHAPE
    flops = 2.0 * m * k * n
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    c32 = torch.empty(m, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    # Every rate writes into a preallocated output. bf16 once allocated its 32 MiB result per call: on the
    # Zen 4 (2026-12-04, 20:50 UTC) four fresh processes read 176-293 GFLOP/s that way and 379-388 with
    # out=, in the same processes; the slow first calls moved a run's start-to-end bf16 rate by 110 %.
    c16 = torch.empty(m, n, dtype=torch.bfloat16)
    calls = {
        "sgemm_mkl": lambda: torch.mm(a32, b32, out=c32),
        "sgemm_kernel_tile_gemm": lambda: _C.tile_gemm(c32, a32, b32, 0.0, 1.0),
        "bf16_gemm_torch": lambda: torch.mm(a16, b16, out=c16),
    }
    gemm_info = _C.cpu_gemm_info()
    if not gemm_info["native_bf16"]:
        # no native bf16: torch.mm runs oneDNN's reference loop (~1 GFLOP/s, ~2 min for 8 calls), a rate no
        # bf16 case here would use as its ceiling
        del calls["bf16_gemm_torch"]
    rates = {}
    for name, fn in calls.items():
        fn()
        times = []
        for _ in range(spec.get("reps", 7)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rates[name] = flops / statistics.median(times) / 1e9
    return {"gflops": rates, "memory_gbps": memory_rates(), "shape_mkn": [m, k, n],
            "gemm_info": gemm_info, "loadavg": list(os.getloadavg())}


def memory_rates(reps: int = 15) -> dict:
    """Memory rates at the run's thread count, in GB/s: ``stream_add`` (c = a + b over touched 256 MiB
    buffers: 3 × 256 MiB per call) and ``fresh_alloc`` (a new 256 MiB tensor filled: what a fresh
    temporary costs, page faults included, under this process's allocator settings). Why: the eager and
    compile peers are bound by these, not by the GEMM rate. On 2026-12-04 the AVX2 host kept its sgemm
    rate (175 GFLOP/s) while eager InfoNCE 16384 swung between 14 and 26 s (11 s the day before): a run
    bracketed by GEMM rates alone would have been published with its eager peer twice as slow.

    Each rate is the best of ``reps`` calls, not their median: within one process on the idle host
    (2026-12-04 19:10 UTC) six medians of 15 calls read fresh_alloc 11.9-14.0 GB/s, the best of 15 12.4-15.1
    (whether the kernel hands out huge pages to a 256 MiB fill comes and goes call by call). Across fresh
    processes even the best of 15 still spreads by > 20 % (``judge_noise``), so these rates are recorded,
    not used to decide whether a run was quiet."""
    import torch

    elems = 64 * 2**20
    a, b, c = torch.ones(elems), torch.ones(elems), torch.empty(elems)
    calls = {"stream_add": (lambda: torch.add(a, b, out=c), 3 * 4 * elems),
             "fresh_alloc": (lambda: torch.empty(elems).fill_(1.0), 4 * elems)}
    rates = {}
    for name, (fn, nbytes) in calls.items():
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rates[name] = nbytes / min(times) / 1e9
    return rates


# ------------------------------------------------------------------------------------- driver


def _spawn(kind: str, spec: dict, policy: str, timeout: float) -> dict:
    sys.path.insert(0, HERE)
    import bench_common as bc

    env = bc.child_env()
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"{kind} worker exited with {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load_snapshot() -> dict:
    snap = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,rss,comm", "--sort=-pcpu", "--no-headers"],
                             capture_output=True, text=True, timeout=10).stdout.splitlines()
        snap["top_processes"] = [" ".join(line.split()) for line in out[:5]]
    except Exception:
        pass
    return snap


def _log(msg: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", file=sys.stderr, flush=True)


def run_protocol(quick: bool, threads: int, policies: list[str], out_path: str, skip_memory=False,
                 rounds=None, only=None) -> dict:
    """The whole protocol; ``rounds`` overrides every case's round count and ``only`` keeps the cases
    whose key contains that text (both for rehearsals: such a run is marked and never published)."""
    sys.path.insert(0, HERE)
    import bench_common as bc

    main_cases, crossover_cases = quick_plan() if quick else full_plan()
    if rounds:
        main_cases = [dict(c, rounds=rounds) for c in main_cases]
        crossover_cases = [dict(c, rounds=rounds) for c in crossover_cases]
    if only:
        main_cases = [c for c in main_cases if only in case_key(c)]
        crossover_cases = [c for c in crossover_cases if only in case_key(c)]
    doc = {
        "schema": "protocol-1", "quick": quick, "threads": threads, "policies": policies,
        "machine": bc.machine_info("cpu"), "started_at": _now(), "settings": {
            "temperature": TEMPERATURE, "hsic_gamma": "0.5/D", "hsic_kernel": "rbf", "infonce_N": "= B",
            "normalize": True, "mode": "forward+backward (both inputs require grad)",
            "gradcache_mini_batch": GRADCACHE_MINI_BATCH, "noise_limit": NOISE_LIMIT,
            "allocator": bc.allocator_settings()},
        "ceiling": {}, "cases": [], "crossover": [], "load": {"start": _load_snapshot()},
        "rehearsal": bool(rounds or only or skip_memory or policies != ["default", "PASSIVE"]),
    }

    def save():
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, out_path)

    _log(f"ceiling (start), {threads} threads")
    doc["ceiling"]["start"] = _spawn("ceiling", {"threads": threads}, "default", 600)
    _log(f"  {doc['ceiling']['start'].get('gflops')} GFLOP/s, {doc['ceiling']['start'].get('memory_gbps')} GB/s")
    if not (doc["ceiling"]["start"].get("gemm_info") or {}).get("native_bf16", True):
        # no AVX512-BF16 / AMX-BF16: the eager and compile peers' bf16 matmuls run oneDNN's reference loop
        # (~1 GFLOP/s; an InfoNCE 16384 call would take ~10 minutes) and the kernels upcast (gemm.cpp)
        reason = "this CPU has no native bf16 (AVX512-BF16 / AMX-BF16): bf16 cases are not measured here"
        doc["skipped"] = [dict(key=case_key(c), reason=reason) for c in main_cases if c["dtype"] == "bfloat16"]
        main_cases = [c for c in main_cases if c["dtype"] != "bfloat16"]
        _log(f"  {reason}")
    save()
    for case in main_cases:
        rec = dict(case, peers=peers_for(case["op"]), key=case_key(case), timing={}, memory={})
        rec["kernel_flops"] = kernel_flops(case["op"], case["size"], case["dim"], threads)
        for policy in [p for p in policies if p in case.get("policies", policies)]:
            _log(f"time {rec['key']} policy={policy} rounds={case['rounds']}")
            # GradCache is a peer of the default policy only: its thousands of small ops make it the
            # slowest peer by far, and the PASSIVE process is there to check the kernels' lead
            peers = [p for p in rec["peers"] if policy == "default" or p != "gradcache"]
            spec = dict(case, peers=peers, threads=threads)
            rec["timing"][policy] = _spawn("time", spec, policy, 3600)
            rec["timing"][policy]["load_after"] = _load_snapshot()
            t = rec["timing"][policy]
            if "error" in t:
                _log(f"  ERROR {t['error']}")
            else:
                _log("  " + ", ".join(f"{p} {v['median_s']:.3f}s" for p, v in t["peers"].items()))
            save()
        if not skip_memory:
            for peer in rec["peers"]:
                _log(f"memory {rec['key']} {peer}")
                spec = dict(case, peer=peer, threads=threads)
                rec["memory"][peer] = _spawn("memory", spec, "default", 3600)
                m = rec["memory"][peer]
                _log(f"  {m.get('extra_bytes', 0) / 2**20:.1f} MiB" if "error" not in m else f"  ERROR {m['error']}")
        doc["cases"].append(rec)
        save()
    for case in crossover_cases:
        _log(f"crossover {case_key(case)}")
        spec = dict(case, peers=["eager", "fused"], threads=threads)
        t = _spawn("time", spec, "default", 1800)
        doc["crossover"].append(dict(case, key=case_key(case), timing={"default": t}))
        save()
    _log("ceiling (end)")
    doc["ceiling"]["end"] = _spawn("ceiling", {"threads": threads}, "default", 600)
    _log(f"  {doc['ceiling']['end'].get('gflops')} GFLOP/s, {doc['ceiling']['end'].get('memory_gbps')} GB/s")
    doc["load"]["end"] = _load_snapshot()
    doc["finished_at"] = _now()
    summarize(doc)
    save()
    return doc


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def measure_ceiling(threads: int, timeout: float = 600) -> dict:
    """The machine's GEMM rates now, in a fresh process under the current wait policy (step 1 / 5)."""
    return _spawn("ceiling", {"threads": threads}, os.environ.get("OMP_WAIT_POLICY", "default"), timeout)


def judge_noise(doc: dict) -> bool:
    """How far each ceiling rate moved between ``doc["ceiling"]["start"]`` and ``["end"]``, and the verdict:
    noisy when a GEMM rate moved by more than NOISE_LIMIT, or when there is nothing to compare (in place).

    The memory rates are recorded beside them (``ceiling_moved``) but do not decide: from 2026-12-04 (morning)
    to 19:15 UTC they did, and then six fresh ceiling processes on the idle host read fresh_alloc 11.9-16.1 GB/s
    and stream_add 31.2-42.4 GB/s even as the best of 15 calls (GEMM rates 158-178 GFLOP/s): one start/end
    pair of them moves > 20 % by chance, so as a gate they marked runs noisy at random (the training-step
    run of 17:51 had GEMM rates within 0.6 % and fresh_alloc 29 % apart). The GEMM rates are what issue 14's
    protocol brackets; the memory rates stay in the results, to read beside an eager peer that moved."""
    first, last = doc["ceiling"].get("start") or {}, doc["ceiling"].get("end") or {}
    start = {**(first.get("gflops") or {}), **(first.get("memory_gbps") or {})}
    end = {**(last.get("gflops") or {}), **(last.get("memory_gbps") or {})}
    moved = {k: abs(end[k] - start[k]) / start[k] for k in start if k in end and start[k] > 0}
    gate = [k for k in (first.get("gflops") or {}) if k in moved]
    doc["ceiling_moved"] = moved
    doc["noise_gate"] = gate
    doc["noisy"] = (not gate) or any(moved[k] > NOISE_LIMIT for k in gate)
    return doc["noisy"]


def summarize(doc: dict) -> None:
    """Ratios, share of the ceiling, targets, crossover sizes and the noise verdict (in place)."""
    judge_noise(doc)
    start = (doc["ceiling"].get("start") or {}).get("gflops") or {}
    end = (doc["ceiling"].get("end") or {}).get("gflops") or {}
    ceiling_fp32 = statistics.mean([x for x in (start.get("sgemm_kernel_tile_gemm"), end.get("sgemm_kernel_tile_gemm")) if x] or [float("nan")])
    ceiling_mkl = statistics.mean([x for x in (start.get("sgemm_mkl"), end.get("sgemm_mkl")) if x] or [float("nan")])
    for c in doc["cases"]:
        c["summary"] = {}
        for policy, t in c["timing"].items():
            if "error" in t:
                continue
            p = t["peers"]
            s = {"median_s": {k: v["median_s"] for k, v in p.items()}}
            fused = p["fused"]["median_s"]
            s["fused_vs"] = {k: fused / v["median_s"] for k, v in p.items() if k != "fused"}
            s["fused_gflops"] = c["kernel_flops"] / fused / 1e9
            s["share_of_kernel_gemm_ceiling"] = s["fused_gflops"] / ceiling_fp32
            s["share_of_mkl_sgemm_ceiling"] = s["fused_gflops"] / ceiling_mkl
            if "compile" in p:
                s["compile_s"] = p["compile"].get("compile_s")
            c["summary"][policy] = s
        mem = {k: v.get("extra_bytes") for k, v in c["memory"].items() if "error" not in v}
        if mem.get("eager"):
            c["memory_vs_eager"] = {k: v / mem["eager"] for k, v in mem.items() if v is not None}
    targets = []
    by = {(c["op"], c["size"], c["dtype"]): c for c in doc["cases"]}
    for t in TARGETS:
        c = by.get((t["op"], t["size"], t["dtype"]))
        row = dict(t)
        if c:
            for policy in doc["policies"]:
                r = (c["summary"].get(policy) or {}).get("fused_vs", {}).get(t["vs"])
                row[f"time_ratio_{policy}"] = r
            r = row.get("time_ratio_default")
            row["time_pass"] = r is not None and r <= t["max_time_ratio"]
            rp = row.get("time_ratio_PASSIVE")
            row["lead_under_passive"] = rp is not None and rp < 1.0
            if "max_mem_ratio" in t:
                m = (c.get("memory_vs_eager") or {}).get("fused")
                row["mem_ratio"] = m
                row["mem_pass"] = m is not None and m <= t["max_mem_ratio"]
        targets.append(row)
    doc["targets"] = targets
    cross = {}
    for op in ("infonce", "hsic"):
        pts = []
        for c in doc["crossover"] + [c for c in doc["cases"] if c["dtype"] == "float32"]:
            if c["op"] != op or c["dtype"] != "float32":
                continue
            t = c["timing"].get("default") or {}
            if "error" in t or not t:
                continue
            pts.append((c["size"], t["peers"]["fused"]["median_s"] / t["peers"]["eager"]["median_s"]))
        pts.sort()
        # the smallest measured size from which fused is faster at every larger measured size
        size = None
        for i, (s, r) in enumerate(pts):
            if all(rr < 1.0 for _, rr in pts[i:]):
                size = s
                break
        cross[op] = {"fused_faster_from_size": size, "ratios_fused_over_eager": pts}
    doc["crossover_summary"] = cross


def results_path(quick: bool, noisy: bool = False) -> str:
    sys.path.insert(0, HERE)
    import bench_common as bc

    name = f"protocol-{bc.machine_id('cpu')}{'-noisy' if noisy else ''}.json"
    return os.path.join(HERE, "results", "quick" if quick else "", name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--publish", action="store_true", help="render README + results when the run is not noisy")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--policies", default="default,PASSIVE")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--rounds", type=int, help="override the rounds of every case (rehearsal)")
    ap.add_argument("--only", help="only the cases whose key contains this text (rehearsal)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        fn = {"time": worker_time, "memory": worker_memory, "ceiling": worker_ceiling}[kind]
        print(json.dumps(fn(spec)))
        return 0
    sys.path.insert(0, HERE)
    import render

    readmes = ["--readme", os.path.join(ROOT, "README.md"), "--readme", os.path.join(HERE, "README.md")]
    if args.render_only:
        render.main(readmes if args.publish else [])
        return 0
    tmp_path = results_path(args.quick) + ".running"
    doc = run_protocol(args.quick, args.threads, args.policies.split(","), tmp_path, args.skip_memory,
                       args.rounds, args.only)
    final = results_path(args.quick, noisy=doc["noisy"])
    if doc["rehearsal"]:  # never published, never overwrites a real run
        final = final.replace(".json", "-rehearsal.json")
    os.replace(tmp_path, final)
    _log(f"results: {os.path.relpath(final, ROOT)}; ceiling moved {doc['ceiling_moved']}; noisy={doc['noisy']}")
    for t in doc["targets"]:
        _log(f"target {t}")
    if doc["noisy"]:
        _log("NOISY run (ceiling moved > 20%): not rendered; re-run on a quiet machine")
        return 3
    if doc["rehearsal"]:
        _log("rehearsal (rounds/only/skip-memory/policies overridden): not rendered")
        return 0
    if args.publish and not args.quick:
        render.main(readmes)
    elif args.quick:
        render.main(["--results", os.path.dirname(final)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
