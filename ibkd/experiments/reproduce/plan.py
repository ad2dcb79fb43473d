"""The whole plan in one call: the STS-B files every row is scored on, phase one, the sweep's choice,
phase two, the embedding comparison and the GPU hook, then the results document from every finished row
of the current settings on disk (rows run now and rows reused from an earlier invocation alike)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from ...distill.config import DATA_DIR_ENV, default_data_dir
from ..embedding import stsb_paths
from .aggregate import assemble, choose, settings_study
from .gpu import run_gpu_timing
from .rows import (Context, Row, check_train_config, embedding_row, phase_one_rows, phase_three_rows, phase_two_rows,
                   study_confirm_rows)
from .run import execute, load_published, log_stderr, stored_result
from .spec import ReproduceError
from .workers import run_in_workers

GROUPS = ("teacher", "none", "mse", "st_mse", "contrastive", "sweep", "study", "model2vec", "ibkd", "auto",
          "study_confirm", "stage2_sweep", "finetune", "compact", "embedding", "gpu")
# groups a requested group needs first (the rows of these that are already finished are simply reused)
NEEDS = {"ibkd": ("sweep", "auto"), "study_confirm": ("study", "auto"), "stage2_sweep": ("sweep", "auto"),
         "finetune": ("sweep", "auto", "stage2_sweep", "ibkd"), "compact": ("sweep", "auto")}


def prepare_sts(spec: dict, output: Path, data_dir: str) -> dict:
    """STS-B train/dev/test paths every row uses: the benchmark's files under the data folder, or truncated
    copies of them under ``<output>/sts-limited`` when ``sts_limit`` is set (smoke runs)."""
    paths = stsb_paths(data_dir)
    limit = spec.get("sts_limit")
    if limit:
        target = output / "sts-limited"
        target.mkdir(parents=True, exist_ok=True)
        for split, path in paths.items():
            lines = [ln for ln in Path(path).read_text(encoding="utf-8").split("\n") if ln.strip()][:limit]
            new = target / f"sts-{split}.csv"
            text = "\n".join(lines) + "\n"
            if not new.is_file() or new.read_text(encoding="utf-8") != text:
                new.write_text(text, encoding="utf-8")
            paths[split] = str(new)
    return paths


def make_context(spec: dict, *, data_dir: Optional[str] = None, progress: bool = True,
                 log: Callable[[str], None] = log_stderr, reuse_results: Optional[str] = None) -> Context:
    """``data_dir``: the folder ``{data_dir}`` stands for (``--data_dir``), else the config's
    ``common.data_dir``, else ``$IBKD_DATA_DIR``. ``reuse_results``: a published results file whose rows
    of unchanged settings are taken instead of being trained again."""
    data_dir = data_dir or spec["common"].get("data_dir") or default_data_dir()
    if not data_dir:
        raise ReproduceError(f"the data folder (STS-B, the corpus) is not set: pass --data_dir or set ${DATA_DIR_ENV}")
    data_dir = str(Path(os.path.expanduser(str(data_dir))).resolve())
    output = Path(spec["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    sts = prepare_sts(spec, output, data_dir)
    cache_dir = spec.get("cache_dir") or str(output / "teacher_cache")
    progress = progress and spec["common"].get("progress", True)
    published = load_published(reuse_results) if reuse_results else None
    return Context(spec, output, cache_dir, sts, data_dir, spec.get("num_threads"), progress, log, published)


def _stored(row: Row, ctx: Context) -> Optional[dict]:
    rec = stored_result(row, ctx)
    return {**rec, "reused": True} if rec is not None else None


def _stand_in_student(ctx: Context, row: Row) -> str:
    return str(ctx.output / row.name / "student")


def study_leader(first: list[Row], record: Callable[[Row], Optional[dict]], spec: dict) -> Optional[Row]:
    """The study row that beats common's own setting (its β=auto first-seed row) on dev, if any: the
    results' own verdict (:func:`settings_study`) before any confirmation at the other seeds."""
    recs = [rec for rec in map(record, (r for r in first if r.group in ("auto", "study"))) if rec]
    study = settings_study(recs, spec)
    if not study["candidates"] or study["best_dev"] == "config":
        return None
    return next(r for r in first if r.group == "study" and r.info.get("study_name") == study["best_dev"])


def run_plan(spec: dict, *, groups: Optional[list] = None, data_dir: Optional[str] = None, progress: bool = True,
             argv: Optional[list] = None, log: Callable[[str], None] = log_stderr,
             reuse_results: Optional[str] = None) -> dict:
    """Run the requested groups (default: all) and assemble the results document from every finished
    row of the current settings on disk (and, with ``reuse_results``, of a published results file)."""
    started = time.time()
    ctx = make_context(spec, data_dir=data_dir, progress=progress, log=log, reuse_results=reuse_results)
    wanted = set(groups or GROUPS)
    for g in list(wanted):
        wanted |= set(NEEDS.get(g, ()))
    first = phase_one_rows(ctx)
    # check every TrainConfig of the plan before anything trains (phase two with a stand-in choice)
    stand_in = next(r for r in first if r.group == "sweep")
    second_stand_in = phase_two_rows(ctx, stand_in, _stand_in_student(ctx, stand_in))
    for row in first + second_stand_in:
        if row.kind == "train":
            check_train_config(row)
    records: dict[str, dict] = {}
    total = len(first) + len(second_stand_in) + 2 * max(0, len(ctx.spec.get("seeds", [1, 2, 3])) - 1)
    done = 0

    workers = spec.get("workers") or 1

    def run_rows(rows: list[Row]) -> None:
        nonlocal done
        items = []
        for row in rows:
            done += 1
            if row.group in wanted:
                items.append((row, f"[{done}/{total}] "))
        if workers > 1 and len(items) > 1:
            run_in_workers(items, ctx, records, workers)
            return
        for row, index in items:
            records[row.name] = execute(row, ctx, index=index, records=records)

    def record(row: Row) -> Optional[dict]:
        return records.get(row.name) or _stored(row, ctx)

    run_rows(first)
    # the IBKD setting, chosen on dev among the fixed-β sweep and β=auto (its first-seed row; the library default)
    seeds = spec.get("seeds", [1, 2, 3])
    candidates = [r for r in first if r.group == "sweep" or (r.group == "auto" and r.seed == seeds[0])]
    chosen = choose([rec for rec in map(record, candidates) if rec])
    leader = study_leader(first, record, spec)
    # a change that led the study at the first seed runs at the other seeds too (beside phase two's rows)
    confirm = study_confirm_rows(ctx, leader) if leader is not None else []
    second: list[Row] = []
    third: list[Row] = []
    stage2_chosen = None
    if chosen is not None:
        chosen_row = next(r for r in candidates if r.name == chosen["name"])
        is_auto = chosen_row.group == "auto"  # then its other seeds are the auto rows themselves
        second = confirm + phase_two_rows(ctx, chosen_row, chosen["student"], repeat_seeds=not is_auto)
        run_rows(second)
        stage2_rows = [r for r in second if r.group == "stage2_sweep"]
        stage2_chosen = choose([rec for rec in map(record, stage2_rows) if rec])
        if stage2_chosen is not None:
            # the chosen IBKD setting's students of the other seeds, for the chosen stage 2 at every seed
            parents = {}
            repeats = "auto" if is_auto else "ibkd"
            for r in (first if is_auto else second):
                rec = record(r) if r.group == repeats and r.seed != seeds[0] else None
                if rec and rec.get("status") == "done":
                    parents[r.seed] = (r, rec["student"])
            third = phase_three_rows(ctx, chosen_row, next(r for r in stage2_rows if r.name == stage2_chosen["name"]),
                                     parents)
            run_rows(third)
    else:
        second = confirm
        run_rows(second)
        if wanted & {"ibkd", "stage2_sweep", "finetune", "compact"}:
            log("no finished sweep row: the ibkd, stage 2 and compact rows need the sweep's choice")
    emb = embedding_row(ctx)
    if emb is not None and "embedding" in wanted:
        records[emb.name] = execute(emb, ctx, index="[embedding] ")
    gpu = run_gpu_timing(ctx) if "gpu" in wanted else {"status": "not requested"}
    final = []
    for row in first + second + third + ([emb] if emb is not None else []):
        # rows not run now: their stored result of the same settings, if any
        rec = records.get(row.name) or _stored(row, ctx)
        if rec is None:
            rec = {"name": row.name, "group": row.group, "kind": row.kind, "seed": row.seed,
                   "config_hash": row.config_hash(), **row.info, "status": "not run",
                   "reason": "not requested in this invocation"}
        final.append(rec)
    return assemble(spec, final, chosen, gpu, started, argv or [], stage2_chosen=stage2_chosen)
