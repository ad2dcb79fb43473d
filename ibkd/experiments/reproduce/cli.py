"""``ibkd reproduce``: the command line of the plan (flags, result paths, exit codes)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import transformers

from ...distill.errors import run_reporting_errors
from .plan import GROUPS, run_plan
from .render import write_outputs
from .run import atomic_json, set_threads
from .spec import DEFAULT_CONFIG, ReproduceError, load_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"reproduce YAML: a file or a shipped config's name (default {DEFAULT_CONFIG})")
    parser.add_argument("--quick", action="store_true", help="smoke run: the config's quick: section (minutes)")
    parser.add_argument("--output_dir", "--output", dest="output_dir", default=None,
                        help="folder of the rows (overrides output_dir: of the config; default runs/reproduce-<config>)")
    parser.add_argument("--data_dir", default=None,
                        help="the data folder ({data_dir} in the config: STS-B, the corpus); default: the config's "
                             "common.data_dir, else $IBKD_DATA_DIR")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated groups to run now ({','.join(GROUPS)}); finished rows are always reused")
    parser.add_argument("--workers", type=int, default=None,
                        help="rows trained at once, each in its own process with num_threads/workers threads "
                             "(overrides workers: of the config; default 1)")
    parser.add_argument("--reuse_results", "--reuse-results", dest="reuse_results", default=None,
                        help="a published results JSON (e.g. benchmarks/results/reproduce-minilm.json): its rows whose "
                             "settings hash matches the plan's are taken instead of trained again (marked restored, "
                             "with the commit they ran at); rows that changed run")
    parser.add_argument("--results", default=None,
                        help="results JSON path (overrides results:; default <output_dir>/reproduce.json); the "
                             "Markdown and PNG are written beside it")
    parser.add_argument("--readme", default=None,
                        help="a README with the marker lines to render into (overrides readme:; 'none' = skip)")
    parser.add_argument("--render_only", "--render-only", dest="render_only", action="store_true",
                        help="re-render Markdown/PNG/README from the results JSON")
    parser.add_argument("--no_progress", "--no-progress", dest="progress", action="store_false", default=True,
                        help="no progress bars")


def _results_paths(spec: dict, args) -> tuple[Path, Optional[Path]]:
    results = Path(args.results or spec.get("results") or Path(spec["output_dir"]) / "reproduce.json")
    readme_value = args.readme if args.readme is not None else spec.get("readme")
    readme = None if readme_value in (None, "", "none") else Path(readme_value)
    return results, readme


def run_cli(args: argparse.Namespace) -> int:
    """Exit code 0 when every requested row finished, 1 when a row failed (the others are kept), 2 on a
    bad config or request (one line on stderr)."""
    return run_reporting_errors("reproduce", lambda: _run_cli(args))


def _run_cli(args) -> int:
    spec = load_spec(args.config, quick=args.quick)
    if args.output_dir:
        spec["output_dir"] = args.output_dir
    if args.workers is not None:
        if args.workers < 1:
            raise ReproduceError(f"--workers must be a positive int, got {args.workers}")
        spec["workers"] = args.workers
    groups = None
    if args.rows:
        groups = [g.strip() for g in args.rows.split(",") if g.strip()]
        bad = sorted(set(groups) - set(GROUPS))
        if bad:
            raise ReproduceError(f"--rows: unknown group(s) {', '.join(bad)} (groups: {', '.join(GROUPS)})")
    results, readme = _results_paths(spec, args)
    if args.render_only:
        if not results.is_file():
            raise ReproduceError(f"--render_only: no results file {results}")
        doc = json.loads(results.read_text())
    else:
        if not args.progress:  # the loaders' bars too (one per model load: several per row)
            transformers.utils.logging.disable_progress_bar()
        set_threads(spec.get("num_threads"))
        argv = ["reproduce", "--config", args.config] + (["--quick"] if args.quick else [])
        argv += (["--rows", args.rows] if args.rows else []) + (["--output_dir", args.output_dir] if args.output_dir else [])
        argv += ["--workers", str(args.workers)] if args.workers is not None else []
        argv += ["--reuse_results", args.reuse_results] if args.reuse_results else []
        doc = run_plan(spec, groups=groups, data_dir=args.data_dir, progress=args.progress, argv=argv,
                       reuse_results=args.reuse_results)
        atomic_json(results, doc)
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
    parser = argparse.ArgumentParser(prog="ibkd reproduce", description="Regenerate the paper's comparison "
                                     "(teacher, baselines, IBKD, stage 2, compact student) as one resumable command.")
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))
