"""``ibkd reproduce``: the paper's comparison (teacher vs 2-layer students distilled with none / MSE /
contrastive-only / IBKD, stage-2 fine-tuning, a compact factorized student) on data we have, as one
resumable command whose results are a JSON file, a Markdown table, a PNG and two README sections.

Plan (from a YAML config, see ``configs/reproduce-minilm.yaml``):

1. ``teacher``: STS-B dev/test of the teacher itself;
2. ``none``: the untrained student (teacher layers copied); ``mse`` (every seed); ``contrastive``
   (InfoNCE only, β = 0);
3. ``sweep``: IBKD settings (β, γ fixed or median, HSIC on unit-norm or raw vectors) at the first seed;
   the one with the best STS-B **dev** Spearman is chosen (test is reported, never used to choose);
4. ``ibkd``: the chosen setting at the other seeds (its first seed is the sweep run itself);
5. ``finetune``: stage 2 on STS-B train pairs from the chosen IBKD student (first seed);
6. ``compact``: a small word-embedding table distilled by encoding (:mod:`ibkd.experiments.embedding`), then the
   chosen IBKD setting on a student whose embeddings are that table + an up-projection;
7. ``embedding``: :func:`ibkd.experiments.embedding.compare_embeddings` (distilled vs direct tables per size);
8. ``gpu``: distillation-step time with the fused vs reference losses under bf16 autocast (CUDA only;
   recorded as skipped elsewhere).

Every training row goes through :func:`ibkd.distill.trainer.run` in this process, in its own folder
``<output>/<row>/`` (the student is ``<row>/final``, loadable with ``SentenceTransformer(path)``), with one
shared teacher cache. Each finished row writes ``result.json`` holding a hash of its settings; a rerun
skips rows whose hash matches (and continues an interrupted row from its checkpoint), so the command
can be restarted after a crash. The results document is assembled from the finished rows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ._machine import cpu_name
from ..distill.data import DataError
from ..distill._io import atomic_write_text
from ..distill.trainer import ConfigError, TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/reproduce-minilm.yaml"
SCHEMA = "ibkd-reproduce/1"
RESULT_NAME = "result.json"
ROW_CONFIG_NAME = "row_config.json"
REPRODUCE_MARKERS = ("<!-- reproduce:start -->", "<!-- reproduce:end -->")
EMBEDDING_MARKERS = ("<!-- embedding:start -->", "<!-- embedding:end -->")
GROUPS = ("teacher", "none", "mse", "contrastive", "sweep", "ibkd", "auto", "finetune", "compact", "embedding", "gpu")
# groups a requested group needs first (the rows of these that are already finished are simply reused)
NEEDS = {"ibkd": ("sweep",), "finetune": ("sweep",), "compact": ("sweep",)}

TOP_KEYS = {"output", "results", "readme", "num_threads", "cache_dir", "sts_dir", "sts_limit", "seeds",
            "eval_batch_size", "common", "sweep", "finetune", "compact", "embedding_comparison", "gpu_timing",
            "targets", "quick", "budget", "auto"}
SWEEP_KEYS = {"select_by", "settings"}
COMPACT_KEYS = {"enabled", "table", "distill"}
EMBEDDING_KEYS = {"enabled", "sizes", "seeds", "overrides"}
GPU_KEYS = {"enabled", "batches", "backends", "amp", "warmup", "steps"}
TARGET_KEYS = {"teacher_fraction", "over_mse", "auto_within", "auto_over_contrastive"}
# TrainConfig fields the plan sets per row (a value for them in `common` would be silently overridden)
RESERVED = {"stage", "method", "seed", "output", "dev", "test", "eval_steps", "resume", "train_file"}
# TrainConfig fields that change neither the trained student nor its scores (left out of the row hash)
NOT_HASHED = {"output", "resume", "progress", "plot", "save_steps", "log_every", "num_threads", "eval_batch_size",
              "step_delay_s", "teacher_batch_size", "cache_dir"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class ReproduceError(ConfigError):
    """A bad reproduce config or request (reported as one line by the CLI)."""


# =====================================================================================================
# config
# =====================================================================================================

def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``: dicts merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ReproduceError(msg)


def _check_keys(where: str, values: Any, allowed: set) -> dict:
    _need(isinstance(values, dict), f"{where} must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - allowed)
    _need(not unknown, f"unknown key(s) in {where}: {', '.join(map(str, unknown))} (allowed: {', '.join(sorted(allowed))})")
    return values


def _train_fields() -> set:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def _check_train_keys(where: str, values: Any, *, reserved: set = frozenset()) -> dict:
    values = _check_keys(where, values if values is not None else {}, _train_fields())
    clash = sorted(set(values) & set(reserved))
    _need(not clash, f"{where}: {', '.join(clash)} set by the reproduce plan, not by the config")
    return values


def load_spec(path: str, *, quick: bool = False) -> dict:
    """Read and validate a reproduce config; ``quick`` merges its ``quick:`` section over the rest."""
    from ..distill.cli import load_yaml_mapping

    raw = load_yaml_mapping(path, ReproduceError)
    _check_keys(f"{path}", raw, TOP_KEYS)
    quick_part = raw.pop("quick", None) or {}
    _check_keys(f"{path}: quick", quick_part, TOP_KEYS - {"quick"})
    spec = deep_merge(raw, quick_part) if quick else raw
    spec["quick"] = bool(quick)
    validate_spec(spec, where=str(path) + (" (quick)" if quick else ""))
    return spec


def validate_spec(spec: dict, where: str = "config") -> None:
    """Structural checks with messages that name the key; TrainConfig values are checked later by
    building every row's TrainConfig before anything trains (:func:`plan_rows`)."""
    for key in ("output", "common"):
        _need(key in spec and spec[key], f"{where}: '{key}' is required")
    _check_train_keys(f"{where}: common", spec["common"], reserved=RESERVED)
    _need(spec["common"].get("teacher") not in (None, ""), f"{where}: common.teacher is required")
    _need(spec["common"].get("student_layers") not in (None, ""), f"{where}: common.student_layers is required")
    seeds = spec.get("seeds", [1, 2, 3])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
          and len(set(seeds)) == len(seeds), f"{where}: seeds must be a non-empty list of distinct ints, got {seeds!r}")
    threads = spec.get("num_threads")
    _need(threads is None or (isinstance(threads, int) and threads > 0), f"{where}: num_threads must be a positive int")
    limit = spec.get("sts_limit")
    _need(limit is None or (isinstance(limit, int) and limit >= 2), f"{where}: sts_limit must be an int >= 2 or null")
    sweep = _check_keys(f"{where}: sweep", spec.get("sweep") or {}, SWEEP_KEYS)
    _need(sweep.get("select_by", "dev") == "dev", f"{where}: sweep.select_by must be 'dev' (test is never used to choose)")
    settings = sweep.get("settings") or []
    _need(isinstance(settings, list) and settings, f"{where}: sweep.settings must be a non-empty list")
    names = []
    for i, item in enumerate(settings):
        _need(isinstance(item, dict) and "name" in item, f"{where}: sweep.settings[{i}] needs a 'name'")
        name = item["name"]
        _need(isinstance(name, str) and NAME_RE.match(name) is not None,
              f"{where}: sweep.settings[{i}].name {name!r} must be letters, digits, '.', '_', '+', '-'")
        names.append(name)
        body = {k: v for k, v in item.items() if k != "name"}
        _check_train_keys(f"{where}: sweep.settings[{i}] ({name})", body, reserved=RESERVED)
    dup = sorted({n for n in names if names.count(n) > 1})
    _need(not dup, f"{where}: duplicate sweep setting name(s): {', '.join(dup)}")
    _check_train_keys(f"{where}: finetune", spec.get("finetune") or {}, reserved=RESERVED - {"train_file"})
    _check_train_keys(f"{where}: auto", spec.get("auto") or {}, reserved=RESERVED)
    compact = _check_keys(f"{where}: compact", spec.get("compact") or {}, COMPACT_KEYS)
    if compact.get("enabled", True):
        table = compact.get("table") or {}
        _need(isinstance(table, dict) and isinstance(table.get("d_small"), int) and table["d_small"] > 0,
              f"{where}: compact.table.d_small must be a positive int")
        _check_train_keys(f"{where}: compact.distill", compact.get("distill") or {}, reserved=RESERVED)
    emb = _check_keys(f"{where}: embedding_comparison", spec.get("embedding_comparison") or {}, EMBEDDING_KEYS)
    for key in ("sizes", "seeds"):
        if key in emb:
            _need(isinstance(emb[key], list) and emb[key] and all(isinstance(v, int) for v in emb[key]),
                  f"{where}: embedding_comparison.{key} must be a non-empty list of ints")
    _need(isinstance(emb.get("overrides") or {}, dict), f"{where}: embedding_comparison.overrides must be a mapping")
    gpu = _check_keys(f"{where}: gpu_timing", spec.get("gpu_timing") or {}, GPU_KEYS)
    if "batches" in gpu:
        _need(isinstance(gpu["batches"], list) and all(isinstance(b, int) and b >= 2 for b in gpu["batches"]),
              f"{where}: gpu_timing.batches must be a list of ints >= 2")
    _need(gpu.get("amp", "bf16") in ("bf16", "fp16", "off"), f"{where}: gpu_timing.amp must be bf16, fp16 or off")
    _check_keys(f"{where}: targets", spec.get("targets") or {}, TARGET_KEYS)


# =====================================================================================================
# rows
# =====================================================================================================

@dataclass
class Row:
    """One unit of work with its own folder and result file."""

    name: str
    group: str
    kind: str  # "teacher" | "train" | "table" | "embedding"
    seed: Optional[int] = None
    train: dict = field(default_factory=dict)  # TrainConfig fields (kind "train")
    info: dict = field(default_factory=dict)  # label, settings, anything rendered
    hash_extra: dict = field(default_factory=dict)  # eval paths, parents' hashes, ...
    root: str = ""  # the output folder: paths under it are hashed relative to it (a moved folder still matches)

    def config_hash(self) -> str:
        train = {k: v for k, v in self.train.items() if k not in NOT_HASHED}
        blob = json.dumps({"kind": self.kind, "seed": self.seed, "train": train, "extra": self.hash_extra},
                          sort_keys=True, default=str)
        if self.root:
            blob = blob.replace(json.dumps(self.root)[1:-1], "<output>")
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Context:
    spec: dict
    output: Path
    cache_dir: str
    sts: dict  # split -> path (maybe truncated copies)
    data_dir: str
    num_threads: Optional[int]
    progress: bool
    log: Callable[[str], None] = None  # set by make_context


def _fmt_num(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def setting_label(values: dict) -> str:
    """Human label of a distillation setting (β, γ, where HSIC looks)."""
    method = values.get("method", "ibkd")
    if method == "mse":
        return "MSE to teacher vectors"
    if method == "none":
        return "untrained"
    tau = values.get("temperature")
    if method == "contrastive":
        return "InfoNCE only (β=0)" + (f", τ={_fmt_num(tau)}" if tau is not None else "")
    beta = values.get("beta")
    gamma = values.get("gamma")
    where = "unit-norm" if values.get("normalize_hsic_inputs", values.get("hsic_normalize", True)) else "raw"
    parts = [f"β={_fmt_num(beta) if beta is not None else 'default'}",
             f"γ={_fmt_num(gamma) if gamma is not None else 'default'}", f"{where} HSIC"]
    if tau is not None:
        parts.append(f"τ={_fmt_num(tau)}")
    return ", ".join(parts)


def _sweep_settings(spec: dict) -> list[dict]:
    return [dict(item) for item in spec["sweep"]["settings"]]


def _distill_base(ctx: Context) -> dict:
    base = dict(ctx.spec["common"])
    base.update(stage="distill", cache_dir=ctx.cache_dir, dev=None, test=None, eval_steps=None,
                progress=ctx.progress)
    if ctx.num_threads:
        base["num_threads"] = ctx.num_threads
    return base


def _eval_extra(ctx: Context) -> dict:
    return {"dev": ctx.sts["dev"], "test": ctx.sts["test"], "sts_limit": ctx.spec.get("sts_limit")}


def distill_row(ctx: Context, name: str, group: str, method: str, seed: int, setting: Optional[dict] = None,
                extra_train: Optional[dict] = None, hash_extra: Optional[dict] = None) -> Row:
    setting = {k: v for k, v in (setting or {}).items() if k != "name"}
    train = {**_distill_base(ctx), **setting, **(extra_train or {}), "method": method, "seed": seed}
    info = {"label": setting_label(train), "setting": setting,
            "method": method, "steps": train.get("max_steps"), "batch_size": train.get("batch_size", 256)}
    return Row(name, group, "train", seed, train, info, {**_eval_extra(ctx), **(hash_extra or {})}, str(ctx.output))


def phase_one_rows(ctx: Context) -> list[Row]:
    """Rows that need nothing else: teacher, untrained, MSE per seed, contrastive, the sweep."""
    spec, seeds = ctx.spec, ctx.spec.get("seeds", [1, 2, 3])
    common = spec["common"]
    rows = [Row("teacher", "teacher", "teacher", None, {},
                {"label": "the teacher itself (all layers)", "teacher": common["teacher"],
                 "max_length": common.get("max_length", 128)},
                {**_eval_extra(ctx), "teacher": common["teacher"], "max_length": common.get("max_length", 128),
                 "data_dir": common.get("data_dir")}, str(ctx.output)),
            distill_row(ctx, "none", "none", "none", seeds[0])]
    rows += [distill_row(ctx, f"mse-s{s}", "mse", "mse", s) for s in seeds]
    # every seed: β=0 is what beta=auto must beat by a margin that seed noise cannot explain
    rows += [distill_row(ctx, f"contrastive-s{s}", "contrastive", "contrastive", s) for s in seeds]
    auto = {k: v for k, v in (spec.get("auto") or {"beta": "auto"}).items()}
    rows += [distill_row(ctx, f"auto-s{s}", "auto", "ibkd", s, auto) for s in seeds]
    for setting in _sweep_settings(spec):
        row = distill_row(ctx, f"sweep-{setting['name']}", "sweep", "ibkd", seeds[0], setting)
        row.info["sweep_name"] = setting["name"]
        rows.append(row)
    return rows


def phase_two_rows(ctx: Context, chosen: Row) -> list[Row]:
    """Rows that follow the sweep's choice: the chosen IBKD setting at the other seeds, stage 2 from
    its first seed, and the compact student."""
    spec, seeds = ctx.spec, ctx.spec.get("seeds", [1, 2, 3])
    setting = chosen.info["setting"]
    parent = {"chosen": chosen.info.get("sweep_name"), "chosen_hash": chosen.config_hash()}
    rows = []
    for s in seeds[1:]:
        row = distill_row(ctx, f"ibkd-s{s}", "ibkd", "ibkd", s, setting, hash_extra=parent)
        row.info["sweep_name"] = chosen.info.get("sweep_name")
        rows.append(row)
    ft = dict(spec.get("finetune") or {})
    train = {"max_length": spec["common"].get("max_length", 128), "data_dir": spec["common"].get("data_dir",
             TrainConfig.data_dir), **ft, "stage": "finetune", "method": ft.get("method", "ibkd"), "seed": seeds[0],
             "student": str(ctx.output / chosen.name / "final"), "train_file": ctx.sts["train"],
             "dev": None, "test": None, "eval_steps": None, "progress": ctx.progress, "teacher": None}
    if ctx.num_threads:
        train["num_threads"] = ctx.num_threads
    rows.append(Row("ibkd-finetune", "finetune", "train", seeds[0], train,
                    {"label": f"stage 2 on STS-B train from {chosen.name}", "setting": ft, "method": train["method"],
                     "steps": train.get("max_steps"), "batch_size": train.get("batch_size", 64), "parent": chosen.name},
                    {**_eval_extra(ctx), **parent}, str(ctx.output)))
    compact = spec.get("compact") or {}
    if compact.get("enabled", True):
        table_cfg = dict(compact.get("table") or {})
        table = Row("compact-table", "compact", "table", seeds[0], {},
                    {"label": f"distilled embedding table d={table_cfg['d_small']}", "table": table_cfg},
                    {**_eval_extra(ctx), "train": ctx.sts["train"], "table": table_cfg,
                     "teacher": spec["common"]["teacher"], "max_length": spec["common"].get("max_length", 128)},
                    str(ctx.output))
        rows.append(table)
        student = distill_row(ctx, "compact-ibkd", "compact", "ibkd", seeds[0], setting,
                              extra_train={**(compact.get("distill") or {}),
                                           "compact_embeddings": str(ctx.output / "compact-table" / "table")},
                              hash_extra={**parent, "table_hash": table.config_hash()})
        student.info["d_small"] = table_cfg["d_small"]
        student.info["needs"] = ["compact-table"]
        rows.append(student)
    return rows


def embedding_row(ctx: Context) -> Optional[Row]:
    emb = ctx.spec.get("embedding_comparison") or {}
    if not emb.get("enabled", True):
        return None
    settings = {"sizes": emb.get("sizes", [32, 64, 128]), "seeds": emb.get("seeds", [0, 1, 2]),
                "overrides": emb.get("overrides") or {}}
    return Row("embedding-comparison", "embedding", "embedding", None, {}, {"label": "embedding tables", **settings},
               {**_eval_extra(ctx), "train": ctx.sts["train"], **settings, "teacher": ctx.spec["common"]["teacher"]},
               str(ctx.output))


def check_train_config(row: Row) -> None:
    """Build the row's TrainConfig (a bad key or value fails here, before anything trains)."""
    values = dict(row.train)
    values["output"] = "unused"
    if "compact_embeddings" in values and not compact_supported():
        values.pop("compact_embeddings")  # reported as a skipped row when it comes up
    try:
        TrainConfig.from_dict(values)
    except ConfigError as exc:
        raise ReproduceError(f"row {row.name}: {exc}") from None


def compact_supported() -> bool:
    return "compact_embeddings" in _train_fields()


def embedding_module():
    """:mod:`ibkd.experiments.embedding` when it is there (it is developed alongside), else None."""
    try:
        from . import embedding
    except ImportError:
        return None
    return embedding


# =====================================================================================================
# running rows
# =====================================================================================================

def _atomic_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, default=_json_default) + "\n")


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def finished_result(folder: Path, config_hash: str) -> Optional[dict]:
    """The stored result of a finished row when it was produced by the same settings, else None."""
    path = folder / RESULT_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if doc.get("config_hash") == config_hash and doc.get("status") == "done":
        return doc
    return None


def evaluate_encoder(encoder, sts: dict, batch_size: int) -> dict:
    """STS-B dev/test Spearman ×100, parameter count, output dim and encode throughput.

    Throughput (sentences per second, tokenization included) is the better of the two passes: the first
    pass also pays one-off warm-up, and on a shared machine the slower pass mostly measures the others."""
    from ..distill.evaluation import evaluate_sts

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
    """Per-step columns of a ``train_log.jsonl`` (loss terms, grad norms at the student output, lr)."""
    if not log_path.is_file():
        return {}
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keys = []
    for rec in records:
        keys += [k for k in rec if k not in keys and k not in ("epoch", "nan_skips", "dev_spearman")]
    return {k: [rec.get(k) for rec in records] for k in keys}


def curve_stats(curve: dict) -> dict:
    """What the sweep table shows: mean ‖∇(β·HSIC)‖/‖∇InfoNCE‖ at the student output, HSIC first→last,
    seconds spent in the optimizer steps."""
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


def _load_student(path: Path, max_length: Optional[int]):
    from ..distill.models import Encoder

    return Encoder.load(str(path), max_length=max_length)


def _set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def run_teacher_row(row: Row, ctx: Context) -> dict:
    from ..distill.models import Encoder

    encoder = Encoder.load(teacher_spec(ctx), max_length=row.info["max_length"])
    return {"train_seconds": None, **evaluate_encoder(encoder, ctx.sts, ctx.spec.get("eval_batch_size", 128))}


def teacher_spec(ctx: Context) -> str:
    """The teacher as Encoder.load takes it ("default", a hub id, or a folder with {data_dir} resolved)."""
    spec = str(ctx.spec["common"]["teacher"])
    if spec == "default" or "{data_dir}" not in spec:
        return spec
    return _resolve(spec, ctx.spec["common"].get("data_dir", TrainConfig.data_dir))


def run_train_row(row: Row, ctx: Context, folder: Path) -> dict:
    from ..distill import trainer as train_mod

    values = {**row.train, "output": str(folder)}
    row_cfg_path, ckpt = folder / ROW_CONFIG_NAME, folder / train_mod.CHECKPOINT_NAME
    previous = json.loads(row_cfg_path.read_text()) if row_cfg_path.is_file() else {}
    if previous.get("config_hash") == row.config_hash() and ckpt.is_file():
        values["resume"] = True  # an interrupted run of the same settings: continue from its checkpoint
        ctx.log(f"  resuming {row.name} from {ckpt}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_json(row_cfg_path, {"config_hash": row.config_hash(), "train": values})
    cfg = TrainConfig.from_dict(values)
    started = time.perf_counter()
    summary = train_mod.run(cfg)
    train_seconds = time.perf_counter() - started
    curve = read_curve(folder / "train_log.jsonl")
    step_seconds = None
    if curve.get("sentences_per_s"):
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * (2 if cfg.stage == "finetune" else 1)
        step_seconds = sum(per_step / v for v in curve["sentences_per_s"] if v)
    _set_threads(ctx.num_threads)
    student = _load_student(folder / "final", cfg.max_length)
    scores = evaluate_encoder(student, ctx.sts, ctx.spec.get("eval_batch_size", 128))
    if ckpt.exists():
        ckpt.unlink()  # optimizer state is ~3x the model: the finished student in final/ is what is kept
    return {"steps": summary.get("steps", 0), "train_seconds": train_seconds if row.train.get("method") != "none" else None,
            "step_seconds": step_seconds, "student": str(folder / "final"), **scores, "curve": curve,
            "curve_stats": curve_stats(curve)}


def run_table_row(row: Row, ctx: Context, folder: Path) -> dict:
    """Train the small word-embedding table (distilled by encoding) on STS-B and save it."""
    import torch

    from ..distill.models import Encoder

    emb = embedding_module()
    table_cfg = dict(row.info["table"])
    common = ctx.spec["common"]
    teacher = Encoder.load(teacher_spec(ctx), max_length=common.get("max_length", 128))
    big_table = teacher.model.get_input_embeddings().weight.detach().float().clone()
    cfg_fields = {f.name for f in dataclasses.fields(emb.EmbeddingTaskConfig)}
    unknown = sorted(set(table_cfg) - cfg_fields)
    if unknown:
        raise ReproduceError(f"compact.table: unknown key(s) {', '.join(unknown)} (EmbeddingTaskConfig fields: "
                             f"{', '.join(sorted(cfg_fields))})")
    values = {"method": "distilled", "seed": row.seed, "max_length": common.get("max_length", 128), "device": "cpu",
              **table_cfg}
    values = {k: v for k, v in values.items() if k in cfg_fields}
    cfg = emb.EmbeddingTaskConfig(**values)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    result = emb.train_sts_embedding(teacher.tokenizer, big_table, ctx.sts["train"], ctx.sts["dev"],
                                     ctx.sts["test"], cfg)
    seconds = time.perf_counter() - started
    table = result["table"]
    meta = {"d_small": int(table.shape[1]), "activation": values.get("activation", "tanh"),
            "method": result.get("method", values["method"]), "teacher": common["teacher"],
            "vocab_size": int(table.shape[0]), "dev_spearman": result.get("dev_spearman"),
            "test_spearman": result.get("test_spearman")}
    emb.save_small_table(folder / "table", table, teacher.tokenizer, meta)
    del big_table, teacher
    torch.set_num_threads(ctx.num_threads or torch.get_num_threads())
    return {"train_seconds": seconds, "dev_spearman": result.get("dev_spearman"),
            "test_spearman": result.get("test_spearman"), "best_epoch": result.get("best_epoch"),
            "d_small": int(table.shape[1]), "parameters": int(table.numel()), "embedding_dim": int(table.shape[1]),
            "table": str(folder / "table")}


def _strip_tensors(value):
    """JSON-able copy: tensors dropped (the tables themselves are not results), numpy scalars unwrapped."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, dict):
        return {k: _strip_tensors(v) for k, v in value.items()
                if not (torch is not None and isinstance(v, torch.Tensor) and v.numel() > 1)}
    if isinstance(value, (list, tuple)):
        return [_strip_tensors(v) for v in value]
    return json.loads(json.dumps(value, default=_json_default))


def run_embedding_row(row: Row, ctx: Context, folder: Path) -> dict:
    emb = embedding_module()
    started = time.perf_counter()
    overrides = dict(row.info["overrides"])
    if "progress" in inspect.signature(emb.compare_embeddings).parameters:
        overrides.setdefault("progress", lambda message: ctx.log(f"  {message}"))
    doc = emb.compare_embeddings(teacher_spec(ctx), sizes=tuple(row.info["sizes"]),
                                 seeds=tuple(row.info["seeds"]), data_dir=ctx.data_dir, **overrides)
    return {"train_seconds": time.perf_counter() - started, "comparison": _strip_tensors(doc)}


def skip_reason(row: Row) -> Optional[str]:
    if row.kind in ("table", "embedding") and embedding_module() is None:
        return "ibkd.experiments.embedding (embedding distillation by encoding) is not in this tree yet"
    if row.kind == "train" and "compact_embeddings" in row.train and not compact_supported():
        return "TrainConfig has no compact_embeddings key (compact factorized student) in this tree yet"
    return None


def execute(row: Row, ctx: Context, *, index: str = "", records: Optional[dict] = None) -> dict:
    """Run ``row`` unless its finished result (same settings) is on disk; returns the row record. A row
    that raises is recorded as failed (its partial folder and checkpoint are kept for the rerun) and the
    plan goes on."""
    folder = ctx.output / row.name
    h = row.config_hash()
    base = {"name": row.name, "group": row.group, "kind": row.kind, "seed": row.seed, "config_hash": h,
            **{k: v for k, v in row.info.items()}}
    reason = skip_reason(row)
    missing = [n for n in row.info.get("needs", []) if ((records or {}).get(n) or {}).get("status") != "done"]
    if not reason and missing:
        reason = f"needs {', '.join(missing)}, which did not finish"
    if reason:
        ctx.log(f"{index}{row.name}: skipped ({reason})")
        return {**base, "status": "skipped", "reason": reason}
    done = finished_result(folder, h)
    if done is not None:
        if done.get("student"):
            done["student"] = str(folder / "final")  # where it is now (the output folder may have moved)
        ctx.log(f"{index}{row.name}: finished earlier (same settings), reused")
        return {**done, "reused": True}
    ctx.log(f"{index}{row.name}: {row.info.get('label', row.kind)} ...")
    _set_threads(ctx.num_threads)
    started = time.perf_counter()
    try:
        if row.kind == "teacher":
            out = run_teacher_row(row, ctx)
        elif row.kind == "train":
            out = run_train_row(row, ctx, folder)
        elif row.kind == "table":
            out = run_table_row(row, ctx, folder)
        elif row.kind == "embedding":
            folder.mkdir(parents=True, exist_ok=True)
            out = run_embedding_row(row, ctx, folder)
        else:  # pragma: no cover
            raise ValueError(row.kind)
    except Exception as exc:  # noqa: BLE001 - one failed row must not cost the others (rerun resumes it)
        message = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ctx.log(f"{index}{row.name}: FAILED after {time.perf_counter() - started:.0f} s ({message})")
        return {**base, "status": "failed", "reason": message}
    record = {**base, **out, "status": "done", "row_seconds": time.perf_counter() - started,
              "train_config": {k: v for k, v in row.train.items() if k not in ("progress",)} or None}
    _atomic_json(folder / RESULT_NAME, record)
    scores = "".join(f" {s} {record[f'{s}_spearman']:.2f}" for s in ("dev", "test")
                     if isinstance(record.get(f"{s}_spearman"), (int, float)))
    ctx.log(f"{index}{row.name}: done in {record['row_seconds']:.0f} s;{scores}")
    return {**record, "reused": False}


# =====================================================================================================
# GPU timing hook
# =====================================================================================================

def time_distill_steps(teacher_spec: str, layers, batches, *, backends=("reference", "auto"), device="cuda",
                       amp="bf16", max_length: int = 64, sentences=None, warmup: int = 2, steps: int = 5,
                       setting: Optional[dict] = None) -> list[dict]:
    """Seconds per stage-1 optimizer step (student forward, InfoNCE + β·HSIC, backward, AdamW) of a
    layer-subset student per loss backend and batch size. Teacher vectors are random (the loss cost
    does not depend on their values). Out-of-memory is recorded, not raised."""
    import tempfile

    import numpy as np
    import torch

    from ..backend.base import resolve_backend
    from ..distill.models import Encoder, build_student
    from ..distill.trainer import DistillData, Trainer, build_loss

    teacher = Encoder.load(teacher_spec, max_length=max_length)
    if not sentences:
        sentences = ["a sentence of about sixty-four tokens, repeated to fill the batch " * 6]
    setting = {"temperature": 1.0, "beta": "auto", "gamma": 1.0, "normalize_hsic_inputs": True, **(setting or {})}
    dev = torch.device(device)
    results = []
    for backend in backends:
        for batch in batches:
            rec = {"backend": backend, "batch_size": batch, "amp": amp, "device": str(dev)}
            try:
                rec["resolved_backend"] = resolve_backend(backend, dev, torch.float32, "infonce",
                                                          (batch, batch, teacher.dim)).name
            except Exception as exc:  # noqa: BLE001 - a record, not a failure
                rec["resolved_backend"] = f"? ({exc.__class__.__name__})"
            texts = [sentences[i % len(sentences)] for i in range(batch)]
            vectors = np.random.default_rng(0).normal(size=(batch, teacher.dim)).astype(np.float32)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = TrainConfig(method="ibkd", batch_size=batch, max_steps=warmup + steps, backend=backend,
                                      amp=amp, device=str(dev), output=tmp, progress=False, plot=False, dev=None,
                                      test=None, max_length=max_length, temperature=setting["temperature"],
                                      beta=setting["beta"], gamma=setting["gamma"],
                                      normalize_hsic_inputs=setting["normalize_hsic_inputs"])
                    student = build_student(teacher, layers=layers)
                    trainer = Trainer(cfg, student, build_loss(cfg, student.dim, teacher.dim), DistillData(texts, vectors),
                                      device=dev)
                    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
                    for _ in range(warmup):
                        trainer.train_step()
                    sync()
                    times = []
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        trainer.train_step()
                        sync()
                        times.append(time.perf_counter() - t0)
                    rec.update(status="ok", median_s=statistics.median(times), times_s=times)
                    if dev.type == "cuda":
                        rec["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
            except torch.cuda.OutOfMemoryError:  # type: ignore[attr-defined]
                rec["status"] = "out of memory"
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(rec)
    return results


def run_gpu_timing(ctx: Context) -> dict:
    """The GPU hook: skipped (and said so) without CUDA; never cached (a GPU rerun measures)."""
    import torch

    gpu = ctx.spec.get("gpu_timing") or {}
    if not gpu.get("enabled", True):
        return {"status": "skipped", "reason": "disabled in the config"}
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device on this machine (the hook runs where one is)"}
    from ..distill.data import read_sentences

    common = ctx.spec["common"]
    cfg = TrainConfig.from_dict({**common, "output": "unused"})
    sentences, _ = read_sentences(cfg.resolve_path(cfg.corpus), limit=4096)
    ctx.log("gpu: timing distillation steps (fused vs reference losses)")
    rows = time_distill_steps(teacher_spec(ctx), common["student_layers"], gpu.get("batches", [256, 512, 1024, 2048, 4096]),
                              backends=tuple(gpu.get("backends", ["reference", "auto"])), device="cuda",
                              amp=gpu.get("amp", "bf16"), max_length=common.get("max_length", 128), sentences=sentences,
                              warmup=gpu.get("warmup", 2), steps=gpu.get("steps", 5))
    return {"status": "done", "device": torch.cuda.get_device_name(0), "rows": rows}


# =====================================================================================================
# the whole plan
# =====================================================================================================

def _resolve(path_value: Optional[str], data_dir: str) -> Optional[str]:
    if path_value is None:
        return None
    return str(Path(os.path.expanduser(str(path_value).replace("{data_dir}", str(data_dir)))))


def prepare_sts(spec: dict, output: Path) -> tuple[dict, str]:
    """STS-B train/dev/test paths every row uses (truncated copies under ``<output>/sts-limited`` when
    ``sts_limit`` is set, for smoke runs) and the data root that holds them (``sts/stsbenchmark``)."""
    data_dir = spec["common"].get("data_dir", TrainConfig.data_dir)
    sts_dir = Path(_resolve(spec.get("sts_dir", "{data_dir}/sts/stsbenchmark"), data_dir))
    paths = {s: str(sts_dir / f"sts-{s}.csv") for s in ("train", "dev", "test")}
    for split, path in paths.items():
        if not Path(path).is_file():
            raise DataError(f"STS-B {split} file not found: {path}")
    root = str(sts_dir.parent.parent)
    limit = spec.get("sts_limit")
    if limit:
        target = output / "sts-limited" / "sts" / "stsbenchmark"
        target.mkdir(parents=True, exist_ok=True)
        for split, path in paths.items():
            lines = [ln for ln in Path(path).read_text(encoding="utf-8").split("\n") if ln.strip()][:limit]
            new = target / f"sts-{split}.csv"
            text = "\n".join(lines) + "\n"
            if not new.is_file() or new.read_text(encoding="utf-8") != text:
                new.write_text(text, encoding="utf-8")
            paths[split] = str(new)
        root = str(target.parent.parent)
    return paths, root


def make_context(spec: dict, *, progress: bool = True, log: Callable[[str], None] = _log_stderr) -> Context:
    output = Path(spec["output"])
    output.mkdir(parents=True, exist_ok=True)
    sts, root = prepare_sts(spec, output)
    cache_dir = spec.get("cache_dir") or str(output / "teacher_cache")
    progress = progress and spec["common"].get("progress", True)
    return Context(spec, output, cache_dir, sts, root, spec.get("num_threads"), progress, log)


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


def environment(started_at: float, argv: list) -> dict:
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover
        tf_version = None
    commit = None
    try:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - informational only
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": tf_version, "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": commit, "load_average_at_start": list(load) if load else None,
            "started_at": _dt.datetime.fromtimestamp(started_at).isoformat(timespec="seconds"),
            "command": "ibkd " + " ".join(argv) if argv else "ibkd reproduce"}


def run_plan(spec: dict, *, groups: Optional[list] = None, progress: bool = True, argv: Optional[list] = None,
             log: Callable[[str], None] = _log_stderr) -> dict:
    """Run the requested groups (default: all) and assemble the results document from every finished
    row of the current settings on disk."""
    started = time.time()
    ctx = make_context(spec, progress=progress, log=log)
    wanted = set(groups or GROUPS)
    for g in list(wanted):
        wanted |= set(NEEDS.get(g, ()))
    first = phase_one_rows(ctx)
    # check every TrainConfig of the plan before anything trains (phase two with a stand-in choice)
    stand_in = phase_two_rows(ctx, next(r for r in first if r.group == "sweep"))
    for row in first + stand_in:
        if row.kind == "train":
            check_train_config(row)
    records: dict[str, dict] = {}
    total = len(first) + len(stand_in)
    for i, row in enumerate(first, 1):
        if row.group in wanted:
            records[row.name] = execute(row, ctx, index=f"[{i}/{total}] ")
    sweep_records = [records.get(r.name) or _stored(r, ctx) for r in first if r.group == "sweep"]
    chosen = choose([r for r in sweep_records if r])
    second: list[Row] = []
    if chosen is not None:
        chosen_row = next(r for r in first if r.name == chosen["name"])
        second = phase_two_rows(ctx, chosen_row)
        for i, row in enumerate(second, 1):
            if row.group in wanted:
                records[row.name] = execute(row, ctx, index=f"[{len(first) + i}/{total}] ", records=records)
    elif wanted & {"ibkd", "finetune", "compact"}:
        log("no finished sweep row: the ibkd, finetune and compact rows need the sweep's choice")
    emb = embedding_row(ctx)
    if emb is not None and "embedding" in wanted:
        records[emb.name] = execute(emb, ctx, index="[embedding] ")
    gpu = run_gpu_timing(ctx) if "gpu" in wanted else {"status": "not requested"}
    all_rows = first + second + ([emb] if emb is not None else [])
    final = []
    for row in all_rows:  # rows not run now: their stored result of the same settings, if any
        rec = records.get(row.name) or _stored(row, ctx)
        if rec is None:
            rec = {"name": row.name, "group": row.group, "kind": row.kind, "seed": row.seed,
                   "config_hash": row.config_hash(), **row.info, "status": "not run",
                   "reason": skip_reason(row) or "not requested in this invocation"}
            if skip_reason(row):
                rec["status"] = "skipped"
        final.append(rec)
    return assemble(spec, final, chosen, gpu, started, argv or [])


def _stored(row: Row, ctx: Context) -> Optional[dict]:
    rec = finished_result(ctx.output / row.name, row.config_hash())
    return {**rec, "reused": True} if rec is not None else None


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
            "steps": common.get("max_steps"), "batch_size": common.get("batch_size", 256), "lr": common.get("lr", 1e-4),
            "max_length": common.get("max_length", 128), "temperature": common.get("temperature"),
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


# =====================================================================================================
# rendering
# =====================================================================================================

def _f(v, digits=2) -> str:
    return "—" if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ms(stat: Optional[dict], digits=2) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    if stat.get("std") is None:
        return _f(stat["mean"], digits)
    return f"{_f(stat['mean'], digits)} ± {_f(stat['std'], digits)}"


def _params(n) -> str:
    if not isinstance(n, (int, float)):
        return "—"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _duration(s) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


ROW_TITLES = {"teacher": "teacher", "none": "student, untrained", "mse": "student, MSE",
              "contrastive": "student, contrastive only", "ibkd": "student, IBKD", "auto": "student, IBKD β=auto", "finetune": "student, IBKD + stage 2",
              "compact": "compact student, IBKD"}


def render_reproduce(doc: dict, image: Optional[str]) -> str:
    s = doc["settings"]
    env = doc["environment"]
    out = []
    if doc.get("quick"):
        out += ["**Quick smoke run** (tiny step counts and data limits): these numbers say only that the pipeline "
                "runs.", ""]
    layers = s["student_layers"]
    out.append(f"Teacher `{s['teacher']}`; students keep teacher layers {{{layers}}}. Stage 1: {s['steps']} steps × "
               f"batch {s['batch_size']}, lr {s['lr']:g}, max length {s['max_length']}, the same data order per seed "
               f"for every method; seeds {', '.join(map(str, s['seeds']))} for the MSE, contrastive and IBKD rows "
               f"(mean ± sample std), the first seed elsewhere. STS-B Spearman ×100 of cosine; the IBKD setting was chosen on "
               f"**dev** only.")
    out += ["", "| row | method / setting | seeds | STS-B dev | STS-B test | params | dim | encode (sent/s) | train time |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for line in doc["summary"]:
        title = ROW_TITLES.get(line["row"], line["row"])
        if line["row"] == "compact" and line.get("d_small"):
            title += f" (table d={line['d_small']})"
        seeds = len(line["runs"]) if line["row"] not in ("teacher", "none") else "—"
        label = line.get("label") or "—"
        if line["row"] == "auto" and (line.get("chosen_beta") or {}).get("values"):
            label += "; β frozen at " + ", ".join(f"{v:.3g}" for v in line["chosen_beta"]["values"])
        train = _ms(line["train_seconds"], 0)
        if line["train_seconds"].get("mean") is not None:
            train = _duration(line["train_seconds"]["mean"]) + (" per seed" if line["train_seconds"]["n"] > 1 else "")
        out.append(f"| {title} | {label} | {seeds} | {_ms(line['dev_spearman'])} "
                   f"| {_ms(line['test_spearman'])} | {_params(line['parameters'])} | {line.get('embedding_dim') or '—'} "
                   f"| {_ms(line['sentences_per_second'], 0)} | {train} |")
    t = doc["targets"]
    out += ["", "Targets (reported against, not tuned towards):", ""]
    if "ibkd_over_teacher" in t:
        met = "met" if t["teacher_fraction_met"] else "**not met**"
        out.append(f"- IBKD test {_f(t['ibkd_test_mean'])} = {100 * t['ibkd_over_teacher']:.1f}% of the teacher's "
                   f"{_f(t['teacher_test'])} (target ≥ {100 * t['teacher_fraction']:.0f}%): {met}.")
    if "ibkd_minus_mse" in t:
        met = "met" if t["over_mse_met"] else "**not met**"
        out.append(f"- IBKD − MSE on test: {t['ibkd_minus_mse']:+.2f} points (target ≥ +{t['over_mse']:.1f}): {met}.")
    if "auto_minus_best_fixed_dev" in t:
        met = "met" if t["auto_within_met"] else "**not met**"
        out.append(f"- IBKD β=auto vs the best swept fixed β on dev (3-seed means): {t['auto_minus_best_fixed_dev']:+.2f} "
                   f"points (target ≥ −{t['auto_within']:.2f}): {met}.")
    if "auto_minus_contrastive_dev" in t:
        met = "met" if t["auto_over_contrastive_met"] else "**not met**"
        out.append(f"- IBKD β=auto vs β=0 on dev (3-seed means): {t['auto_minus_contrastive_dev']:+.2f} points "
                   f"(target ≥ +{t['auto_over_contrastive']:.1f}): {met}.")
    if "ibkd_over_teacher" not in t and "ibkd_minus_mse" not in t:
        out.append("- not measured (rows missing).")
    out += ["", render_sweep(doc), ""]
    if image:
        out += [f"![loss curves and β sweep]({image})", ""]
    skipped = doc.get("skipped") or []
    if skipped:
        out.append("Not in this run: " + "; ".join(f"`{r['name']}` ({r['reason']})" for r in skipped) + ".")
        out.append("")
    gpu = doc.get("gpu_timing") or {}
    out.append(render_gpu(gpu))
    out += ["", f"Machine: {env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads), "
            f"torch {env.get('torch')}, transformers {env.get('transformers')}; commit {env.get('git_commit')}. "
            f"Command: `{env.get('command')}`; wall time {_duration(doc.get('wall_seconds'))} "
            f"(row compute {_duration(doc.get('compute_seconds'))}, including rows reused from an earlier invocation). "
            f"Encode throughput: the better of the STS-B dev and test passes (batch "
            f"{s.get('eval_batch_size') or 128}, tokenization included) on a shared machine; compare it within a run."]
    if env.get("note"):  # an annotation of the run (e.g. other load on the machine), kept in the results JSON
        out += ["", f"Note: {env['note']}"]
    return "\n".join(out) + "\n"


def render_sweep(doc: dict) -> str:
    sw = doc["sweep"]
    out = ["IB-term sweep (first seed, chosen by dev). ‖∇β·HSIC‖/‖∇InfoNCE‖: the two terms' gradient norms at "
           "the student output, mean over steps; at ratios far below 1 the HSIC term cannot change the student.", "",
           "| setting | dev | test | ‖∇β·HSIC‖/‖∇InfoNCE‖ | HSIC first → last |", "|---|---:|---:|---:|---:|"]
    if sw.get("contrastive_dev") is not None:
        crow = next((r for r in doc["rows"] if r["group"] == "contrastive" and r.get("status") == "done"), {})
        out.append(f"| β=0 (contrastive only) | {_f(sw['contrastive_dev'])} | {_f(crow.get('test_spearman'))} | 0 | — |")
    for r in sw["settings"]:
        if r.get("status") != "done":
            out.append(f"| {r.get('label')} | {r.get('status')} | | | |")
            continue
        cs = r.get("curve_stats") or {}
        label = r.get("label")
        if r["name"] == sw.get("chosen"):
            label = f"**{label}** (chosen)"
        ratio = cs.get("grad_ratio_hsic_infonce")
        out.append(f"| {label} | {_f(r.get('dev_spearman'))} | {_f(r.get('test_spearman'))} "
                   f"| {'—' if ratio is None else f'{ratio:.3g}'} "
                   f"| {_g(cs.get('hsic_first'))} → {_g(cs.get('hsic_last'))} |")
    gain = sw.get("best_minus_contrastive_dev")
    if gain is not None:
        out.append("")
        if gain > 0:
            out.append(f"Best IBKD setting vs contrastive only on dev: {gain:+.2f} points.")
        else:
            out.append(f"No IBKD setting beat contrastive-only distillation on dev (best {gain:+.2f} points): in this "
                       f"setup the information-bottleneck term did not help.")
    return "\n".join(out)


def _g(v) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v:.3g}"


def render_gpu(gpu: dict) -> str:
    if gpu.get("status") != "done":
        return f"GPU step timing (fused vs reference losses, bf16): {gpu.get('status', 'skipped')}" + (
            f" — {gpu['reason']}." if gpu.get("reason") else ".")
    out = [f"GPU step timing on {gpu.get('device')} (seconds per distillation step, median):", "",
           "| batch | " + " | ".join(sorted({r['backend'] for r in gpu['rows']})) + " |",
           "|---:|" + "---:|" * len({r['backend'] for r in gpu['rows']})]
    backends = sorted({r["backend"] for r in gpu["rows"]})
    for b in sorted({r["batch_size"] for r in gpu["rows"]}):
        cells = []
        for be in backends:
            rec = next((r for r in gpu["rows"] if r["batch_size"] == b and r["backend"] == be), {})
            cells.append(_f(rec.get("median_s"), 3) if rec.get("status") == "ok" else rec.get("status", "—"))
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_embedding(doc: dict) -> str:
    emb = doc.get("embedding") or {}
    out = []
    rows = emb.get("rows") if isinstance(emb, dict) else None
    module = embedding_module()
    if rows and module is not None and hasattr(module, "render_markdown"):
        out += ["Word-embedding tables for STS-B (siamese mean of word vectors → task network): distilled by "
                "encoding from the teacher's table (Mou et al., 2016) vs trained directly, "
                "`ibkd.experiments.embedding.compare_embeddings` with the budget of the reproduce config.", "",
                module.render_markdown(emb).rstrip("\n")]
    elif rows:
        groups: dict = {}
        for r in rows:
            groups.setdefault((r.get("d_small"), r.get("method")), []).append(r)
        out += ["Word-embedding tables for STS-B (siamese mean of word vectors → task network; chosen by dev): "
                "distilled by encoding from the teacher's table (Mou et al., 2016) vs trained directly. "
                "Mean ± sample std over seeds.", "",
                "| d_small | method | seeds | STS-B dev | STS-B test | table params |", "|---:|---|---:|---:|---:|---:|"]
        for (d, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, str(kv[0][1]))):
            dev, test = mean_std([r.get("dev_spearman") for r in rs]), mean_std([r.get("test_spearman") for r in rs])
            out.append(f"| {d} | {method} | {len(rs)} | {_ms(dev)} | {_ms(test)} | {_params(rs[0].get('table_parameters'))} |")
    else:
        out.append(f"Embedding-table comparison: {emb.get('status', 'not run')}"
                   + (f" — {emb['reason']}." if emb.get("reason") else "."))
    by = {line["row"]: line for line in doc["summary"]}
    pair = [by[k] for k in ("ibkd", "compact") if k in by]
    out += ["", "Compact factorized student (embedding table d_small + up-projection, teacher layers kept) vs the "
            "2-layer IBKD student, same data and steps (settings as in the reproduction table):", ""]
    if "compact" not in by:
        reason = next((r.get("reason") for r in doc["rows"] if r["name"] == "compact-ibkd"), None)
        out.append(f"_not available: {reason or 'not run'}_")
    else:
        out += ["| student | params | embedding table | encode (sent/s) | STS-B dev | STS-B test |",
                "|---|---:|---|---:|---:|---:|"]
        for line in pair:
            table = f"d={line['d_small']}" if line.get("d_small") else f"full ({line.get('embedding_dim')})"
            out.append(f"| {ROW_TITLES[line['row']]} | {_params(line['parameters'])} | {table} "
                       f"| {_ms(line['sentences_per_second'], 0)} | {_ms(line['dev_spearman'])} | {_ms(line['test_spearman'])} |")
    return "\n".join(out) + "\n"


def plot(doc: dict, png_path: Path) -> None:
    """Loss curves per row and the sweep (dev Spearman vs β)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("status") == "done" and r.get("curve")]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    ax = axes[0, 0]
    for r in rows:
        c = r["curve"]
        if c.get("infonce") and r["group"] != "finetune":
            ax.plot(c["step"], c["infonce"], label=r["name"], lw=1.6 if r["group"] != "sweep" else 1.0,
                    ls="-" if r["group"] != "sweep" else "--")
    ax.set_title("stage 1: InfoNCE term per step")
    ax = axes[0, 1]
    for r in rows:
        c = r["curve"]
        if c.get("mse"):
            ax.plot(c["step"], c["mse"], label=r["name"])
    ax.set_title("stage 1: MSE baseline per step")
    ax = axes[0, 2]
    for r in rows:
        if r["group"] == "finetune":
            for key in ("loss", "infonce", "hsic"):
                if r["curve"].get(key):
                    ax.plot(r["curve"]["step"], r["curve"][key], label=f"{r['name']} {key}")
    ax.set_title("stage 2 (STS-B train): loss terms per step")
    ax = axes[1, 0]
    for r in rows:
        c = r["curve"]
        if c.get("hsic"):
            ax.plot(c["step"], c["hsic"], label=r["name"])
    ax.set_title("HSIC(x, s) per step (unweighted)")
    ax.set_yscale("log")
    ax = axes[1, 1]
    for r in rows:
        c = r["curve"]
        if c.get("grad_norm_hsic") and c.get("grad_norm_infonce") and r["group"] != "finetune":
            ratio = [h / i if i else float("nan") for h, i in zip(c["grad_norm_hsic"], c["grad_norm_infonce"])]
            ax.plot(c["step"], ratio, label=r["name"])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_title("‖∇β·HSIC‖ / ‖∇InfoNCE‖ at the student output")
    ax = axes[1, 2]
    families: dict = {}
    for r in doc["sweep"]["settings"]:
        if r.get("status") != "done":
            continue
        st = r.get("setting") or {}
        fam = f"γ={st.get('gamma', 'default')}, {'unit-norm' if st.get('normalize_hsic_inputs', st.get('hsic_normalize', True)) else 'raw'} HSIC"
        beta = st.get("beta")
        if isinstance(beta, (int, float)) and beta > 0:
            families.setdefault(fam, []).append((beta, r["dev_spearman"]))
    for fam, pts in families.items():
        pts.sort()
        ax.plot(*zip(*pts), "o-", label=fam)
    refs = {line["row"]: line["dev_spearman"]["mean"] for line in doc["summary"]}
    for name, color in (("contrastive", "black"), ("mse", "tab:red"), ("none", "tab:gray"), ("teacher", "tab:green")):
        if refs.get(name) is not None:
            ax.axhline(refs[name], color=color, ls=":", label=f"{name} (dev)")
    ax.set_xscale("log")
    ax.set_xlabel("β")
    ax.set_ylabel("STS-B dev Spearman ×100")
    ax.set_title("sweep: dev Spearman vs β (chosen by dev)")
    for a in axes.flat:
        if a is not axes[1, 2]:
            a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle("ibkd reproduce" + (" (quick smoke run)" if doc.get("quick") else ""))
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def replace_between(text: str, markers: tuple, body: str, where: str = "README") -> str:
    """``text`` with the lines between the two marker lines (each alone on its line) replaced by ``body``;
    everything else byte for byte the same."""
    start_m, end_m = markers
    lines = text.split("\n")
    stripped = [ln.strip() for ln in lines]
    if start_m not in stripped:
        raise ReproduceError(f"{where}: no line {start_m}")
    start = stripped.index(start_m)
    if end_m not in stripped[start + 1:]:
        raise ReproduceError(f"{where}: no line {end_m} after {start_m}")
    end = stripped.index(end_m, start + 1)
    return "\n".join(lines[:start + 1] + body.rstrip("\n").split("\n") + lines[end:])


def write_outputs(doc: dict, results_path: Path, readme: Optional[Path]) -> str:
    """Markdown (``<results>.md``), PNG (``<results>.png``) and the two README sections, all rendered from
    ``doc``; returns the Markdown to print: the README's text when there is one (the Markdown file differs
    only in the image path, relative to where each file lives)."""
    results_path = Path(results_path)
    png = results_path.with_suffix(".png")
    md_path = results_path.with_suffix(".md")
    plot(doc, png)
    embedding_md = render_embedding(doc)

    def page(image: str) -> str:
        return ("## Reproduction\n\n" + render_reproduce(doc, image)
                + "\n## Embedding distillation and the compact student\n\n" + embedding_md)

    markdown = page(os.path.relpath(png, md_path.parent))
    md_path.write_text(markdown)
    if readme is None:
        return markdown
    readme = Path(readme)
    image = os.path.relpath(png, readme.parent)
    text = readme.read_text()
    text = replace_between(text, REPRODUCE_MARKERS, render_reproduce(doc, image), str(readme))
    text = replace_between(text, EMBEDDING_MARKERS, embedding_md, str(readme))
    readme.write_text(text)
    return page(image)


# =====================================================================================================
# command line
# =====================================================================================================

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"reproduce YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--quick", action="store_true", help="smoke run: the config's quick: section (minutes)")
    parser.add_argument("--output", default=None, help="folder of the rows (overrides output:)")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated groups to run now ({','.join(GROUPS)}); finished rows are always reused")
    parser.add_argument("--results", default=None, help="results JSON path (overrides results:)")
    parser.add_argument("--readme", default=None, help="README to render into (overrides readme:; 'none' = skip)")
    parser.add_argument("--render-only", action="store_true", help="re-render Markdown/PNG/README from the results JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True)


def _results_paths(spec: dict, args) -> tuple[Path, Optional[Path]]:
    results = Path(args.results or spec.get("results") or Path(spec["output"]) / "reproduce.json")
    readme_value = args.readme if args.readme is not None else spec.get("readme")
    readme = None if readme_value in (None, "", "none") else Path(readme_value)
    return results, readme


def run_cli(args: argparse.Namespace) -> int:
    try:
        return _run_cli(args)
    except (ReproduceError, ConfigError, DataError, FileNotFoundError) as exc:
        print(f"ibkd: error: {exc}", file=sys.stderr)
        return 2


def _run_cli(args) -> int:
    spec = load_spec(args.config, quick=args.quick)
    if args.output:
        spec["output"] = args.output
    groups = None
    if args.rows:
        groups = [g.strip() for g in args.rows.split(",") if g.strip()]
        bad = sorted(set(groups) - set(GROUPS))
        if bad:
            raise ReproduceError(f"--rows: unknown group(s) {', '.join(bad)} (groups: {', '.join(GROUPS)})")
    results, readme = _results_paths(spec, args)
    if args.render_only:
        if not results.is_file():
            raise ReproduceError(f"--render-only: no results file {results}")
        doc = json.loads(results.read_text())
    else:
        _set_threads(spec.get("num_threads"))
        argv = ["reproduce", "--config", args.config] + (["--quick"] if args.quick else [])
        argv += (["--rows", args.rows] if args.rows else []) + (["--output", args.output] if args.output else [])
        doc = run_plan(spec, groups=groups, progress=args.progress, argv=argv)
        _atomic_json(results, doc)
    markdown = write_outputs(doc, results, readme)
    print(markdown)
    print(f"results: {results} (+ {results.with_suffix('.md').name}, {results.with_suffix('.png').name})"
          + (f"; README sections updated in {readme}" if readme else ""), file=sys.stderr)
    failed = [r["name"] for r in doc["rows"] if r.get("status") == "failed"]
    if failed:
        print(f"ibkd: error: row(s) failed: {', '.join(failed)} (see the log above; rerun the same command to retry "
              f"them, finished rows are kept)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ibkd reproduce", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
