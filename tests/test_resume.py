"""A run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ibkd.distill.models import make_tiny_bert

WORDS = "man woman child dog cat horse plays guitar piano runs eats apple bread red blue car tree".split()


def _command(tmp_path, output, *extra):
    return [sys.executable, "-m", "ibkd", "distill", "--teacher", str(tmp_path / "teacher"), "--student-layers", "0,2",
            "--corpus", str(tmp_path / "corpus.txt"), "--batch-size", "8", "--max-steps", "6", "--save-steps", "1",
            "--max-length", "16", "--output", str(output), "--seed", "3", "--num-threads", "1", "--no-progress",
            "--set", "dev=null", "--set", "test=null", "--set", "plot=false", *extra]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    make_tiny_bert(tmp_path / "teacher", num_layers=3, hidden_size=32, dropout=0.1)  # dropout: RNG state matters
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 5)) for i in range(40)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")

    subprocess.run(_command(tmp_path, tmp_path / "full"), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(tmp_path, killed, "--set", "step_delay_s=0.5"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "train_log.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if log.exists() and any(json.loads(l)["step"] >= 2 for l in log.read_text().splitlines() if l.strip()):
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.1)
        else:
            pytest.fail("the run did not reach step 2")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "final").exists()
    subprocess.run(_command(tmp_path, killed, "--resume"), check=True, env=_env(), capture_output=True)

    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    resumed = load_file(killed / "final" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert (full[k] == resumed[k]).all(), k
    steps = [json.loads(l)["step"] for l in (killed / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _setup(tmp_path):
    make_tiny_bert(tmp_path / "teacher", num_layers=3, hidden_size=32, dropout=0.1)
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 5)) for i in range(40)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")


def _wait_for_step(proc, log, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and any(json.loads(l)["step"] >= step for l in log.read_text().splitlines() if l.strip()):
            return
        assert proc.poll() is None, "the run ended before it could be watched"
        time.sleep(0.1)
    pytest.fail(f"the run did not reach step {step}")


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_is_untouched(tmp_path):
    _setup(tmp_path)
    out = tmp_path / "out"
    first = subprocess.Popen(_command(tmp_path, out, "--set", "step_delay_s=8"), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(first, out / "train_log.jsonl", 1)
        seconds = [subprocess.Popen(_command(tmp_path, out, "--seed", "4", *extra), env=_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for extra in ((), ("--overwrite_output_dir",), ("--resume",))]
        for second in seconds:
            _, stderr = second.communicate(timeout=300)
            assert second.returncode == 2, stderr
            error = [l for l in stderr.splitlines() if l.startswith("ibkd: error:")]
            assert len(error) == 1 and "in use by another ibkd run" in error[0], stderr
        assert first.poll() is None, "the first run ended before the others were refused: the test proves nothing"
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert "seed: 3" in (out / "config.yaml").read_text()  # the first run's own config, not the second's


@pytest.mark.slow
def test_a_previous_run_is_refused_unless_overwritten_and_no_stale_files_survive(tmp_path):
    _setup(tmp_path)
    out = tmp_path / "out"
    subprocess.run(_command(tmp_path, out), check=True, env=_env(), capture_output=True)
    (out / "best").mkdir()  # as an older run with evaluation during training would have left
    again = subprocess.run(_command(tmp_path, out), env=_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "holds a previous run" in again.stderr and "--overwrite_output_dir" in again.stderr
    subprocess.run(_command(tmp_path, out, "--overwrite_output_dir"), check=True, env=_env(), capture_output=True)
    assert not (out / "best").exists() and (out / "final" / "model.safetensors").is_file()
