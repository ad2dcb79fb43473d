"""The commands of the distillation application: ``ibkd distill | finetune | cache-teacher | eval``.

:mod:`ibkd.cli` routes to them; errors become exit codes in :mod:`ibkd.distill.errors`. Settings are the
fields of :class:`~ibkd.distill.config.TrainConfig`: field default < YAML config (``--config``) < flags
(``--set KEY=VALUE`` for any field). Every field is a flag under its own name (``--learning_rate``), with
dashes (``--learning-rate``) and under its old name (``--lr``, :data:`~ibkd.distill.config.ALIASES`).

Why not ``transformers.HfArgumentParser``: it needs transformers (the ``[train]`` extra) just to print
``--help``, which must work on a bare install; it cannot type the fields that take a number or a word
(``beta``: 0.2 or auto, ``gamma``, ``hsic_layer``) or a list; and it fills every flag with its default, so a
YAML value could not sit between the default and the flag. argparse generated from ``dataclasses.fields``
does all of it in a page.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from .config import ALIASES, DATA_DIR_ENV, TrainConfig, field_kind, field_parser, load_yaml_mapping
from .preflight import preflight, resolve_device
from .errors import UsageError
from .stsb import stsb_path

# the stage is the command; every other field is a flag of distill and finetune
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "stage")
CACHE_TEACHER_FIELDS = ("teacher", "corpus", "corpus_column", "corpus_limit", "extra_stsb_sentences", "cache_dir",
                        "pca_dim", "teacher_batch_size", "max_length", "data_dir", "device", "output_dir", "progress",
                        "num_threads")
EVAL_FIELDS = ("data_dir", "dev", "test", "device", "per_device_eval_batch_size", "max_length")
# ibkd eval's --batch-size always meant the evaluation batch
EVAL_ALIASES = {"batch_size": "per_device_eval_batch_size"}

__all__ = ["add_commands", "build_config", "load_yaml_mapping", "resolve_config", "shipped_config_dirs",
           "shipped_configs"]


# -- --config NAME: the YAML configs shipped with the package ---------------------------------------------

def shipped_config_dirs() -> list:
    """Folders holding the shipped configs: the installed ``ibkd/configs``, and in a checkout its ``configs/``
    (setup.py installs that folder as the package ``ibkd.configs``)."""
    package = Path(__file__).resolve().parents[1]
    found = [package / "configs"]
    if (package.parent / "setup.py").is_file():  # a checkout (editable install or PYTHONPATH)
        found.append(package.parent / "configs")
    return [d for d in found if d.is_dir()]


def shipped_configs() -> list:
    return sorted({p.stem for d in shipped_config_dirs() for p in d.glob("*.yaml")})


def resolve_config(value: str) -> str:
    """``--config``: an existing file as given; else a shipped config by name (``main-minilm-2layer``,
    ``main-minilm-2layer.yaml`` or ``configs/main-minilm-2layer.yaml`` from outside the checkout)."""
    if Path(value).expanduser().is_file():
        return str(Path(value).expanduser())
    name = Path(value).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in (".yaml", ".yml") else name
    if Path(value).parent in (Path("."), Path("configs")):
        for folder in shipped_config_dirs():
            if (folder / f"{stem}.yaml").is_file():
                return str(folder / f"{stem}.yaml")
    raise UsageError(f"config file not found: {value} (nor a shipped config of that name; shipped: "
                     f"{', '.join(shipped_configs()) or 'none found'})")


# -- flags generated from the dataclass -------------------------------------------------------------------

class _FieldFlag(argparse.Action):
    """Stores a field's value and which spelling gave it: one field under two names (``--lr`` and
    ``--learning_rate``, ``--progress`` and ``--no_progress``) is refused rather than the last one silently
    winning. Unset flags stay unset (default SUPPRESS), so the YAML config keeps the values no flag gave."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given", None)
        if given is None:
            given = {}
            setattr(namespace, "_given", given)
        earlier = given.get(self.dest)
        if earlier is not None and earlier != option_string:
            parser.error(f"{earlier} and {option_string} both set {self.dest}: give one")
        given[self.dest] = option_string
        setattr(namespace, self.dest, self.const if values is None or self.nargs == 0 else values)


def _flag_type(name: str):
    parse = field_parser(name)

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:  # argparse then says "argument --flag: <message>", on one line
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


_METAVARS = {int: "N", float: "X", str: "TEXT", dict: "MAPPING", list: "A,B"}


def add_field_flags(parser: argparse.ArgumentParser, names: Iterable[str], aliases: Optional[dict] = None,
                    shown_defaults: Optional[dict] = None) -> None:
    """A flag for each field of ``names``: ``--name`` with its help and default (``shown_defaults`` where the
    command's default is not the field's), and hidden spellings (``--name-with-dashes``, the old names of
    :data:`ALIASES` or ``aliases``, ``--no_name`` for a switch)."""
    old_names = {}
    for old, new in {**ALIASES, **(aliases or {})}.items():
        old_names.setdefault(new, []).append(old)
    for name in names:
        f = TrainConfig.__dataclass_fields__[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = field_kind(name)
        choices = f.metadata.get("choices")
        old = old_names.get(name, [])
        spellings = [name] + [o for o in old]
        hidden = sorted(({"--" + s.replace("_", "-") for s in spellings} | {"--" + o for o in old})
                        - {"--" + name})
        help_text = f.metadata.get("help", "")
        # a None default whose meaning the help already gives ("default: the stage's") is not repeated as "none"
        notes = [] if default is None and "default" in help_text else [f"default: {_default_text(default)}"]
        if name in (shown_defaults or {}):
            notes = [f"default: {shown_defaults[name]}"]
        if kind is bool:
            options = dict(nargs="?", const=True, type=_flag_type(name), metavar="true|false")
            if not name.startswith("no_"):
                notes.append(f"--no_{name} for false")
        else:
            metavar = f.metadata.get("metavar") or ("{" + ",".join(choices) + "}" if choices else
                                                    _METAVARS.get(kind, "VALUE"))
            options = dict(type=_flag_type(name), metavar=metavar)
        if old:
            notes.append("also --" + ", --".join(old))
        text = (help_text + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")
        parser.add_argument("--" + name, dest=name, action=_FieldFlag, default=argparse.SUPPRESS, help=text,
                            **options)
        for option in hidden:
            parser.add_argument(option, dest=name, action=_FieldFlag, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS, **options)
        if kind is bool and not name.startswith("no_"):
            for option in (f"--no_{name}", f"--no-{name.replace('_', '-')}"):
                parser.add_argument(option, dest=name, action=_FieldFlag, nargs=0, const=False,
                                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_config_flags(parser: argparse.ArgumentParser, names: tuple) -> None:
    parser.add_argument("--config", metavar="NAME_OR_PATH",
                        help=f"YAML file of the fields below, or a shipped config by name "
                             f"({', '.join(shipped_configs()) or 'none found'}); flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a field (YAML value), e.g. --set extra_stsb_sentences=null")
    parser.set_defaults(_fields=names)
    add_field_flags(parser, names)


def add_commands(subparsers, **parser_options) -> None:
    """The application's subcommands on ``subparsers`` (of :mod:`ibkd.cli`), each with ``_run(args)``."""
    epilog = (f"Every flag also takes dashes (--learning-rate); optional fields take 'none' to unset a config "
              f"value. Paths may use {{data_dir}}: --data_dir or ${DATA_DIR_ENV}.")
    for name, help_text in (("distill", "stage 1: distill a teacher into a student on unlabeled sentences"),
                            ("finetune", "stage 2: supervised contrastive fine-tuning with an HSIC bottleneck")):
        p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=epilog, **parser_options,
                                  usage=f"ibkd {name} [--config NAME_OR_PATH] [--FIELD VALUE ...] [--set KEY=VALUE]")
        _add_config_flags(p, TRAIN_FIELDS)
        p.set_defaults(_run=_cmd_train)
    help_text = "compute (or verify) the teacher-vector cache of a corpus"
    p = subparsers.add_parser("cache-teacher", help=help_text, description=help_text, epilog=epilog, **parser_options)
    _add_config_flags(p, CACHE_TEACHER_FIELDS)
    p.set_defaults(_run=_cmd_cache)
    help_text = "STS-B dev/test Spearman of a saved encoder"
    p = subparsers.add_parser("eval", help=help_text, description=help_text, **parser_options)
    p.add_argument("model", help="model folder or hub id ('default' = the offline teacher)")
    add_field_flags(p, EVAL_FIELDS, aliases=EVAL_ALIASES, shown_defaults={"max_length": "the model's own"})
    p.set_defaults(_run=_cmd_eval)


# -- the commands ---------------------------------------------------------------------------------------

def build_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config: field defaults < ``--config`` < flags and ``--set``."""
    values = TrainConfig.canonical(load_yaml_mapping(resolve_config(args.config))) if args.config else {}
    values.setdefault("stage", "finetune" if args.command == "finetune" else "distill")
    if args.command in ("distill", "finetune") and values["stage"] != args.command:
        raise UsageError(f"the config is for stage {values['stage']!r} but the command is {args.command!r}")
    given = getattr(args, "_given", {})
    values.update({name: getattr(args, name) for name in given})
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set needs KEY=VALUE, got {item!r}")
        import yaml

        key = key.strip().replace("-", "_")
        key = ALIASES.get(key, key)
        if key in given:
            raise UsageError(f"--set {key} and {given[key]} both set {key}: give one")
        if key in TrainConfig.field_names() and key not in args._fields:
            raise UsageError(f"ibkd {args.command} has no setting {key}")
        values[key] = yaml.safe_load(raw)
    return TrainConfig.from_dict(values)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cmd_train(args) -> int:
    cfg = build_config(args)
    preflight(cfg)  # refusals before the trainer's imports and any model loading
    _quiet_libraries()
    from .trainer import run

    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0 and ("dev_spearman" in summary or "test_spearman" in summary
                                                   or summary.get("student")):
        print(json.dumps(summary))
        for split in ("dev", "test"):
            if f"{split}_spearman" in summary:
                print(f"STS-B {split} Spearman x100: {summary[f'{split}_spearman']:.2f}")
        print(f"student saved to {summary.get('student')}")
    return 0


def _cmd_cache(args) -> int:
    cfg = build_config(args)
    preflight(cfg, fields=["corpus", "extra_stsb_sentences"])
    device = resolve_device(cfg.device)
    _quiet_libraries()
    import torch

    from .data import read_sentences, stsb_sentences
    from .models import Encoder
    from .teacher_cache import build_teacher_cache

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    teacher = Encoder.load(cfg.resolve_path(cfg.teacher) if cfg.teacher != "default" else "default",
                           max_length=cfg.max_length).to(device)
    sentences, stats = read_sentences(cfg.resolve_path(cfg.corpus), column=cfg.corpus_column, limit=cfg.corpus_limit)
    if cfg.extra_stsb_sentences:
        sentences = list(dict.fromkeys(sentences + stsb_sentences(cfg.resolve_path(cfg.extra_stsb_sentences))))
    cache_dir = cfg.resolve_path(cfg.cache_dir) or str(Path(cfg.output_dir) / "teacher_cache")
    matrix = build_teacher_cache(teacher, sentences, cache_dir, batch_size=cfg.teacher_batch_size, device=device,
                                 progress=cfg.progress, pca_dim=cfg.pca_dim)
    print(f"{stats}; teacher embeddings {matrix.shape[0]} x {matrix.shape[1]} in {cache_dir}")
    return 0


def eval_paths(data_dir: Optional[str], given: Optional[dict] = None) -> dict:
    """The STS-B files of ``ibkd eval``: ``given`` ({split: path, or None to skip it}), else the split's file
    under the data folder (:func:`~ibkd.distill.stsb.stsb_path`). A missing folder or file is one UsageError
    naming the flag, and for the data folder ``$IBKD_DATA_DIR`` too."""
    given, paths = given or {}, {}
    for split in ("dev", "test"):
        if split in given:
            if given[split] is None:
                continue
            path = Path(given[split]).expanduser()
        elif not data_dir:
            raise UsageError(f"STS-B {split} file: pass --{split}, or the data folder with --data_dir or "
                             f"${DATA_DIR_ENV}")
        elif not Path(data_dir).expanduser().is_dir():
            raise UsageError(f"data folder not found: {data_dir} (--data_dir or ${DATA_DIR_ENV})")
        else:
            path = stsb_path(data_dir, split)
        if not path.is_file():
            where = "" if split in given else f", under --data_dir / ${DATA_DIR_ENV} {data_dir}"
            raise UsageError(f"STS-B {split} file not found: {path} (--{split}{where})")
        paths[split] = str(path)
    if not paths:
        raise UsageError("nothing to evaluate: --dev and --test are both none")
    return paths


def _cmd_eval(args) -> int:
    given = getattr(args, "_given", {})
    cfg = TrainConfig.from_dict({name: getattr(args, name) for name in given})
    paths = eval_paths(cfg.data_dir, {split: getattr(args, split) for split in ("dev", "test") if split in given})
    device = resolve_device(cfg.device)
    _quiet_libraries()
    from .evaluation import count_parameters, evaluate_sts
    from .models import Encoder

    encoder = Encoder.load(args.model, max_length=cfg.max_length if "max_length" in given else None).to(device)
    print(f"model {args.model}: {count_parameters(encoder) / 1e6:.1f}M parameters, dim {encoder.dim}")
    for split, path in paths.items():
        result = evaluate_sts(encoder.encode, path, batch_size=cfg.per_device_eval_batch_size, name=f"stsb-{split}")
        print(f"STS-B {split} Spearman x100: {result['spearman']:.2f} "
              f"({result['sentences_per_second']:.0f} sentences/s)")
    return 0
