"""DDP on CPU (gloo, 2 processes): loss and gradients equal the single-process run on the full batch."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ibkd.models import Encoder, build_student, make_tiny_bert
from ibkd.train import DistillData, DistillObjective, FinetuneData, FinetuneObjective, TrainConfig, Trainer
from ibkd.data import LabeledData

WORDS = "man woman child dog cat horse plays guitar piano runs eats apple bread red blue car tree".split()


def _sentences(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for _ in range(n)]


def _trainer(model_dir, stage, chunk, out):
    torch.manual_seed(0)
    cfg = TrainConfig(stage=stage, output=out, batch_size=8, max_steps=1, progress=False, plot=False,
                      dev=None, test=None, grad_cache_chunk=chunk)
    d = cfg.stage_defaults()
    if stage == "distill":
        student = build_student(Encoder.load(model_dir), layers=[0, 2])
        objective = DistillObjective("ibkd", student.dim, 24, temperature=d["temperature"], beta=d["beta"],
                                     gamma=d["gamma"], projection_dim=None, hsic_normalize=True, backend="reference")
        teacher = np.random.default_rng(1).normal(size=(16, 24)).astype(np.float32)
        data = DistillData(_sentences(16, 0), teacher)
    else:
        student = Encoder.load(model_dir)
        objective = FinetuneObjective("ibkd", student.dim, temperature=d["temperature"], beta=d["beta"], gamma=d["gamma"],
                                      projection_dim=16, hsic_normalize=True, backend="reference")
        data = FinetuneData(LabeledData(_sentences(16, 1), _sentences(16, 2), _sentences(16, 3)))
    return Trainer(cfg, student, objective, data)


def _loss_and_grads(trainer):
    groups, teacher = trainer.data.batch(np.arange(8))
    res = trainer.forward_backward(groups, teacher)
    trainer.sync_grads()
    named = list(trainer.student.named_parameters()) + [("objective." + n, p) for n, p in trainer.objective.named_parameters()]
    return res.loss, {n: p.grad.clone() for n, p in named if p.grad is not None}


def _worker(rank, world, port, model_dir, stage, chunk, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss, grads = _loss_and_grads(_trainer(model_dir, stage, chunk, result_path + ".out"))
        torch.save({"loss": loss, "grads": grads}, f"{result_path}.{rank}")
        # both ranks leave their collectives before either tears gloo down (a rank destroying the group while
        # the other still has gloo work in flight aborted once: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("ddp") / "bert", num_layers=3, hidden_size=32))


@pytest.mark.parametrize("stage,chunk", [("distill", None), ("distill", 3), ("finetune", None)])
def test_two_processes_equal_single_process(tiny, tmp_path, stage, chunk):
    ref_loss, ref_grads = _loss_and_grads(_trainer(tiny, stage, chunk, str(tmp_path / "single")))
    result = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), tiny, stage, chunk, result), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(f"{result}.{rank}", weights_only=False)
        assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert got["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-4, msg=f"rank {rank}: {name}")
