"""The reproduce config: reading the YAML (``--quick`` merges its ``quick:`` section over the rest),
checking its structure with errors that name the key, and spelling every TrainConfig section with the
fields' own names (old names such as ``lr`` or ``batch_size`` are accepted, as in ``ibkd distill``)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from ...distill.cli import resolve_config
from ...distill.config import ALIASES, ConfigError, TrainConfig, load_yaml_mapping

#: the shipped config (``ibkd.configs``, ``configs/`` of a checkout) that ``--config`` defaults to
DEFAULT_CONFIG = "reproduce-minilm"

TOP_KEYS = {"output_dir", "results", "readme", "num_threads", "workers", "cache_dir", "sts_limit", "seeds",
            "eval_batch_size", "common", "sweep", "finetune", "compact", "embedding_comparison", "gpu_timing",
            "targets", "quick", "budget", "auto", "study", "st_mse", "model2vec", "stage2_sweep"}
#: old top-level key -> its name now
TOP_ALIASES = {"output": "output_dir"}
SWEEP_KEYS = {"select_by", "settings"}
COMPACT_KEYS = {"enabled", "table", "distill"}
EMBEDDING_KEYS = {"enabled", "sizes", "seeds", "overrides"}
GPU_KEYS = {"enabled", "batches", "backends", "amp", "warmup", "steps"}
TARGET_KEYS = {"teacher_fraction", "over_mse", "auto_within", "auto_over_contrastive", "compact_test",
               "compact_parameters"}
ST_MSE_KEYS = {"enabled"}
MODEL2VEC_KEYS = {"enabled", "pca_dims"}
# TrainConfig fields the plan sets per row (a value for them in the config would be silently overridden)
RESERVED = {"stage", "method", "seed", "output_dir", "dev", "test", "no_eval", "eval_steps", "resume",
            "overwrite_output_dir", "train_file"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class ReproduceError(ConfigError):
    """A bad reproduce config or request (reported as one line by the CLI)."""


def config_path(value: str = DEFAULT_CONFIG) -> str:
    """``--config``: an existing file, else a shipped config by name (installed or in the checkout)."""
    return resolve_config(value)  # a UsageError (a ConfigError) naming the shipped configs when not found


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


def _top_names(where: str, values: dict) -> dict:
    values = dict(values)
    for old, new in TOP_ALIASES.items():
        if old in values:
            _need(new not in values, f"{where}: {old} is the old name of {new}: give only {new}")
            values[new] = values.pop(old)
    return values


def train_section(where: str, values: Any, *, reserved: set = frozenset()) -> dict:
    """A mapping of TrainConfig fields with the fields' own names; unknown keys and keys the plan sets
    are errors naming ``where``."""
    values = values if values is not None else {}
    _check_keys(where, values, TrainConfig.field_names() | set(ALIASES))
    try:
        values = TrainConfig.canonical(values)
    except ConfigError as exc:
        raise ReproduceError(f"{where}: {exc}") from None
    clash = sorted(set(values) & set(reserved))
    _need(not clash, f"{where}: {', '.join(clash)} set by the reproduce plan, not by the config")
    return values


def load_spec(path: str, *, quick: bool = False) -> dict:
    """Read and validate a reproduce config (a file or a shipped config's name); ``quick`` merges its
    ``quick:`` section over the rest."""
    path = config_path(path)
    raw = _top_names(str(path), load_yaml_mapping(path, ReproduceError))
    _check_keys(f"{path}", raw, TOP_KEYS)
    quick_part = _top_names(f"{path}: quick", raw.pop("quick", None) or {})
    _check_keys(f"{path}: quick", quick_part, TOP_KEYS - {"quick"})
    spec = deep_merge(raw, quick_part) if quick else raw
    spec["quick"] = bool(quick)
    spec.setdefault("output_dir", f"runs/reproduce-{Path(path).stem}" + ("-quick" if quick else ""))
    validate_spec(spec, where=str(path) + (" (quick)" if quick else ""))
    return spec


def _named_settings(where: str, settings, reserved: set) -> list:
    """A non-empty list of ``{name, <TrainConfig fields>}`` with distinct, path-safe names."""
    _need(isinstance(settings, list) and settings, f"{where}.settings must be a non-empty list")
    names, out = [], []
    for i, item in enumerate(settings):
        _need(isinstance(item, dict) and "name" in item, f"{where}.settings[{i}] needs a 'name'")
        name = item["name"]
        _need(isinstance(name, str) and NAME_RE.match(name) is not None,
              f"{where}.settings[{i}].name {name!r} must be letters, digits, '.', '_', '+', '-'")
        names.append(name)
        body = {k: v for k, v in item.items() if k != "name"}
        out.append({"name": name, **train_section(f"{where}.settings[{i}] ({name})", body, reserved=reserved)})
    dup = sorted({n for n in names if names.count(n) > 1})
    _need(not dup, f"{where}: duplicate setting name(s): {', '.join(dup)}")
    return out


def validate_spec(spec: dict, where: str = "config") -> None:
    """Structural checks with messages that name the key; the TrainConfig sections are rewritten with the
    fields' own names. Values are checked later by building every row's TrainConfig before anything
    trains (:func:`ibkd.experiments.reproduce.rows.check_train_config`)."""
    for key in ("output_dir", "common"):
        _need(key in spec and spec[key], f"{where}: '{key}' is required")
    spec["common"] = train_section(f"{where}: common", spec["common"], reserved=RESERVED)
    _need(spec["common"].get("teacher") not in (None, ""), f"{where}: common.teacher is required")
    _need(spec["common"].get("student_layers") not in (None, ""), f"{where}: common.student_layers is required")
    seeds = spec.get("seeds", [1, 2, 3])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
          and len(set(seeds)) == len(seeds), f"{where}: seeds must be a non-empty list of distinct ints, got {seeds!r}")
    threads = spec.get("num_threads")
    _need(threads is None or (isinstance(threads, int) and threads > 0), f"{where}: num_threads must be a positive int")
    workers = spec.get("workers", 1)
    _need(isinstance(workers, int) and not isinstance(workers, bool) and workers > 0,
          f"{where}: workers must be a positive int (rows run at once), got {workers!r}")
    limit = spec.get("sts_limit")
    _need(limit is None or (isinstance(limit, int) and limit >= 2), f"{where}: sts_limit must be an int >= 2 or null")
    sweep = _check_keys(f"{where}: sweep", spec.get("sweep") or {}, SWEEP_KEYS)
    _need(sweep.get("select_by", "dev") == "dev", f"{where}: sweep.select_by must be 'dev' (test is never used to choose)")
    sweep["settings"] = _named_settings(f"{where}: sweep", sweep.get("settings"), RESERVED)
    stage2 = _check_keys(f"{where}: stage2_sweep", spec.get("stage2_sweep") or {}, SWEEP_KEYS)
    _need(stage2.get("select_by", "dev") == "dev",
          f"{where}: stage2_sweep.select_by must be 'dev' (test is never used to choose)")
    if stage2.get("settings") is not None:
        stage2["settings"] = _named_settings(f"{where}: stage2_sweep", stage2["settings"],
                                            RESERVED - {"train_file", "method"})
    study = _check_keys(f"{where}: study", spec.get("study") or {}, SWEEP_KEYS)
    _need(study.get("select_by", "dev") == "dev", f"{where}: study.select_by must be 'dev' (test is never used to choose)")
    if study.get("settings") is not None:
        study["settings"] = _named_settings(f"{where}: study", study["settings"], RESERVED)
    _check_keys(f"{where}: st_mse", spec.get("st_mse") or {}, ST_MSE_KEYS)
    m2v = _check_keys(f"{where}: model2vec", spec.get("model2vec") or {}, MODEL2VEC_KEYS)
    _need(m2v.get("pca_dims", 256) is None or (isinstance(m2v.get("pca_dims", 256), int) and m2v.get("pca_dims", 256) > 0),
          f"{where}: model2vec.pca_dims must be a positive int or null")
    spec["finetune"] = train_section(f"{where}: finetune", spec.get("finetune"), reserved=RESERVED - {"train_file"})
    spec["auto"] = train_section(f"{where}: auto", spec.get("auto") or {"beta": "auto"}, reserved=RESERVED)
    compact = _check_keys(f"{where}: compact", spec.get("compact") or {}, COMPACT_KEYS)
    if compact.get("enabled", True):
        compact["distill"] = train_section(f"{where}: compact.distill", compact.get("distill"), reserved=RESERVED)
        if compact["distill"].get("compact_init") != "pca":  # the distilled table is trained by its own row
            table = compact.get("table") or {}
            _need(isinstance(table, dict) and isinstance(table.get("d_small"), int) and table["d_small"] > 0,
                  f"{where}: compact.table.d_small must be a positive int (or compact.distill.compact_init: pca)")
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
