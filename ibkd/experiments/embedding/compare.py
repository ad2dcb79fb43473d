"""The comparison of Mou et al. (2016): small tables distilled by encoding vs trained directly, on STS-B.

Both arms get the same budget (epochs, batch size, Adam, data order, task-network init); the learning rate
is selected per arm and per run from one shared grid on dev Spearman. The baseline table is drawn from
N(0, 1/d_small), so its rows start at norm ≈ 1 like the rows of the teacher's table (MiniLM: mean row norm
1.07), without copying anything from E. (A dev-only check at d_small = 64, best of the learning-rate grid:
this init scored 74.2 dev Spearman, N(0, 1) 72.9, N(0, 0.03²) 67.8; so the baseline is not handicapped
by it.)
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._machine import cpu_name
from ...distill.config import DATA_DIR_ENV, default_data_dir
from ...distill.embedding_table import EmbeddingConfigError, check_positive_int, jsonable
from ...distill.models import Encoder
from ...distill.stsb import STSB_SPLITS, stsb_path
from .model import PathLike, mean_pool_ids, spearman100
from .train import (DEFAULT_LR_GRID, METHODS, EmbeddingTaskConfig, check_lr_grid, prepare, resolve_device,
                    select_lr_prepared, train_frozen_teacher)

DEFAULT_SIZES = (32, 64, 128)
DEFAULT_SEEDS = (0, 1, 2)


def load_teacher_table(teacher_spec: str):
    """``(tokenizer, word-embedding table (V x d_big, float32), name)`` of a teacher: a folder, a hub id or
    ``"default"`` (the offline all-MiniLM-L6-v2)."""
    encoder = Encoder.load(teacher_spec)
    table = encoder.model.get_input_embeddings().weight.detach().float().clone()
    return encoder.tokenizer, table, encoder.name


def stsb_paths(data_dir: Optional[PathLike] = None, train: Optional[PathLike] = None,
               dev: Optional[PathLike] = None, test: Optional[PathLike] = None) -> dict:
    """The STS-B train/dev/test files: explicit paths win, else the benchmark's files under the data folder
    (:func:`ibkd.distill.stsb.stsb_path`) given by ``data_dir`` or ``$IBKD_DATA_DIR``. A missing file is an
    error naming the flag (and the variable) that pointed at it."""
    root = data_dir or default_data_dir()
    paths = {}
    for split, given in zip(STSB_SPLITS, (train, dev, test)):
        if given:
            path = Path(os.path.expanduser(str(given)))
        elif root:
            path = stsb_path(root, split)
        else:
            raise FileNotFoundError(f"STS-B {split} file: give --{split}, or the data folder with --data_dir "
                                    f"or ${DATA_DIR_ENV}")
        if not path.is_file() and given:
            raise FileNotFoundError(f"--{split}: STS-B {split} file not found: {path}")
        if not path.is_file():
            raise FileNotFoundError(f"STS-B {split} file not found: {path} (under the data folder given by "
                                    f"--data_dir or ${DATA_DIR_ENV})")
        paths[split] = str(path)
    return paths


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def compare_embeddings(teacher_spec: str = "default", sizes: Sequence[int] = DEFAULT_SIZES,
                       seeds: Sequence[int] = DEFAULT_SEEDS, data_dir: Optional[PathLike] = None, *,
                       methods: Sequence[str] = METHODS, lr_grid: Sequence[float] = DEFAULT_LR_GRID,
                       train_path: Optional[PathLike] = None, dev_path: Optional[PathLike] = None,
                       test_path: Optional[PathLike] = None, reference: bool = True,
                       progress: Optional[Callable[[str], None]] = None, **cfg_overrides) -> dict:
    """Distilled vs directly trained small tables on STS-B, for every size x method x seed.

    Every run gets the same budget (``cfg_overrides`` over :class:`EmbeddingTaskConfig`); its learning
    rate is chosen from the shared ``lr_grid`` by dev Spearman, separately per arm, size and seed. With
    ``reference``, the same task network on the frozen big table (d_big) is reported per seed, plus the
    untrained cosine of the mean-pooled big-table vectors. Returns ``{"rows", "summary", "reference",
    "settings", "environment", "wall_seconds"}``; no tables (they are not kept).
    """
    start = time.perf_counter()
    sizes = [check_positive_int(s, "sizes") for s in sizes]
    seeds = [int(s) for s in seeds]
    if not sizes or not seeds:
        raise EmbeddingConfigError("sizes and seeds must each name at least one value")
    methods = list(methods)
    for method in methods:
        if method not in METHODS:
            raise EmbeddingConfigError(f"methods must be among {', '.join(METHODS)}, got {method!r}")
    grid = check_lr_grid(lr_grid)
    base = EmbeddingTaskConfig.from_dict({**cfg_overrides, "d_small": sizes[0]})
    say = progress or (lambda message: None)
    paths = stsb_paths(data_dir, train_path, dev_path, test_path)
    tokenizer, big_table, teacher_name = load_teacher_table(teacher_spec)
    device = resolve_device(base.device)
    data = prepare(tokenizer, paths["train"], paths["dev"], paths["test"], base.max_length, device)
    big_table = big_table.to(device)

    teachers: dict[int, dict] = {}

    def teacher_for(seed: int) -> dict:
        if seed not in teachers:
            best = None
            for lr in grid:
                run = train_frozen_teacher(big_table, data, dataclasses.replace(base, seed=seed, lr=lr,
                                                                                 teacher_weight=0.0))
                if best is None or (math.isfinite(run["dev_spearman"]) and run["dev_spearman"] > best["dev_spearman"]):
                    best = run
            teachers[seed] = best
            say(f"frozen big table (d={big_table.shape[1]}) seed {seed}: dev {best['dev_spearman']:.2f} "
                f"test {best['test_spearman']:.2f} (lr {best['lr']:g})")
        return teachers[seed]

    rows = []
    for size in sizes:
        for method in methods:
            for seed in seeds:
                cfg = dataclasses.replace(base, d_small=size, method=method, seed=seed)
                soft = teacher_for(seed)["train_cosines"] if cfg.teacher_weight > 0 else None
                result = select_lr_prepared(big_table, data, cfg, grid, soft)
                row = {k: result[k] for k in ("method", "d_small", "seed", "lr", "dev_spearman", "test_spearman",
                                              "best_epoch", "train_seconds", "init_dev_spearman", "dev_by_lr")}
                row["table_parameters"] = int(result["table"].numel())
                rows.append(row)
                say(f"d={size} {method} seed {seed}: dev {row['dev_spearman']:.2f} test {row['test_spearman']:.2f} "
                    f"(lr {row['lr']:g}, epoch {row['best_epoch']})")

    summary = []
    for size in sizes:
        for method in methods:
            mine = [r for r in rows if r["d_small"] == size and r["method"] == method]
            test_mean, test_std = _mean_std([r["test_spearman"] for r in mine])
            dev_mean, dev_std = _mean_std([r["dev_spearman"] for r in mine])
            summary.append({"d_small": size, "method": method, "n": len(mine), "test_mean": test_mean,
                            "test_std": test_std, "dev_mean": dev_mean, "dev_std": dev_std,
                            "table_parameters": mine[0]["table_parameters"] if mine else None})
        if set(METHODS) <= set(methods):
            by_seed = {(r["method"], r["seed"]): r["test_spearman"] for r in rows if r["d_small"] == size}
            deltas = [by_seed[("distilled", s)] - by_seed[("direct", s)] for s in seeds]
            mean, std = _mean_std(deltas)
            summary.append({"d_small": size, "method": "distilled-direct", "n": len(deltas), "test_mean": mean,
                            "test_std": std})

    reference_block = None
    if reference:
        frozen = [teacher_for(seed) for seed in seeds]
        with torch.no_grad():
            raw = mean_pool_ids(lambda ids: big_table[ids], data.test.ids, data.test.mask)
            n = len(data.test)
            untrained = spearman100(F.cosine_similarity(raw[:n], raw[n:], dim=1), data.test.gold)
        test_mean, test_std = _mean_std([t["test_spearman"] for t in frozen])
        dev_mean, dev_std = _mean_std([t["dev_spearman"] for t in frozen])
        reference_block = {
            "d_big": int(big_table.shape[1]), "table_parameters": int(big_table.numel()),
            "frozen_big_table": {"test_mean": test_mean, "test_std": test_std, "dev_mean": dev_mean,
                                 "dev_std": dev_std, "lr": [t["lr"] for t in frozen],
                                 "best_epoch": [t["best_epoch"] for t in frozen]},
            "untrained_mean_pooled_test": untrained,
        }

    return jsonable({
        "rows": rows, "summary": summary, "reference": reference_block,
        "settings": {"teacher": teacher_name, "vocab_size": int(big_table.shape[0]), "d_big": int(big_table.shape[1]),
                     "sizes": sizes, "seeds": seeds, "methods": methods, "lr_grid": list(grid),
                     **{k: v for k, v in dataclasses.asdict(base).items() if k not in ("d_small", "method", "seed", "lr")},
                     "train": paths["train"], "dev": paths["dev"], "test": paths["test"],
                     "train_pairs": len(data.train), "dev_pairs": len(data.dev), "test_pairs": len(data.test),
                     "train_vocabulary": int(data.train_ids.numel()),
                     "selection": "epoch and learning rate (per run, from lr_grid) by STS-B dev Spearman; "
                                  "test scored once per run for the selected epoch",
                     "direct_init": "N(0, init_std^2), init_std = direct_init_std or 1/sqrt(d_small)"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
                        "threads": torch.get_num_threads(), "device": str(device)},
        "wall_seconds": time.perf_counter() - start,
    })


def _fmt(mean, std) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if std is not None and math.isfinite(std) else f"{mean:.2f}"


def render_markdown(report: dict) -> str:
    """The comparison as a Markdown table (STS-B test Spearman x100, mean ± std over seeds)."""
    summary = {(s["d_small"], s["method"]): s for s in report["summary"]}
    settings = report.get("settings", {})
    sizes = settings.get("sizes") or sorted({s["d_small"] for s in report["summary"]})
    lines = ["| d_small | table params | distilled (test) | direct (test) | distilled − direct | distilled (dev) | direct (dev) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        dist, direct, delta = (summary.get((size, m), {}) for m in ("distilled", "direct", "distilled-direct"))
        params = dist.get("table_parameters") or direct.get("table_parameters")
        lines.append(f"| {size} | {params / 1e6:.2f}M |" if params else f"| {size} | n/a |")
        lines[-1] += " | ".join([
            f" {_fmt(dist.get('test_mean'), dist.get('test_std'))}", _fmt(direct.get("test_mean"), direct.get("test_std")),
            _fmt(delta.get("test_mean"), delta.get("test_std")), _fmt(dist.get("dev_mean"), dist.get("dev_std")),
            _fmt(direct.get("dev_mean"), direct.get("dev_std")) + " |"])
    ref = report.get("reference")
    if ref:
        frozen = ref["frozen_big_table"]
        lines.append(f"| {ref['d_big']} (frozen big table) | {ref['table_parameters'] / 1e6:.2f}M | "
                     f"{_fmt(frozen['test_mean'], frozen['test_std'])} | | | {_fmt(frozen['dev_mean'], frozen['dev_std'])} | |")
    seeds = settings.get("seeds", [])
    notes = [f"STS-B test Spearman x100, mean ± std over {len(seeds)} seed(s); "
             f"teacher {settings.get('teacher', '?')}, task network Linear(d, {settings.get('task_hidden', '?')}) + "
             f"{settings.get('task_activation', '?')}, cosine vs gold/5 (MSE), {settings.get('epochs', '?')} epochs, "
             f"batch {settings.get('batch_size', '?')}, Adam; encoder f = {settings.get('activation', '?')}; "
             f"learning rate per run from {settings.get('lr_grid', '?')} and epoch chosen on dev."]
    if ref:
        notes.append(f"Untrained mean-pooled big-table cosine: {ref['untrained_mean_pooled_test']:.2f} (test).")
    if "wall_seconds" in report:
        env = report.get("environment", {})
        notes.append(f"Wall time {report['wall_seconds']:.0f} s on {env.get('cpu', '?')} "
                     f"({settings.get('num_threads') or env.get('threads', '?')} training thread(s)), "
                     f"torch {env.get('torch', '?')}.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"
