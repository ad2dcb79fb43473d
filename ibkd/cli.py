"""The ``ibkd`` command (console script ``ibkd.cli:main``, ``python -m ibkd``, ``torchrun -m ibkd``).

It sits above the three layers and only routes: ``distill``, ``finetune``, ``cache-teacher`` and ``eval`` to
the application (:mod:`ibkd.distill.cli`), ``reproduce`` and ``compress-embeddings`` to the experiments.
An experiment module is imported only when its command is used (it is the heaviest import, and a missing
extra must not break the other commands); it provides ``add_arguments(parser)`` and ``run_cli(args) -> int``.
Every command's errors become its exit code in one place, :func:`ibkd.distill.errors.run_reporting_errors`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from .distill import cli as distill_cli
from .distill.cli import resolve_config, shipped_configs  # noqa: F401  (the names `ibkd --config` users meet)
from .distill.errors import EXIT_USAGE, missing_extra_message, run_reporting_errors  # noqa: F401

# command -> (module with add_arguments/run_cli, help)
EXPERIMENTS = {
    "reproduce": ("ibkd.experiments.reproduce",
                  "regenerate the paper's comparison (teacher, baselines, IBKD, compact student)"),
    "compress-embeddings": ("ibkd.experiments.embedding",
                            "distill the teacher's word-embedding table into a small one (Mou et al. 2016)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line ``ibkd: error: ...`` and exit code 2 (argparse's
    own prints the whole usage first, which for ``distill`` is a screenful above the one line that matters)."""

    help_hint = None  # the top parser reports a subcommand's unknown flags: it is told which subcommand

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"ibkd: error: {message} (see {self.help_hint or self.prog} --help)\n")


def _add_experiment(sub, name: str, module_name: str, help_text: str, load: bool) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    if not load:  # parsing never reaches it: only the command on the command line is built
        return
    try:
        module = importlib.import_module(module_name)
        if not hasattr(module, "run_cli"):  # a package whose command line is its cli module
            module = importlib.import_module(f"{module_name}.cli")
    except ImportError as exc:
        failure = exc

        def unavailable(args):  # reported by the one handler: a missing extra in one line, else a traceback
            raise failure

        p.set_defaults(_run=unavailable)
        return
    module.add_arguments(p)
    p.set_defaults(_run=module.run_cli)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``ibkd`` parser; ``command`` is the one whose experiment module is imported to build its flags."""
    parser = ArgumentParser(prog="ibkd", allow_abbrev=False,
                            description="Information-Bottleneck Knowledge Distillation of text encoders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    distill_cli.add_commands(sub, allow_abbrev=False)
    for name, (module_name, help_text) in EXPERIMENTS.items():
        _add_experiment(sub, name, module_name, help_text, load=name == command)
    if command in sub.choices:
        parser.help_hint = f"ibkd {command}"
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command in EXPERIMENTS and getattr(args, "config", None):
        args.config = resolve_config(args.config)  # `ibkd reproduce --config reproduce-minilm` by name too
    return args._run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(command).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad command line (2): a return code, for callers in-process
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(args.command, lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
