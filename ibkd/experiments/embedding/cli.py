"""``ibkd compress-embeddings``: distill the teacher's word-embedding table into a small one (one run,
saved as a folder the compact student loads), or compare distilled and directly trained tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from ...distill.errors import run_reporting_errors
from ...distill.embedding_table import (ACTIVATIONS, EmbeddingConfigError, activation_fn, check_positive_int,
                                        save_small_table)
from .compare import DEFAULT_SEEDS, DEFAULT_SIZES, compare_embeddings, load_teacher_table, render_markdown, stsb_paths
from .train import DEFAULT_LR_GRID, METHODS, EmbeddingTaskConfig, select_learning_rate, train_sts_embedding


def _comma_list(convert: Callable, kind: str, example: str) -> Callable[[str], list]:
    """An argparse type for comma-separated values of one kind (at least one)."""

    def parse(text: str) -> list:
        try:
            values = [convert(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}s like {example}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {kind}, got {text!r}")
        return values

    return parse


_int_list = _comma_list(int, "int", "32,64,128")
_float_list = _comma_list(float, "number", "1e-3,3e-3")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``ibkd compress-embeddings`` (each with its help and default; underscore and dashed
    spellings both work, like the other commands)."""
    d = EmbeddingTaskConfig()

    def flag(name: str, **kwargs) -> None:
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*spellings, dest=name, **kwargs)

    flag("teacher", default="default", help="teacher whose word-embedding table is distilled (folder, hub id, or "
         "'default' = the offline all-MiniLM-L6-v2) (default: default)")
    flag("dim", type=int, default=None, help="d_small of a single run")
    flag("method", default="distilled", help="distilled (encoding of the big table) or direct (the baseline) "
         "(default: distilled)")
    flag("activation", default=d.activation, help=f"encoder non-linearity f: {', '.join(ACTIVATIONS)} "
         f"(default: {d.activation})")
    flag("seed", type=int, default=0, help="seed of the task network, the table and the data order (default: 0)")
    parser.add_argument("--output_dir", "--output", dest="output", default=None,
                        help="folder for the small table of a single run")
    flag("data_dir", default=None, help="folder holding sts/stsbenchmark/ (default: $IBKD_DATA_DIR)")
    flag("train", default=None, help="STS-B train file (instead of the one under --data_dir)")
    flag("dev", default=None, help="STS-B dev file (instead of the one under --data_dir)")
    flag("test", default=None, help="STS-B test file (instead of the one under --data_dir)")
    flag("epochs", type=int, default=None, help=f"epochs; the best on dev is kept (default: {d.epochs})")
    flag("batch_size", type=int, default=None, help=f"pairs per batch (default: {d.batch_size})")
    flag("lr", type=float, default=None, help="a fixed learning rate (default: chosen from --lr_grid on dev)")
    flag("lr_grid", type=_float_list, default=list(DEFAULT_LR_GRID),
         help=f"learning rates tried, the best on dev kept (default: {','.join(map(str, DEFAULT_LR_GRID))})")
    flag("task_hidden", type=int, default=None, help=f"width of the task network (default: {d.task_hidden})")
    flag("task_activation", default=None, help=f"non-linearity of the task network (default: {d.task_activation})")
    flag("teacher_weight", type=float, default=None,
         help=f"weight of the soft-target term (default: {d.teacher_weight:g})")
    flag("max_length", type=int, default=None, help=f"tokens per sentence (default: {d.max_length})")
    flag("device", default=None, help=f"cpu, cuda[:i] or auto (default: {d.device})")
    flag("num_threads", type=int, default=None, help=f"torch threads while training (default: {d.num_threads})")
    flag("compare", action="store_true", help="distilled vs direct for every --sizes x --seeds")
    flag("sizes", type=_int_list, default=list(DEFAULT_SIZES),
         help=f"--compare: table widths (default: {','.join(map(str, DEFAULT_SIZES))})")
    flag("seeds", type=_int_list, default=list(DEFAULT_SEEDS),
         help=f"--compare: seeds (default: {','.join(map(str, DEFAULT_SEEDS))})")
    flag("methods", default=",".join(METHODS), help=f"--compare: arms (default: {','.join(METHODS)})")
    flag("report", default=None, help="--compare: JSON file for the comparison")
    return parser


_CLI_FIELDS = {"epochs": "epochs", "batch_size": "batch_size", "task_hidden": "task_hidden",
               "task_activation": "task_activation", "teacher_weight": "teacher_weight", "max_length": "max_length",
               "device": "device", "num_threads": "num_threads"}


def _cli_overrides(args) -> dict:
    values = {field: getattr(args, flag) for flag, field in _CLI_FIELDS.items() if getattr(args, flag, None) is not None}
    values["activation"] = args.activation
    return values


def _run(args) -> int:
    activation_fn(args.activation, "--activation")
    if args.compare:
        methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
        for size in args.sizes:
            check_positive_int(size, "--sizes")
        grid = [args.lr] if args.lr is not None else args.lr_grid
        report = compare_embeddings(args.teacher, args.sizes, args.seeds, args.data_dir, methods=methods, lr_grid=grid,
                                    train_path=args.train, dev_path=args.dev, test_path=args.test,
                                    progress=lambda m: print(m, file=sys.stderr, flush=True), **_cli_overrides(args))
        if args.report:
            report_path = Path(args.report)
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(report, indent=1) + "\n")
        print(render_markdown(report), end="")
        if args.report:
            print(f"report written to {args.report}")
        return 0
    if args.dim is None:
        raise EmbeddingConfigError("--dim is required for a single run (or use --compare)")
    check_positive_int(args.dim, "--dim")
    if not args.output:
        raise EmbeddingConfigError("--output_dir is required for a single run (the folder for the small table)")
    if args.method not in METHODS:
        raise EmbeddingConfigError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    paths = stsb_paths(args.data_dir, args.train, args.dev, args.test)
    cfg = EmbeddingTaskConfig.from_dict({**_cli_overrides(args), "d_small": args.dim, "method": args.method,
                                         "seed": args.seed, **({"lr": args.lr} if args.lr is not None else {})})
    tokenizer, big_table, teacher_name = load_teacher_table(args.teacher)
    if args.lr is not None:
        result = train_sts_embedding(tokenizer, big_table, paths["train"], paths["dev"], paths["test"], cfg)
    else:
        result = select_learning_rate(tokenizer, big_table, paths["train"], paths["dev"], paths["test"], cfg,
                                      args.lr_grid)
    meta = {"d_small": cfg.d_small, "activation": cfg.activation, "method": cfg.method, "teacher": teacher_name,
            "vocab_size": int(result["table"].shape[0]), "dev_spearman": result["dev_spearman"],
            "test_spearman": result["test_spearman"], "best_epoch": result["best_epoch"], "lr": result["lr"],
            "seed": cfg.seed, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "task_hidden": cfg.task_hidden,
            "task_activation": cfg.task_activation, "teacher_weight": cfg.teacher_weight,
            "max_length": cfg.max_length, "dev_by_lr": result.get("dev_by_lr"),
            "data": {"train": paths["train"], "dev": paths["dev"], "test": paths["test"]}}
    save_small_table(args.output, result["table"], tokenizer, meta, task_head=result["task_head"])
    print(f"{cfg.method} table {tuple(result['table'].shape)} (lr {result['lr']:g}, epoch {result['best_epoch']}) "
          f"saved to {args.output}")
    print(f"STS-B dev Spearman x100: {result['dev_spearman']:.2f}")
    print(f"STS-B test Spearman x100: {result['test_spearman']:.2f}")
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """``ibkd compress-embeddings``: bad input is one line on stderr and exit code 2."""
    return run_reporting_errors("compress-embeddings", lambda: _run(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ibkd compress-embeddings",
                                     description="Distill the teacher's word-embedding table into a small one "
                                                 "(Mou et al. 2016), or compare with a directly trained table.")
    add_arguments(parser)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_cli(parser.parse_args(argv))
