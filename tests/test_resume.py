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
