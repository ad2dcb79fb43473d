"""The benchmark protocol's noise verdict (benchmarks/protocol.py), shared by every CPU benchmark."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import protocol  # noqa: E402


def _doc(start: dict, end: dict) -> dict:
    return {"ceiling": {"start": {"gflops": start}, "end": {"gflops": end}}}


def test_a_steady_ceiling_is_not_noisy():
    doc = _doc({"sgemm_mkl": 200.0, "bf16": 400.0}, {"sgemm_mkl": 180.0, "bf16": 420.0})
    assert protocol.judge_noise(doc) is False
    assert abs(doc["ceiling_moved"]["sgemm_mkl"] - 0.10) < 1e-12


def test_one_rate_that_moved_more_than_the_limit_marks_the_run_noisy():
    doc = _doc({"sgemm_mkl": 200.0, "bf16": 214.0}, {"sgemm_mkl": 200.0, "bf16": 279.0})
    assert protocol.judge_noise(doc) is True and doc["noisy"] is True


def test_nothing_to_compare_is_noisy():
    assert protocol.judge_noise(_doc({"sgemm_mkl": 200.0}, {})) is True
    assert protocol.judge_noise({"ceiling": {}}) is True
