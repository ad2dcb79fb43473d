"""Running one row: unless its finished result (same settings hash) is on disk, train it through the
application's public entry point (:func:`ibkd.distill.trainer.run`), score the student on STS-B dev/test
with encode throughput, and store ``result.json``. A row that fails is recorded as failed and the plan
goes on; a rerun resumes it from its last checkpoint when its settings are unchanged."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ...distill import trainer
from ...distill._io import atomic_write_text
from ...distill.config import TrainConfig
from ...distill.embedding_table import save_small_table
from ...distill.evaluation import evaluate_sts
from ...distill.models import Encoder
from ...distill.plotting import log_columns, read_training_log
from ..embedding import EmbeddingTaskConfig, compare_embeddings, train_sts_embedding
from .rows import Context, Row
from .spec import ReproduceError

RESULT_NAME = "result.json"
ROW_CONFIG_NAME = "row_config.json"
# log keys that are not per-step curves
NOT_CURVES = ("epoch", "nan_skips", "dev_spearman")


def atomic_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def finished_result(folder: Path, config_hash: str, resolved: Optional[dict] = None) -> Optional[dict]:
    """The stored result of a finished row when it was produced by the same settings, else None: the same
    hash and, where the result recorded them, the same resolved settings (``resolved``: library defaults
    filled in; results written before they were recorded are matched by the hash alone). Paths are
    re-anchored at ``folder`` (the output folder may have moved since)."""
    path = folder / RESULT_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if doc.get("config_hash") != config_hash or doc.get("status") != "done":
        return None
    if resolved is not None and doc.get("resolved_config") not in (None, resolved):
        return None
    if doc.get("student_path"):
        doc["student"] = str(folder / doc["student_path"])
    return doc


def stored_result(row: Row, ctx: Context) -> Optional[dict]:
    """The row's finished result of the same settings: its own folder's, else (``--reuse_results``) the
    same row of a published results file, written into the folder first and marked as restored. A restored
    row has no trained student on disk: a row that would train from it fails and says so."""
    folder = ctx.output / row.name
    h, resolved = row.config_hash(), row.resolved_config()
    done = finished_result(folder, h, resolved)
    if done is not None or not ctx.published:
        return done
    rec = ctx.published["rows"].get(row.name)
    if not rec or rec.get("config_hash") != h or rec.get("status") != "done":
        return None
    if resolved is not None and rec.get("resolved_config") not in (None, resolved):
        return None
    restored = {k: v for k, v in rec.items() if k not in ("reused", "student")}
    restored["restored_from"] = {"file": ctx.published["file"], "git_commit": ctx.published["git_commit"]}
    atomic_json(folder / RESULT_NAME, restored)
    ctx.log(f"{row.name}: restored from {ctx.published['file']} (same settings hash; run at commit "
            f"{ctx.published['git_commit']})")
    return finished_result(folder, h, resolved)


def load_published(path: str) -> dict:
    """The rows of a published results document (``ibkd reproduce --reuse_results``), by name."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReproduceError(f"--reuse_results: cannot read {path} as a results JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or doc.get("quick"):
        raise ReproduceError(f"--reuse_results: {path} is not the results JSON of a full `ibkd reproduce` run")
    return {"file": str(path), "git_commit": (doc.get("environment") or {}).get("git_commit"),
            "rows": {r["name"]: r for r in doc["rows"] if isinstance(r, dict) and "name" in r}}


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def set_threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(n)


def teacher_spec(ctx: Context) -> str:
    """The teacher as Encoder.load takes it ("default", a hub id, or a folder with {data_dir} resolved)."""
    spec = str(ctx.spec["common"]["teacher"])
    if spec == "default" or "{data_dir}" not in spec:
        return spec
    if not ctx.data_dir:
        raise ReproduceError(f"common.teacher {spec} needs the data folder: pass --data_dir or set $IBKD_DATA_DIR")
    return os.path.expanduser(spec.replace("{data_dir}", ctx.data_dir))


def evaluate_encoder(encoder, sts: dict, batch_size: int) -> dict:
    """STS-B dev/test Spearman ×100, parameter count, output dim and encode throughput.

    Throughput (sentences per second, tokenization included) is the better of the two passes: the first
    pass also pays one-off warm-up, and on a shared machine the slower pass mostly measures the others."""
    out, per_split = {}, {}
    for split in ("dev", "test"):
        res = evaluate_sts(encoder.encode, sts[split], batch_size=batch_size, name=f"stsb-{split}")
        out[f"{split}_spearman"] = float(res["spearman"])
        out["parameters"], out["embedding_dim"] = res["parameters"], res["embedding_dim"]
        per_split[split] = res["sentences_per_second"]
    rates = [r for r in per_split.values() if isinstance(r, (int, float)) and r > 0 and not math.isnan(r)]
    out["sentences_per_second"] = max(rates) if rates else None
    out["sentences_per_second_by_split"] = per_split
    return out


def read_curve(log_path: Path) -> dict:
    """Per-step columns of a ``train_log.jsonl`` (loss terms, grad norms at the student output, lr); only
    the step records (those with a loss), so summary lines a trainer appends do not shift the columns."""
    records = [r for r in read_training_log(log_path) if "step" in r and "loss" in r]
    return log_columns(records, skip=NOT_CURVES)


def curve_stats(curve: dict) -> dict:
    """What the sweep table shows: mean ‖∇(β·HSIC)‖/‖∇InfoNCE‖ at the student output, HSIC first→last,
    the last value of each term (and the β in use)."""
    out = {}
    gi, gh = curve.get("grad_norm_infonce"), curve.get("grad_norm_hsic")
    if gi and gh:
        ratios = [h / i for h, i in zip(gh, gi) if h is not None and i]
        out["grad_ratio_hsic_infonce"] = sum(ratios) / len(ratios) if ratios else None
    if curve.get("hsic"):
        out["hsic_first"], out["hsic_last"] = curve["hsic"][0], curve["hsic"][-1]
    for term in ("infonce", "mse", "loss", "beta"):
        if curve.get(term):
            out[f"{term}_last"] = curve[term][-1]
    return out


def run_teacher_row(row: Row, ctx: Context) -> dict:
    encoder = Encoder.load(teacher_spec(ctx), max_length=row.info["max_length"])
    return {"train_seconds": None, **evaluate_encoder(encoder, ctx.sts, ctx.spec.get("eval_batch_size", 128))}


def run_train_row(row: Row, ctx: Context, folder: Path) -> dict:
    """Train the row in ``folder``: resumed from its last checkpoint when an interrupted run of the same
    settings left one, else from scratch (whatever the folder held is replaced)."""
    values = {**row.train, "output_dir": str(folder)}
    parent = row.train.get("student") if row.info.get("parent") else None  # stage 2 from a row of this plan
    if parent and not Path(parent).exists():
        raise ReproduceError(f"its parent's student {parent} is not on disk (a row restored by --reuse_results brings "
                             f"its scores, not its student): run the parent row again without --reuse_results")
    row_cfg_path = folder / ROW_CONFIG_NAME
    previous = json.loads(row_cfg_path.read_text()) if row_cfg_path.is_file() else {}
    checkpoint = trainer.last_checkpoint(folder) if previous.get("config_hash") == row.config_hash() else None
    if checkpoint is not None:
        values["resume"] = True
        ctx.log(f"  resuming {row.name} from {checkpoint}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        values["overwrite_output_dir"] = True  # the row's own config file is all the folder holds now
    folder.mkdir(parents=True, exist_ok=True)
    atomic_json(row_cfg_path, {"config_hash": row.config_hash(), "train": values})
    cfg = TrainConfig.from_dict(values)
    started = time.perf_counter()
    summary = trainer.run(cfg)
    train_seconds = time.perf_counter() - started
    curve = read_curve(Path(summary["log"]))
    step_seconds = None
    if curve.get("sentences_per_s"):
        # stage 2 encodes anchor and positive per pair: two sentences per row of the batch
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * (2 if cfg.stage == "finetune" else 1)
        step_seconds = sum(per_step / v for v in curve["sentences_per_s"] if v)
    set_threads(ctx.num_threads)
    student_dir = Path(summary["student"])
    student = Encoder.load(str(student_dir), max_length=cfg.max_length)
    scores = evaluate_encoder(student, ctx.sts, ctx.spec.get("eval_batch_size", 128))
    for stale in folder.glob("checkpoint-*"):
        if stale.is_dir():  # optimizer state is ~3x the model: the finished student is what is kept
            shutil.rmtree(stale)
    return {"steps": summary.get("steps", 0), "train_seconds": train_seconds if row.train.get("method") != "none" else None,
            "step_seconds": step_seconds, "student": str(student_dir),
            "student_path": os.path.relpath(student_dir, folder), **scores, "curve": curve,
            "curve_stats": curve_stats(curve)}


def run_table_row(row: Row, ctx: Context, folder: Path) -> dict:
    """Train the small word-embedding table (distilled by encoding) on STS-B and save it."""
    table_cfg = dict(row.info["table"])
    common = ctx.spec["common"]
    max_length = common.get("max_length", TrainConfig.max_length)
    fields = set(EmbeddingTaskConfig.__dataclass_fields__)
    unknown = sorted(set(table_cfg) - fields)
    if unknown:
        raise ReproduceError(f"compact.table: unknown key(s) {', '.join(unknown)} (EmbeddingTaskConfig fields: "
                             f"{', '.join(sorted(fields))})")
    teacher = Encoder.load(teacher_spec(ctx), max_length=max_length)
    big_table = teacher.model.get_input_embeddings().weight.detach().float().clone()
    cfg = EmbeddingTaskConfig(**{"method": "distilled", "seed": row.seed, "max_length": max_length, "device": "cpu",
                                 **table_cfg})
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    result = train_sts_embedding(teacher.tokenizer, big_table, ctx.sts["train"], ctx.sts["dev"], ctx.sts["test"], cfg)
    seconds = time.perf_counter() - started
    table = result["table"]
    meta = {"d_small": int(table.shape[1]), "activation": cfg.activation, "method": result["method"],
            "teacher": common["teacher"], "vocab_size": int(table.shape[0]), "dev_spearman": result["dev_spearman"],
            "test_spearman": result["test_spearman"]}
    save_small_table(folder / "table", table, teacher.tokenizer, meta)
    set_threads(ctx.num_threads)  # the table trains with its own thread count (EmbeddingTaskConfig.num_threads)
    return {"train_seconds": seconds, "dev_spearman": result["dev_spearman"], "test_spearman": result["test_spearman"],
            "best_epoch": result["best_epoch"], "d_small": int(table.shape[1]), "parameters": int(table.numel()),
            "embedding_dim": int(table.shape[1]), "table": str(folder / "table")}


def run_st_mse_row(row: Row, ctx: Context, folder: Path) -> dict:
    """The field's recipe (sentence-transformers' MSELoss on their trainer), scored like every row."""
    from .st_mse_peer import run_st_mse_row as train_and_score

    out = train_and_score(row, ctx, folder, lambda encoder: evaluate_encoder(
        encoder, ctx.sts, ctx.spec.get("eval_batch_size", 128)))
    set_threads(ctx.num_threads)
    return out


def run_model2vec_row(row: Row, ctx: Context, folder: Path) -> dict:
    """Model2Vec's ``distill`` of the teacher (static embeddings), scored like every row."""
    from .model2vec_peer import run_model2vec_row as distill_and_score

    out = distill_and_score(row, ctx, folder, teacher=teacher_spec(ctx), evaluate=evaluate_encoder)
    set_threads(ctx.num_threads)
    return out


def run_embedding_row(row: Row, ctx: Context, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    doc = compare_embeddings(teacher_spec(ctx), sizes=tuple(row.info["sizes"]), seeds=tuple(row.info["seeds"]),
                             train_path=ctx.sts["train"], dev_path=ctx.sts["dev"], test_path=ctx.sts["test"],
                             progress=lambda message: ctx.log(f"  {message}"), **row.info["overrides"])
    return {"train_seconds": time.perf_counter() - started, "comparison": doc}


def execute(row: Row, ctx: Context, *, index: str = "", records: Optional[dict] = None) -> dict:
    """Run ``row`` unless its finished result (same settings) is on disk; returns the row record. A row
    that raises is recorded as failed (its partial folder and checkpoint are kept for the rerun) and the
    plan goes on."""
    folder = ctx.output / row.name
    h = row.config_hash()
    resolved = row.resolved_config()
    base = {"name": row.name, "group": row.group, "kind": row.kind, "seed": row.seed, "config_hash": h, **row.info}
    missing = [n for n in row.info.get("needs", []) if ((records or {}).get(n) or {}).get("status") != "done"]
    if missing:
        reason = f"needs {', '.join(missing)}, which did not finish"
        ctx.log(f"{index}{row.name}: skipped ({reason})")
        return {**base, "status": "skipped", "reason": reason}
    done = stored_result(row, ctx)
    if done is not None:
        ctx.log(f"{index}{row.name}: finished earlier (same settings), reused")
        return {**done, "reused": True}
    ctx.log(f"{index}{row.name}: {row.info.get('label', row.kind)} ...")
    set_threads(ctx.num_threads)
    started = time.perf_counter()
    try:
        if row.kind == "teacher":
            out = run_teacher_row(row, ctx)
        else:
            runner = {"train": run_train_row, "table": run_table_row, "embedding": run_embedding_row,
                      "st_mse": run_st_mse_row, "model2vec": run_model2vec_row}[row.kind]
            out = runner(row, ctx, folder)
    except Exception as exc:  # noqa: BLE001 - one failed row must not cost the others (rerun resumes it)
        message = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ctx.log(f"{index}{row.name}: FAILED after {time.perf_counter() - started:.0f} s ({message})")
        return {**base, "status": "failed", "reason": message}
    record = {**base, **out, "status": "done", "row_seconds": time.perf_counter() - started,
              "train_config": {k: v for k, v in row.train.items() if k != "progress"} or None,
              "resolved_config": resolved}
    atomic_json(folder / RESULT_NAME, record)
    scores = "".join(f" {s} {record[f'{s}_spearman']:.2f}" for s in ("dev", "test")
                     if isinstance(record.get(f"{s}_spearman"), (int, float)))
    ctx.log(f"{index}{row.name}: done in {record['row_seconds']:.0f} s;{scores}")
    return {**record, "reused": False}
