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
from scipy import stats as scipy_stats

from .._machine import cpu_name
from ...distill.config import TrainConfig

SCHEMA = "ibkd-reproduce/1"
#: a study change that led at the first seed replaces the config's setting only when the seeds' paired dev
#: differences say it is better at this level (one-sided paired t-test; scipy's): with 3 seeds a lead of a few
#: hundredths is well inside the seed-to-seed spread (0.03-0.07 dev)
CONFIRM_ALPHA = 0.05


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


def summarize(records: list[dict], chosen_name: Optional[str], stage2_name: Optional[str] = None,
              chosen_group: str = "sweep") -> list[dict]:
    """One line per compared student (seeds aggregated): a chosen setting's line is its first-seed row from
    the sweep plus the rows that repeat it at the other seeds."""
    by_group: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status") == "done" and r["kind"] in ("teacher", "train", "st_mse", "model2vec"):
            by_group.setdefault(r["group"], []).append(r)

    def chosen_line(group: str, sweep_group: str, name: Optional[str]) -> list[dict]:
        rows = [r for r in records if r.get("status") == "done" and r["kind"] == "train"
                and (r["group"] == group or (r["group"] == sweep_group and r["name"] == name))]
        return sorted(rows, key=lambda r: r["seed"])

    lines = []
    order = [("teacher", by_group.get("teacher", [])), ("none", by_group.get("none", [])),
             ("mse", by_group.get("mse", [])), ("st_mse", by_group.get("st_mse", [])),
             ("contrastive", by_group.get("contrastive", [])),
             ("ibkd", chosen_line("ibkd", "sweep", chosen_name) if chosen_group != "auto"
              else sorted(by_group.get("auto", []), key=lambda r: r["seed"])),
             ("auto", by_group.get("auto", [])),
             ("finetune", chosen_line("finetune", "stage2_sweep", stage2_name)),
             ("compact", [r for r in by_group.get("compact", []) if r["kind"] == "train"]),
             ("model2vec", by_group.get("model2vec", []))]
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


def _met(value: Optional[float], ok: bool) -> Optional[bool]:
    return None if value is None else bool(ok)


def targets(summary: list[dict], spec: dict, study: Optional[dict] = None) -> dict:
    """Every target of the config against the means over seeds (reported, never tuned towards: choices are on dev)."""
    t = {"teacher_fraction": 0.97, "over_mse": 1.0, "compact_test": 76.0, "compact_parameters": 7_500_000,
         **(spec.get("targets") or {})}
    by = {line["row"]: line for line in summary}

    def stat(name, split="test", key="mean"):
        return ((by.get(name) or {}).get(f"{split}_spearman") or {}).get(key)

    teacher, ibkd = stat("teacher"), stat("ibkd")
    # the final 2-layer student: with stage 2 only when stage 2 helped on dev (means over seeds)
    with_stage2 = stat("finetune", "dev") is not None and stat("ibkd", "dev") is not None \
        and stat("finetune", "dev") > stat("ibkd", "dev")
    final_row = "finetune" if with_stage2 else "ibkd"
    best_final = stat(final_row)
    out = {"teacher_fraction": t["teacher_fraction"], "over_mse": t["over_mse"], "teacher_test": teacher,
           "ibkd_test_mean": ibkd, "ibkd_test_std": stat("ibkd", key="std"), "final_test_mean": best_final,
           "final_row": final_row, "final_dev_mean": stat(final_row, "dev"),
           "stage2_minus_stage1_dev": (stat("finetune", "dev") - stat("ibkd", "dev")) if stat("finetune", "dev") is not None
           and stat("ibkd", "dev") is not None else None, "mse_test_mean": stat("mse"),
           "st_mse_test_mean": stat("st_mse"), "note": "reported against, never tuned on the test split"}
    if teacher is not None and best_final is not None:
        out["final_over_teacher"] = best_final / teacher
        out["teacher_fraction_met"] = best_final >= t["teacher_fraction"] * teacher
    if teacher is not None and ibkd is not None:
        out["ibkd_over_teacher"] = ibkd / teacher
    out["seeds_n"] = ((by.get("ibkd") or {}).get("test_spearman") or {}).get("n")
    for peer in ("mse", "st_mse"):
        other = stat(peer)
        out[f"{peer}_test_std"] = stat(peer, key="std")
        if ibkd is not None and other is not None:
            out[f"ibkd_minus_{peer}"] = ibkd - other
            out[f"over_{peer}_met"] = ibkd - other >= t["over_mse"]
    # beta="auto" against the best fixed β of the sweep (its 3-seed row) and against β=0, on dev
    auto, best, contrastive = stat("auto", "dev"), stat("ibkd", "dev"), stat("contrastive", "dev")
    out.update(auto_within=t.get("auto_within", 0.15), auto_over_contrastive=t.get("auto_over_contrastive", 0.5))
    if auto is not None and best is not None:
        out["auto_minus_best_fixed_dev"] = auto - best
        out["auto_within_met"] = auto >= best - out["auto_within"]
    if auto is not None and contrastive is not None:
        out["auto_minus_contrastive_dev"] = auto - contrastive
        out["auto_over_contrastive_met"] = auto - contrastive >= out["auto_over_contrastive"]
    compact, m2v = by.get("compact"), by.get("model2vec")
    if compact:
        c_test, c_params = stat("compact"), compact.get("parameters")
        out.update(compact_test=c_test, compact_parameters=c_params, compact_test_target=t["compact_test"],
                   compact_parameters_target=t["compact_parameters"])
        out["compact_test_met"] = _met(c_test, c_test is not None and c_test >= t["compact_test"])
        out["compact_size_met"] = _met(c_params, c_params is not None and c_params <= t["compact_parameters"])
        if m2v:
            out["model2vec_test"], out["model2vec_parameters"] = stat("model2vec"), m2v.get("parameters")
            if c_test is not None and out["model2vec_test"] is not None:
                out["compact_minus_model2vec"] = c_test - out["model2vec_test"]
                out["compact_over_model2vec_met"] = c_test > out["model2vec_test"]
    if study and study.get("candidates"):
        out["study_best_dev"] = study["best_dev"]
        out["study_config_best_met"] = study["best_dev"] == "config"
    return out


def settings_study(rows: list[dict], spec: dict) -> dict:
    """The study of common's stage-1 settings on dev: common's own (its β=auto first-seed row) against each
    alternative (one change each). A change that leads at the first seed was also run at the other seeds
    (group ``study_confirm``); it is the dev-best only if, paired by seed with common's own β=auto rows, it is
    better at :data:`CONFIRM_ALPHA`, since a first-seed lead smaller than the seeds' spread is not evidence."""
    first = (spec.get("seeds") or [1])[0]
    cands = []
    base = next((r for r in rows if r["group"] == "auto" and r.get("seed") == first and r.get("status") == "done"), None)
    if base is not None:
        cands.append({"name": "config", "change": {}, "row": base["name"], "dev_spearman": base.get("dev_spearman"),
                      "test_spearman": base.get("test_spearman")})
    for r in rows:
        if r["group"] == "study" and r.get("status") == "done":
            cands.append({"name": r.get("study_name"), "change": r.get("change"), "row": r["name"],
                          "dev_spearman": r.get("dev_spearman"), "test_spearman": r.get("test_spearman")})
    best = max(cands, key=lambda c: c["dev_spearman"] if isinstance(c["dev_spearman"], (int, float)) else -1e9,
               default=None)
    out = {"select_by": "dev", "best_dev": best["name"] if best else None,
           "candidates": cands if len(cands) > 1 and base is not None else []}
    if best is None or best["name"] == "config":
        return out
    leader = [r for r in rows if r.get("status") == "done" and r.get("study_name") == best["name"]
              and r["group"] in ("study", "study_confirm")]
    config = [r for r in rows if r["group"] == "auto" and r.get("status") == "done"]
    if len(leader) < 2:
        return out  # not confirmed at the other seeds (yet): the first-seed verdict stands
    lead, own = (mean_std([r.get("dev_spearman") for r in rs]) for rs in (leader, config))
    # paired by seed (same initialisation and data order): is the change better than the seeds' noise?
    own_by_seed = {r["seed"]: r.get("dev_spearman") for r in config}
    pairs = [(r["dev_spearman"], own_by_seed[r["seed"]]) for r in leader if r["seed"] in own_by_seed]
    diffs = [a - b for a, b in pairs]
    p_value = None
    if len(pairs) >= 2:
        p_value = float(scipy_stats.ttest_rel(*zip(*pairs), alternative="greater").pvalue)
        if math.isnan(p_value):  # the differences do not vary: certain either way
            p_value = 0.0 if all(d > 0 for d in diffs) else 1.0
    out["first_seed_best_dev"] = best["name"]
    out["confirmation"] = {
        "name": best["name"], "seeds": sorted(r["seed"] for r in leader), "dev": lead, "config_dev": own,
        "test": mean_std([r.get("test_spearman") for r in leader]),
        "config_test": mean_std([r.get("test_spearman") for r in config]),
        "paired_dev_difference": mean_std(diffs), "p_value": p_value, "alpha": CONFIRM_ALPHA}
    adopted = p_value is not None and p_value < CONFIRM_ALPHA
    out["best_dev"] = best["name"] if adopted else "config"
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


def assemble(spec: dict, rows: list[dict], chosen: Optional[dict], gpu: dict, started: float, argv: list,
             stage2_chosen: Optional[dict] = None) -> dict:
    chosen_name = chosen["name"] if chosen else None
    stage2_name = stage2_chosen["name"] if stage2_chosen else None
    summary = summarize(rows, chosen_name, stage2_name, chosen.get("group", "sweep") if chosen else "sweep")
    study = settings_study(rows, spec)
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
            "workers": spec.get("workers") or 1,
            "eval_batch_size": spec.get("eval_batch_size", 128),
            "budget": spec.get("budget"), "finetune": spec.get("finetune"), "amp": common.get("amp", "off"),
        },
        "summary": summary,
        "targets": targets(summary, spec, study),
        "study": study,
        "stage2": {"select_by": "dev", "chosen": stage2_name,
                   "settings": [{k: r.get(k) for k in ("name", "stage2_name", "label", "setting", "status", "dev_spearman",
                                                       "test_spearman", "curve_stats")}
                                for r in rows if r["group"] == "stage2_sweep"]},
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
