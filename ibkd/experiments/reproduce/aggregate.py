"""From row records to the results document: the sweep's choice (by dev only), seeds aggregated as mean
and sample std, the targets (reported against, never tuned on test), and the machine it ran on."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch
import transformers

from .._machine import cpu_name
from ...distill.config import TrainConfig

SCHEMA = "ibkd-reproduce/1"


def choose(sweep_records: list[dict]) -> Optional[dict]:
    """Best dev Spearman among the finished sweep rows (ties: the earlier setting in the config)."""
    done = [r for r in sweep_records if r.get("status") == "done" and isinstance(r.get("dev_spearman"), (int, float))]
    if not done:
        return None
    return max(enumerate(done), key=lambda ir: (ir[1]["dev_spearman"], -ir[0]))[1]


def mean_std(values: list) -> dict:
    """Mean and sample standard deviation (n−1; None for a single value) of the numbers in ``values``."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def summarize(records: list[dict], chosen_name: Optional[str]) -> list[dict]:
    """One line per compared student (seeds aggregated)."""
    by_group: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status") == "done" and r["kind"] in ("teacher", "train"):
            by_group.setdefault(r["group"], []).append(r)
    ibkd = [r for r in records if r.get("status") == "done" and r["kind"] == "train"
            and (r["group"] == "ibkd" or (r["group"] == "sweep" and r["name"] == chosen_name))]
    lines = []
    order = [("teacher", by_group.get("teacher", [])), ("none", by_group.get("none", [])),
             ("mse", by_group.get("mse", [])), ("contrastive", by_group.get("contrastive", [])),
             ("ibkd", sorted(ibkd, key=lambda r: r["seed"])), ("auto", by_group.get("auto", [])),
             ("finetune", by_group.get("finetune", [])),
             ("compact", [r for r in by_group.get("compact", []) if r["kind"] == "train"])]
    for name, rows in order:
        if not rows:
            continue
        line = {"row": name, "label": rows[0].get("label"), "runs": [r["name"] for r in rows],
                "seeds": [r.get("seed") for r in rows]}
        for key in ("dev_spearman", "test_spearman", "sentences_per_second", "train_seconds"):
            line[key] = mean_std([r.get(key) for r in rows])
        line["parameters"] = rows[0].get("parameters")
        line["embedding_dim"] = rows[0].get("embedding_dim")
        line["steps"] = rows[0].get("steps")
        line["batch_size"] = rows[0].get("batch_size")
        if name == "compact":
            line["d_small"] = rows[0].get("d_small")
        if name == "auto":  # the β each seed calibrated and froze
            line["chosen_beta"] = mean_std([(r.get("curve_stats") or {}).get("beta_last") for r in rows])
        lines.append(line)
    return lines


def targets(summary: list[dict], spec: dict) -> dict:
    t = {"teacher_fraction": 0.98, "over_mse": 1.0, **(spec.get("targets") or {})}
    by = {line["row"]: line for line in summary}

    def test_mean(name):
        return (by.get(name) or {}).get("test_spearman", {}).get("mean")

    def dev_mean(name):
        return (by.get(name) or {}).get("dev_spearman", {}).get("mean")

    teacher, ibkd, mse = test_mean("teacher"), test_mean("ibkd"), test_mean("mse")
    out = {"teacher_fraction": t["teacher_fraction"], "over_mse": t["over_mse"], "teacher_test": teacher,
           "ibkd_test_mean": ibkd, "mse_test_mean": mse, "note": "reported against, never tuned on the test split"}
    if teacher is not None and ibkd is not None:
        out["ibkd_over_teacher"] = ibkd / teacher
        out["teacher_fraction_met"] = ibkd >= t["teacher_fraction"] * teacher
    if ibkd is not None and mse is not None:
        out["ibkd_minus_mse"] = ibkd - mse
        out["over_mse_met"] = ibkd - mse >= t["over_mse"]
    # beta="auto" against the best fixed β of the sweep (its 3-seed row) and against β=0, on dev
    auto, best, contrastive = dev_mean("auto"), dev_mean("ibkd"), dev_mean("contrastive")
    out.update(auto_within=t.get("auto_within", 0.15), auto_over_contrastive=t.get("auto_over_contrastive", 0.5))
    if auto is not None and best is not None:
        out["auto_minus_best_fixed_dev"] = auto - best
        out["auto_within_met"] = auto >= best - out["auto_within"]
    if auto is not None and contrastive is not None:
        out["auto_minus_contrastive_dev"] = auto - contrastive
        out["auto_over_contrastive_met"] = auto - contrastive >= out["auto_over_contrastive"]
    return out


def _git_commit() -> Optional[str]:
    """The commit of the checkout this package runs from; None for an installed copy (no git there)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(started_at: float, argv: list) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": _git_commit(), "load_average_at_start": list(load) if load else None,
            "started_at": _dt.datetime.fromtimestamp(started_at).isoformat(timespec="seconds"),
            "command": "ibkd " + " ".join(argv) if argv else "ibkd reproduce"}


def assemble(spec: dict, rows: list[dict], chosen: Optional[dict], gpu: dict, started: float, argv: list) -> dict:
    chosen_name = chosen["name"] if chosen else None
    summary = summarize(rows, chosen_name)
    sweep = [r for r in rows if r["group"] == "sweep"]
    contrastive = next((r for r in rows if r["group"] == "contrastive" and r.get("status") == "done"), None)
    emb = next((r for r in rows if r["kind"] == "embedding"), None)
    common = spec["common"]
    doc = {
        "schema": SCHEMA,
        "quick": spec.get("quick", False),
        "environment": environment(started, argv),
        "settings": {
            "teacher": common["teacher"], "student_layers": common["student_layers"],
            "steps": common.get("max_steps"),
            "batch_size": common.get("per_device_train_batch_size", TrainConfig.per_device_train_batch_size),
            "lr": common.get("learning_rate", TrainConfig.learning_rate),
            "max_length": common.get("max_length", TrainConfig.max_length), "temperature": common.get("temperature"),
            "corpus": common.get("corpus"), "extra_stsb_sentences": common.get("extra_stsb_sentences"),
            "corpus_limit": common.get("corpus_limit"), "seeds": spec.get("seeds", [1, 2, 3]),
            "sts_limit": spec.get("sts_limit"), "num_threads": spec.get("num_threads"),
            "eval_batch_size": spec.get("eval_batch_size", 128),
            "budget": spec.get("budget"), "finetune": spec.get("finetune"),
        },
        "summary": summary,
        "targets": targets(summary, spec),
        "sweep": {
            "select_by": "dev", "chosen": chosen_name,
            "chosen_label": chosen.get("label") if chosen else None,
            "contrastive_dev": contrastive.get("dev_spearman") if contrastive else None,
            "best_minus_contrastive_dev": (chosen["dev_spearman"] - contrastive["dev_spearman"])
            if chosen and contrastive else None,
            "settings": [{k: r.get(k) for k in ("name", "sweep_name", "label", "setting", "status", "dev_spearman",
                                                "test_spearman", "curve_stats")} for r in sweep],
        },
        "embedding": (emb.get("comparison") if emb and emb.get("status") == "done"
                      else {"status": (emb or {}).get("status", "disabled"), "reason": (emb or {}).get("reason")}),
        "gpu_timing": gpu,
        "rows": rows,
        "skipped": [{"name": r["name"], "reason": r.get("reason")} for r in rows if r.get("status") != "done"],
        "wall_seconds": time.time() - started,
        "compute_seconds": sum(r.get("row_seconds") or 0.0 for r in rows if r.get("status") == "done"),
    }
    return doc
