"""Several rows of one phase at once, each in its own process with its share of the threads.

Why: a 2-layer student's training step at batch 256 (chunks of 32 sentences) uses two cores poorly. Measured
on the 2-core CPU host (the step of ``benchmarks/test_bench_length_chunks.py``, bf16, median of 6, default
OpenMP policy): 1.13 s with 2 threads, against 1.48-1.64 s for each of two 1-thread steps run side by side,
i.e. 1.45x the rows per hour with two workers. The thread count is not one of a row's settings (not in its
hash): a row finished by a worker is reused by a sequential run, and the reverse.

Rows are started in the plan's order; a row whose ``needs`` are still open waits for them. Workers are
spawned (not forked: libgomp's thread pool does not survive a fork) and kept for the whole phase.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from .rows import Context, Row
from .run import execute, log_stderr, set_threads, stored_result

# the TrainConfig fields that decide which teacher cache a stage-1 row reads
CACHE_FIELDS = ("teacher", "corpus", "corpus_column", "corpus_limit", "extra_stsb_sentences", "max_length",
                "pca_dim", "cache_dir", "teacher_embeddings", "data_dir", "pooling", "normalize")


def threads_per_worker(ctx: Context, workers: int) -> int:
    """The invocation's threads (``num_threads``, else the CPU count) shared out among the workers."""
    return max(1, (ctx.num_threads or os.cpu_count() or 1) // workers)


def build_caches_first(rows: list[Row], ctx: Context) -> None:
    """Build the teacher caches the unfinished stage-1 rows read, here, with all the threads, before the
    workers start: otherwise the first two rows would both need the cache at once, one building it on its
    share of the threads while the other waits for it."""
    from ...distill.config import TrainConfig
    from ...distill.inputs import corpus_sentences, load_teacher, teacher_vectors
    from ...distill.preflight import resolve_device

    set_threads(ctx.num_threads)
    seen = set()
    for row in rows:
        if row.kind != "train" or row.train.get("stage") != "distill" or row.train.get("method") == "none":
            continue
        if stored_result(row, ctx) is not None:
            continue
        key = tuple(str(row.train.get(k)) for k in CACHE_FIELDS)
        if key in seen:
            continue
        seen.add(key)
        cfg = TrainConfig.from_dict({**row.train, "output_dir": str(ctx.output / row.name)})
        if cfg.teacher_embeddings:
            continue
        ctx.log(f"teacher cache for {row.name} and the rows that share it ...")
        teacher_vectors(cfg, load_teacher(cfg), corpus_sentences(cfg), resolve_device(cfg.device))


def _worker_init(threads: int, progress: bool) -> None:
    set_threads(threads)
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def run_in_workers(items: list[tuple[Row, str]], ctx: Context, records: dict, workers: int) -> None:
    """Execute ``items`` (row, its progress label) on ``workers`` processes; each finished row's record
    goes into ``records`` under its name, as :func:`execute` returns it."""
    threads = threads_per_worker(ctx, workers)
    # what a worker receives must pickle: the log goes to stderr there, whatever the caller's callable is
    wctx = dataclasses.replace(ctx, num_threads=threads, log=log_stderr)
    build_caches_first([row for row, _ in items], ctx)
    ctx.log(f"running up to {workers} rows at once, {threads} thread(s) each")
    pending = list(items)
    running: dict[Future, Row] = {}
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads, ctx.progress))
    try:
        while pending or running:
            open_names = {r.name for r, _ in pending} | {r.name for r in running.values()}
            for item in list(pending):
                if len(running) >= workers:
                    break
                row, index = item
                blocked = any(n in open_names for n in row.info.get("needs", []))
                if blocked and (running or item is not pending[0]):
                    continue  # waits for its parent rows (with nothing running, execute reports them missing)
                train = {**row.train, "num_threads": threads} if row.train else row.train
                future = pool.submit(execute, dataclasses.replace(row, train=train), wctx, index=index,
                                     records=dict(records))
                running[future] = row
                pending.remove(item)
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                row = running.pop(future)
                try:
                    records[row.name] = future.result()
                except Exception as exc:  # noqa: BLE001 - a dead worker costs its row, not the phase
                    message = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    ctx.log(f"{row.name}: FAILED in its worker ({message})")
                    records[row.name] = {"name": row.name, "group": row.group, "kind": row.kind, "seed": row.seed,
                                         "config_hash": row.config_hash(), **row.info, "status": "failed",
                                         "reason": message}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
