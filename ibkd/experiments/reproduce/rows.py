"""The rows of the plan: one unit of work each, with its own folder, its settings and their hash.

Phase one needs nothing else (teacher, untrained, MSE, contrastive and β=auto per seed, the IB-term
sweep at the first seed); phase two follows the sweep's choice (the chosen setting at the other seeds,
stage 2 from it, the compact student and its table); the embedding comparison stands alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ...distill.config import RUNTIME_FIELDS, SCORE_FIELDS, ConfigError, TrainConfig
from ...distill.preflight import resolve_amp, resolve_device
from .spec import ReproduceError

# TrainConfig fields that change neither the trained student nor its scores (left out of the row hash): the
# ones a resumed run may change, less those that change the scores
NOT_HASHED = RUNTIME_FIELDS - SCORE_FIELDS


@dataclass
class Row:
    """One unit of work with its own folder and result file."""

    name: str
    group: str
    kind: str  # "teacher" | "train" | "st_mse" | "model2vec" | "table" | "embedding"
    seed: Optional[int] = None
    train: dict = field(default_factory=dict)  # TrainConfig fields (kind "train")
    info: dict = field(default_factory=dict)  # label, settings, anything rendered
    hash_extra: dict = field(default_factory=dict)  # eval paths, parents' hashes, ...
    root: str = ""  # the output folder: paths under it are hashed relative to it (a moved folder still matches)

    def config_hash(self) -> str:
        train = {k: v for k, v in self.train.items() if k not in NOT_HASHED}
        if train.get("amp") == "auto":  # hashed as what it trains with here: a bf16 row is not reused as fp32
            train["amp"] = resolve_amp("auto", resolve_device(train.get("device") or TrainConfig.device))
        blob = json.dumps({"kind": self.kind, "seed": self.seed, "train": train, "extra": self.hash_extra},
                          sort_keys=True, default=str)
        return hashlib.sha256(self._anchored(blob).encode()).hexdigest()[:16]

    def resolved_config(self) -> Optional[dict]:
        """Every hashed TrainConfig field of a training row as it trains, the stage's library defaults filled
        in (the hash covers only the fields the plan sets): stored with the result, so a row is not reused
        after a library default it trained with has changed."""
        if self.kind not in ("train", "st_mse"):
            return None
        cfg = TrainConfig.from_dict({**self.train, "output_dir": "unused"})
        values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_HASHED and k != "output_dir"}
        values.update(cfg.stage_defaults())
        if values.get("beta") != "auto":  # what auto aims at means nothing to a fixed β
            values.pop("beta_target_ratio", None)
            values.pop("beta_calibration_steps", None)
        if values.get("amp") == "auto":
            values["amp"] = resolve_amp("auto", resolve_device(cfg.device))
        return json.loads(self._anchored(json.dumps(values, sort_keys=True, default=str)))

    def _anchored(self, blob: str) -> str:
        return blob.replace(json.dumps(self.root)[1:-1], "<output>") if self.root else blob


@dataclass
class Context:
    """What every row of one invocation shares."""

    spec: dict
    output: Path
    cache_dir: str
    sts: dict  # split -> path (maybe truncated copies)
    data_dir: Optional[str]  # the folder {data_dir} stands for
    num_threads: Optional[int]
    progress: bool
    log: Callable[[str], None] = print
    published: Optional[dict] = None  # --reuse_results: load_published() of a published results file


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
    where = "unit-norm" if values.get("normalize_hsic_inputs", True) else "raw"
    parts = [f"β={_fmt_num(beta) if beta is not None else 'default'}",
             f"γ={_fmt_num(gamma) if gamma is not None else 'default'}", f"{where} HSIC"]
    if tau is not None:
        parts.append(f"τ={_fmt_num(tau)}")
    return ", ".join(parts)


def _runtime(ctx: Context) -> dict:
    """Fields every training row gets from the invocation: where the data is, no evaluation inside the
    trainer (each row is scored here, with throughput, on the same STS-B files), threads, progress bar."""
    values = {"data_dir": ctx.data_dir, "dev": None, "test": None, "no_eval": True, "eval_steps": None,
              "progress": ctx.progress}
    if ctx.num_threads:
        values["num_threads"] = ctx.num_threads
    return values


def _eval_extra(ctx: Context) -> dict:
    return {"dev": ctx.sts["dev"], "test": ctx.sts["test"], "sts_limit": ctx.spec.get("sts_limit")}


def distill_row(ctx: Context, name: str, group: str, method: str, seed: int, setting: Optional[dict] = None,
                extra_train: Optional[dict] = None, hash_extra: Optional[dict] = None) -> Row:
    setting = {k: v for k, v in (setting or {}).items() if k != "name"}
    train = {**ctx.spec["common"], "stage": "distill", "cache_dir": ctx.cache_dir, **_runtime(ctx), **setting,
             **(extra_train or {}), "method": method, "seed": seed}
    info = {"label": setting_label(train), "setting": setting, "method": method, "steps": train.get("max_steps"),
            "batch_size": train.get("per_device_train_batch_size", TrainConfig.per_device_train_batch_size)}
    return Row(name, group, "train", seed, train, info, {**_eval_extra(ctx), **(hash_extra or {})}, str(ctx.output))


def phase_one_rows(ctx: Context) -> list[Row]:
    """Rows that need nothing else: teacher, untrained, MSE, contrastive and β=auto per seed, the sweep."""
    spec, seeds = ctx.spec, ctx.spec.get("seeds", [1, 2, 3])
    common = spec["common"]
    max_length = common.get("max_length", TrainConfig.max_length)
    rows = [Row("teacher", "teacher", "teacher", None, {},
                {"label": "the teacher itself (all layers)", "teacher": common["teacher"], "max_length": max_length},
                {**_eval_extra(ctx), "teacher": common["teacher"], "max_length": max_length,
                 "data_dir": ctx.data_dir}, str(ctx.output)),
            distill_row(ctx, "none", "none", "none", seeds[0])]
    rows += [distill_row(ctx, f"mse-s{s}", "mse", "mse", s) for s in seeds]
    if (spec.get("st_mse") or {}).get("enabled", True):
        # the field's own recipe: sentence-transformers' MSELoss + SentenceTransformerTrainer (st_mse_peer.py)
        for s in seeds:
            row = distill_row(ctx, f"st-mse-s{s}", "st_mse", "mse", s)
            row.kind, row.info["label"] = "st_mse", "sentence-transformers MSELoss (their trainer)"
            rows.append(row)
    # every seed: β=0 is what beta=auto must beat by a margin that seed noise cannot explain
    rows += [distill_row(ctx, f"contrastive-s{s}", "contrastive", "contrastive", s) for s in seeds]
    rows += [distill_row(ctx, f"auto-s{s}", "auto", "ibkd", s, spec["auto"]) for s in seeds]
    for setting in spec["sweep"]["settings"]:
        row = distill_row(ctx, f"sweep-{setting['name']}", "sweep", "ibkd", seeds[0], setting)
        row.info["sweep_name"] = setting["name"]
        rows.append(row)
    # the stage-1 settings of common (layers kept, lr, max length, ...) against alternatives, one change each,
    # with the β=auto setting at the first seed: auto-s<first> is the row of common's own settings
    for setting in (spec.get("study") or {}).get("settings") or []:
        row = distill_row(ctx, f"study-{setting['name']}", "study", "ibkd", seeds[0], spec["auto"],
                          extra_train={k: v for k, v in setting.items() if k != "name"})
        row.info.update(study_name=setting["name"], change={k: v for k, v in setting.items() if k != "name"})
        rows.append(row)
    m2v = spec.get("model2vec") or {}
    if m2v.get("enabled", True):
        pca_dims = m2v.get("pca_dims", 256)
        rows.append(Row("model2vec", "model2vec", "model2vec", None, {},
                        {"label": f"Model2Vec distill of the teacher (static, PCA {pca_dims})", "pca_dims": pca_dims,
                         "teacher": common["teacher"]},
                        {**_eval_extra(ctx), "teacher": common["teacher"], "pca_dims": pca_dims}, str(ctx.output)))
    return rows


def phase_two_rows(ctx: Context, chosen: Row, chosen_student: str, repeat_seeds: bool = True) -> list[Row]:
    """Rows that follow the choice of the IBKD setting: the chosen setting at the other seeds (unless
    ``repeat_seeds`` is off: β=auto was chosen, whose rows exist at every seed), stage 2 from its first seed's
    student (the folder ``chosen_student``), and the compact student."""
    spec, seeds = ctx.spec, ctx.spec.get("seeds", [1, 2, 3])
    setting = chosen.info["setting"]
    parent = {"chosen": chosen.info.get("sweep_name"), "chosen_hash": chosen.config_hash()}
    rows = []
    for s in (seeds[1:] if repeat_seeds else []):
        row = distill_row(ctx, f"ibkd-s{s}", "ibkd", "ibkd", s, setting, hash_extra=parent)
        row.info["sweep_name"] = chosen.info.get("sweep_name")
        rows.append(row)
    for stage2 in stage2_settings(spec):  # (not `setting`: the compact row below takes the chosen stage-1 one)
        row = finetune_row(ctx, f"ft-{stage2['name']}" if stage2["name"] else "ibkd-finetune", "stage2_sweep",
                           seeds[0], stage2, chosen.name, chosen_student, parent)
        row.info["stage2_name"] = stage2["name"]
        rows.append(row)
    compact = spec.get("compact") or {}
    if compact.get("enabled", True):
        overrides = dict(compact.get("distill") or {})
        if overrides.get("compact_init") == "pca":  # the table is the teacher's own, projected: no table row
            student = distill_row(ctx, "compact-ibkd", "compact", "ibkd", seeds[0], setting, extra_train=overrides,
                                  hash_extra=parent)
            student.info["d_small"] = overrides.get("compact_dim")
            rows.append(student)
            return rows
        table_cfg = dict(compact.get("table") or {})
        max_length = spec["common"].get("max_length", TrainConfig.max_length)
        table = Row("compact-table", "compact", "table", seeds[0], {},
                    {"label": f"distilled embedding table d={table_cfg['d_small']}", "table": table_cfg},
                    {**_eval_extra(ctx), "train": ctx.sts["train"], "table": table_cfg,
                     "teacher": spec["common"]["teacher"], "max_length": max_length}, str(ctx.output))
        rows.append(table)
        student = distill_row(ctx, "compact-ibkd", "compact", "ibkd", seeds[0], setting,
                              extra_train={**overrides,
                                           "compact_embeddings": str(ctx.output / "compact-table" / "table")},
                              hash_extra={**parent, "table_hash": table.config_hash()})
        student.info["d_small"] = table_cfg["d_small"]
        student.info["needs"] = ["compact-table"]
        rows.append(student)
    return rows


def stage2_settings(spec: dict) -> list[dict]:
    """The stage-2 settings to compare on dev (over the ``finetune:`` base); without a ``stage2_sweep`` the
    base alone (its row keeps the historical name ``ibkd-finetune``)."""
    settings = (spec.get("stage2_sweep") or {}).get("settings")
    return settings if settings else [{"name": ""}]


def finetune_row(ctx: Context, name: str, group: str, seed: int, setting: dict, parent_name: str, parent_student: str,
                 parent_hash: dict) -> Row:
    """Stage 2 on STS-B train from the student in ``parent_student`` (the ``finetune:`` base + ``setting``)."""
    spec = ctx.spec
    ft = {**(spec.get("finetune") or {}), **{k: v for k, v in setting.items() if k != "name"}}
    train = {"max_length": spec["common"].get("max_length", TrainConfig.max_length), **ft, **_runtime(ctx),
             "stage": "finetune", "method": ft.get("method", "ibkd"), "seed": seed, "student": parent_student,
             "train_file": ctx.sts["train"], "teacher": None}
    label = f"stage 2 on STS-B train from {parent_name}" + (f" ({setting['name']})" if setting.get("name") else "")
    return Row(name, group, "train", seed, train,
               {"label": label, "setting": ft, "method": train["method"], "steps": train.get("max_steps"),
                "parent": parent_name, "batch_size": train.get("per_device_train_batch_size",
                                                                TrainConfig.per_device_train_batch_size)},
               {**_eval_extra(ctx), **parent_hash}, str(ctx.output))


def phase_three_rows(ctx: Context, chosen: Row, stage2_chosen: Row, parents: dict) -> list[Row]:
    """The stage-2 setting chosen on dev, from the chosen IBKD setting's students of the other seeds
    (``parents``: seed -> (row, student folder)), so IBKD + stage 2 has a mean ± std over seeds too."""
    seeds = ctx.spec.get("seeds", [1, 2, 3])
    setting = {"name": stage2_chosen.info.get("stage2_name") or "", **(stage2_chosen.info.get("setting") or {})}
    rows = []
    for s in seeds[1:]:
        if s not in parents:
            continue
        parent_row, student = parents[s]
        row = finetune_row(ctx, f"finetune-s{s}", "finetune", s, setting, parent_row.name, student,
                           {"chosen": chosen.info.get("sweep_name"), "parent_hash": parent_row.config_hash(),
                            "stage2_chosen": stage2_chosen.config_hash()})
        row.info["stage2_name"] = stage2_chosen.info.get("stage2_name")
        rows.append(row)
    return rows


def study_confirm_rows(ctx: Context, study_row: Row) -> list[Row]:
    """The study's dev-best change at the other seeds (phase two): a single-seed lead over common's own
    setting is confirmed on the seeds' means before the config is said to trail it."""
    seeds = ctx.spec.get("seeds", [1, 2, 3])
    change = study_row.info["change"]
    rows = []
    for s in seeds[1:]:
        row = distill_row(ctx, f"{study_row.name}-s{s}", "study_confirm", "ibkd", s, ctx.spec["auto"],
                          extra_train=dict(change))
        row.info.update(study_name=study_row.info["study_name"], change=dict(change))
        rows.append(row)
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
    try:
        TrainConfig.from_dict({**row.train, "output_dir": "unused"})
    except ConfigError as exc:
        raise ReproduceError(f"row {row.name}: {exc}") from None
