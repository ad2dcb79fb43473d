"""The training-step benchmark's results store (benchmarks/train_step_store.py): per-case verdicts, quiet
cases merged across runs, noisy cases kept apart, no mixing of settings, one run at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import render  # noqa: E402
import train_step_store as tss  # noqa: E402

SETTINGS = {"threads": 2, "omp_wait_policy": "default", "rounds": 3, "length_chunk_size": 32}
MACHINE = {"cpu_model": "X", "cpu_count": 2, "torch_threads": 2}


def _header(started="2026-12-03T22:00:00+00:00", **settings):
    return {"machine": MACHINE, "settings": {**SETTINGS, **settings}, "note": "", "started_at": started,
            "ceiling": {"start": {"gflops": {"sgemm_mkl": 150.0}}}}


def _case(batch, dtype, ref_s, fused_s, moved=0.05):
    peer = lambda t: {"median_s": t, "sentences_per_s": batch / t, "loss_only_median_s": t / 10, "loss_share": 0.1,
                      "memory": {"peak_bytes": 2**30}}
    return {"batch": batch, "dtype": dtype, "measured_at": "2026-12-03T22:30:00+00:00",
            "ceiling": {"start": {"gflops": {"sgemm_mkl": 150.0}}, "end": {"gflops": {"sgemm_mkl": 150.0 * (1 + moved)}}},
            "ceiling_moved": {"sgemm_mkl": moved}, "noisy": moved > 0.2,
            "peers": {"reference": peer(ref_s), "cpu": peer(fused_s)}}


def _paths(tmp_path, stamp):
    return str(tmp_path / "train-step-x.json"), str(tmp_path / f"train-step-x-{stamp}-noisy.json")


def test_quiet_cases_are_published_at_once_and_a_later_run_replaces_only_what_it_remeasures(tmp_path):
    pub, noisy1 = _paths(tmp_path, "a")
    s1 = tss.Store(pub, noisy1, _header())
    s1.add(_case(4096, "float32", 50.0, 48.0))
    assert [c["batch"] for c in json.load(open(pub))["cases"]] == [4096]  # written before the run ends
    s1.add(_case(16384, "bfloat16", 130.0, 120.0))
    s1.finish({"gflops": {"sgemm_mkl": 151.0}}, "2026-12-03T23:00:00+00:00")
    assert not os.path.exists(pub + ".lock") and not os.path.exists(noisy1)

    s2 = tss.Store(pub, _paths(tmp_path, "b")[1], _header(started="2026-12-04T01:00:00+00:00"))
    s2.add(_case(4096, "float32", 51.0, 40.0))
    s2.finish(None, "2026-12-04T01:30:00+00:00")
    doc = json.load(open(pub))
    assert [(c["batch"], c["dtype"]) for c in doc["cases"]] == [(4096, "float32"), (16384, "bfloat16")]
    assert doc["cases"][0]["peers"]["cpu"]["median_s"] == 40.0  # the re-measured case
    assert doc["cases"][1]["peers"]["cpu"]["median_s"] == 120.0  # kept from the first run
    assert [r["cases"] for r in doc["runs"]] == [[[4096, "float32"], [16384, "bfloat16"]], [[4096, "float32"]]]


def test_a_noisy_case_goes_to_the_runs_own_file_and_never_replaces_a_published_one(tmp_path):
    pub, noisy = _paths(tmp_path, "a")
    s1 = tss.Store(pub, noisy, _header())
    s1.add(_case(4096, "float32", 50.0, 48.0))
    s1.finish(None, "t")
    pub_before = open(pub).read()
    noisy2 = _paths(tmp_path, "b")[1]
    s2 = tss.Store(pub, noisy2, _header())
    assert s2.add(_case(4096, "float32", 99.0, 10.0, moved=0.3)) == noisy2
    s2.finish(None, "t2")
    assert open(pub).read() == pub_before  # a run that published nothing leaves the file as it was
    kept = json.load(open(noisy2))
    assert kept["noisy"] is True and kept["cases"][0]["peers"]["cpu"]["median_s"] == 10.0
    assert not os.path.exists(noisy)  # the first run's (absent) noisy record is not the second's
    # rendering skips the noisy file and shows the published case with its own bracket
    md = render.render(str(tmp_path), protocol_only=True)
    assert md.count("### Training step") == 1
    row = next(line for line in md.splitlines() if line.startswith("| 4096 |"))
    assert "81.9 → 85.3" in row and "+4.2%" in row
    assert "150 → 158 (max move 5%)" in row and "2026-12-03T22:30" in row


def test_a_run_with_other_settings_stops_before_measuring_and_names_the_difference(tmp_path):
    pub, noisy = _paths(tmp_path, "a")
    s1 = tss.Store(pub, noisy, _header())
    s1.add(_case(4096, "float32", 50.0, 48.0))
    s1.finish(None, "t")
    with pytest.raises(tss.StoreError, match=r"rounds: 3 vs 5"):
        tss.Store(pub, noisy, _header(rounds=5))
    assert not os.path.exists(pub + ".lock")  # the refused run released its lock


def test_a_corrupted_published_file_is_reported_not_overwritten(tmp_path):
    pub, noisy = _paths(tmp_path, "a")
    open(pub, "w").write('{"schema": 2, "cases": [')
    with pytest.raises(tss.StoreError, match="not readable JSON"):
        tss.Store(pub, noisy, _header())
    assert open(pub).read() == '{"schema": 2, "cases": ['


def test_a_file_of_the_old_single_bracket_schema_is_not_merged_into(tmp_path):
    pub, noisy = _paths(tmp_path, "a")
    json.dump({"schema": 1, "kind": "train-step", "settings": SETTINGS, "cases": []}, open(pub, "w"))
    with pytest.raises(tss.StoreError, match="schema 1"):
        tss.Store(pub, noisy, _header())


def test_one_run_at_a_time_and_a_dead_runs_lock_is_taken_over(tmp_path):
    pub, noisy = _paths(tmp_path, "a")
    s1 = tss.Store(pub, noisy, _header())
    with pytest.raises(tss.StoreError, match=rf"pid {os.getpid()}"):
        tss.Store(pub, noisy, _header())
    s1.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    open(pub + ".lock", "w").write(str(dead.pid))
    s3 = tss.Store(pub, noisy, _header())  # the process holding the lock is gone
    assert open(pub + ".lock").read() == str(os.getpid())
    s3.release()
