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


def test_train_step_runs_render_as_a_table_of_both_losses(tmp_path):
    import json

    import render

    case = {"batch": 4096, "dtype": "float32", "peers": {
        "reference": {"median_s": 40.0, "sentences_per_s": 102.4, "loss_only_median_s": 2.0, "loss_share": 0.05,
                      "memory": {"peak_bytes": 3 * 2**30}},
        "cpu": {"median_s": 32.0, "sentences_per_s": 128.0, "loss_only_median_s": 0.5, "loss_share": 0.016,
                "memory": {"peak_bytes": 2 * 2**30}}}}
    doc = {"schema": 1, "kind": "train-step", "machine": {"cpu_model": "X", "cpu_count": 2, "torch_threads": 2},
           "settings": {"threads": 2, "omp_wait_policy": "default", "length_chunk_size": 32, "rounds": 3},
           "ceiling": {"start": {"gflops": {"sgemm_mkl": 100.0}}, "end": {"gflops": {"sgemm_mkl": 101.0}}},
           "ceiling_moved": {"sgemm_mkl": 0.01}, "cases": [case]}
    (tmp_path / "train-step-x.json").write_text(json.dumps(doc))
    (tmp_path / "train-step-x-noisy.json").write_text(json.dumps(doc))  # never rendered
    (tmp_path / "length-chunks-x.json").write_text(json.dumps({"machine": {}, "cases": []}))  # its own notes
    assert render.render(str(tmp_path)) == render.render(str(tmp_path), protocol_only=True)
    md = render.render(str(tmp_path), protocol_only=True)
    assert md.count("### Training step") == 1 and "`train-step-x`" in md
    row = next(line for line in md.splitlines() if line.startswith("| 4096 |"))
    assert "102.4 → 128.0" in row and "+25.0%" in row and "5.0%" in row and "3.00 GiB → 2.00 GiB" in row


def test_benchmark_children_allocate_with_huge_pages_unless_turned_off(monkeypatch):
    import bench_common as bc

    monkeypatch.delenv("IBKD_BENCH_THP", raising=False)
    env = bc.child_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "THP_MEM_ALLOC_ENABLE": "1"}
    assert bc.allocator_settings()["torch_thp_mem_alloc"] is True
    assert bc.allocator_settings()["host_thp"] in ("always", "madvise", "never", "unknown")
    monkeypatch.setenv("IBKD_BENCH_THP", "0")
    assert "THP_MEM_ALLOC_ENABLE" not in bc.child_env({"PATH": "/bin"})
    assert bc.allocator_settings()["torch_thp_mem_alloc"] is False


def test_the_gemm_rates_decide_noise_and_the_memory_rates_are_recorded_beside_them():
    # the memory rates are not repeatable to 20 % between fresh processes on an idle host (protocol.judge_noise)
    doc = {"ceiling": {"start": {"gflops": {"sgemm_mkl": 175.0}, "memory_gbps": {"stream_add": 30.0}},
                       "end": {"gflops": {"sgemm_mkl": 176.0}, "memory_gbps": {"stream_add": 15.0}}}}
    assert protocol.judge_noise(doc) is False
    assert abs(doc["ceiling_moved"]["stream_add"] - 0.5) < 1e-12
    assert doc["noise_gate"] == ["sgemm_mkl"]
    doc["ceiling"]["end"]["gflops"]["sgemm_mkl"] = 130.0
    assert protocol.judge_noise(doc) is True
    # only memory rates: nothing that decides, so nothing is published
    assert protocol.judge_noise({"ceiling": {"start": {"memory_gbps": {"stream_add": 30.0}},
                                             "end": {"memory_gbps": {"stream_add": 30.0}}}}) is True


def test_memory_rates_are_measured_in_gigabytes_per_second():
    rates = protocol.memory_rates(reps=1)
    assert set(rates) == {"stream_add", "fresh_alloc"}
    assert all(0.1 < v < 10_000 for v in rates.values())
