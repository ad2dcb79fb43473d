"""pytest hooks of the benchmark suite (helpers live in ``bench_harness.py``): GPU cases skip without
CUDA, and the session-finish hook writes
``benchmarks/results/<machine-id>.json`` (``results/quick/`` for ``IBKD_BENCH_QUICK=1`` runs).

Timing goes through pytest-benchmark's ``benchmark`` fixture, so ``pytest benchmarks/
--benchmark-json=out.json`` works too; on CUDA the numbers we record come from
``triton.testing.do_bench`` (CUDA events, median), and pytest-benchmark times a synchronised call.

A run that covers only some cases (``-k ...``) merges into the existing results file, replacing the
cases it re-measured; ``IBKD_BENCH_FRESH=1`` starts the file over.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_harness  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_sessionfinish(session, exitstatus):
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    for path in bench_harness.write_results():
        if tr:
            tr.write_line(f"ibkd benchmark results: {os.path.relpath(path)}")
