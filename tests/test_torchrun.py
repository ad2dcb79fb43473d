"""torchrun, 2 processes, gloo: after 3 steps the student and the loss's projection P are identical on both ranks
and equal to a single process trained on the concatenated batch, for each integration and for the CLI trainer.

Every rank's rows are negatives of every other rank's (the loss gathers them) and HSIC is estimated on the global
batch, so the two runs compute the same objective; see ibkd/losses/distributed.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("_torchrun_worker.py")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ibkd.distill.models import make_tiny_bert

    return str(make_tiny_bert(tmp_path_factory.mktemp("torchrun") / "bert", num_layers=3, hidden_size=16))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *args], cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _states(out: Path, mode: str, world: int) -> list[dict]:
    return [torch.load(out / f"{mode}-world{world}-rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("mode", ["st", "st-cached", "hf", "cli"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tiny, tmp_path, mode):
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), str(WORKER), mode, tiny, str(tmp_path), "4"], tmp_path)
    _run([str(WORKER), mode, tiny, str(tmp_path), "8"], tmp_path)
    (single,) = _states(tmp_path, mode, 1)
    assert not torch.equal(single["loss"]["projection.weight"], single["initial_loss"]["projection.weight"])  # P trained
    if mode == "cli":  # the application exports rank 0's student and P: they equal the single process's
        (rank0,) = [torch.load(tmp_path / "cli-world2-rank0.pt", weights_only=True)]
        for part in ("student", "loss"):
            assert rank0[part].keys() == single[part].keys()
            for name, value in single[part].items():
                torch.testing.assert_close(rank0[part][name], value, rtol=1e-5, atol=1e-5,
                                           msg=f"{part}.{name}: 2 ranks vs 1 process")
        return
    rank0, rank1 = _states(tmp_path, mode, 2)
    for part in ("student", "loss"):
        assert rank0[part].keys() == rank1[part].keys() == single[part].keys()
        for name, value in single[part].items():
            assert torch.equal(rank0[part][name], rank1[part][name]), f"{part}.{name} differs across ranks"
            torch.testing.assert_close(rank0[part][name], value, rtol=1e-5, atol=1e-5,
                                       msg=f"{part}.{name}: 2 ranks vs 1 process")
    # beta=auto calibrated to the same value as the single process (the global batch's gradients)
    assert bool(rank0["loss"]["beta.done"]) and float(rank0["loss"]["beta.value"]) > 0
