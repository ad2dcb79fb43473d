import json

import numpy as np
import pytest
import torch

from ibkd.distill.data import DataError, LabeledData
from ibkd.distill.models import Encoder, build_student, make_tiny_bert
from ibkd.losses import IBKDLoss
from ibkd.distill.trainer import (CHECKPOINT_NAME, ConfigError, DistillData, FinetuneData, NonFiniteLossError, TrainConfig, Trainer,
                        build_loss)

WORDS = "man woman child dog cat horse plays guitar piano runs eats apple bread red blue car tree".split()


def sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("m") / "bert", num_layers=3, hidden_size=32, dropout=0.0))


def distill_trainer(tiny, tmp_path, n=24, method="ibkd", **overrides):
    settings = dict(output=str(tmp_path / "out"), batch_size=8, max_steps=3, progress=False, plot=False,
                    method=method, dev=None, test=None)
    cfg = TrainConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    teacher_vectors = np.random.default_rng(1).normal(size=(n, 48)).astype(np.float32)
    student = build_student(Encoder.load(tiny), layers=[0, 2])
    return Trainer(cfg, student, build_loss(cfg, student.dim, 48), DistillData(sentences(n), teacher_vectors))


def grads(trainer):
    return {n: p.grad.clone() for n, p in list(trainer.student.named_parameters()) + list(trainer.loss.named_parameters())
            if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_grad_cache_equals_uncached_stage1(tiny, tmp_path, chunk):
    results = {}
    for name, c in (("plain", None), ("cached", chunk)):
        trainer = distill_trainer(tiny, tmp_path / name, grad_cache_chunk=c)
        groups, teacher = trainer.data.batch(np.arange(8))
        res = trainer.forward_backward(groups, teacher)
        results[name] = (res, grads(trainer))
    (plain, g_plain), (cached, g_cached) = results["plain"], results["cached"]
    assert plain.loss == pytest.approx(cached.loss, rel=1e-5)
    assert g_plain.keys() == g_cached.keys() and len(g_plain) > 10
    for k in g_plain:
        torch.testing.assert_close(g_cached[k], g_plain[k], atol=1e-6, rtol=1e-4, msg=k)
    assert set(plain.grad_norms) == {"infonce", "hsic"} and all(v > 0 for v in plain.grad_norms.values())


def finetune_trainer(tiny, tmp_path, hard_negatives=True, **overrides):
    cfg = TrainConfig(stage="finetune", output=str(tmp_path / "out"), batch_size=6, max_steps=2, progress=False,
                      plot=False, dev=None, test=None, **overrides)
    a, p, n = sentences(12, 1), sentences(12, 2), sentences(12, 3)
    data = FinetuneData(LabeledData(a, p, n if hard_negatives else None))
    torch.manual_seed(0)
    student = Encoder.load(tiny)
    return Trainer(cfg, student, build_loss(cfg, student.dim), data)


@pytest.mark.parametrize("hard_negatives", [True, False])
def test_grad_cache_equals_uncached_stage2(tiny, tmp_path, hard_negatives):
    out = []
    for c in (None, 4):
        trainer = finetune_trainer(tiny, tmp_path / str(c), hard_negatives, grad_cache_chunk=c)
        assert trainer.hsic_layer == "penultimate" and trainer.groups == (3 if hard_negatives else 2)
        groups, _ = trainer.data.batch(np.arange(6))
        out.append((trainer.forward_backward(groups, None), grads(trainer)))
    assert out[0][0].loss == pytest.approx(out[1][0].loss, rel=1e-5)
    for k in out[0][1]:
        torch.testing.assert_close(out[1][1][k], out[0][1][k], atol=1e-6, rtol=1e-4, msg=k)


def test_stage2_without_hard_negatives_trains(tiny, tmp_path):
    trainer = finetune_trainer(tiny, tmp_path, hard_negatives=False)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    summary = trainer.fit()
    assert summary["steps"] == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.student.parameters()))
    assert (tmp_path / "out" / "final" / "ibkd_projection.safetensors").exists()


@pytest.mark.parametrize("method,terms", [("ibkd", {"infonce", "hsic"}), ("contrastive", {"infonce"}), ("mse", {"mse"})])
def test_methods_log_their_terms(tiny, tmp_path, method, terms):
    trainer = distill_trainer(tiny, tmp_path, method=method, plot=True)
    trainer.fit()
    rows = [json.loads(l) for l in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert terms <= set(rows[0]) and {f"grad_norm_{t}" for t in terms} <= set(rows[0])
    assert all(r["lr"] >= 0 and r["sentences_per_s"] > 0 for r in rows)
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000


def test_learning_rate_schedule(tiny, tmp_path):
    trainer = distill_trainer(tiny, tmp_path, max_steps=10, warmup_ratio=0.3, lr=1e-3)
    lrs = []
    for _ in range(10):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] <= 1e-3 and lrs[3] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps(tiny, tmp_path, amp):
    trainer = distill_trainer(tiny, tmp_path, amp=amp, max_steps=2)
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    summary = trainer.fit()
    assert summary["steps"] == 2


def test_grad_accumulation_averages_micro_batches(tiny, tmp_path):
    accum = distill_trainer(tiny, tmp_path / "a", grad_accum=2)
    accum.optimizer.step = lambda *a, **k: None  # keep the weights, inspect the accumulated gradient
    accum.train_step()
    g_accum = grads(accum)
    single = distill_trainer(tiny, tmp_path / "s")
    for position in (0, 1):
        groups, teacher = single.data.batch(single.batches.indices(0, position))
        single.forward_backward(groups, teacher, loss_scale=0.5)
    for k, v in grads(single).items():
        torch.testing.assert_close(g_accum[k], v, msg=k)


def test_nan_loss_stops_and_keeps_checkpoint(tiny, tmp_path):
    trainer = distill_trainer(tiny, tmp_path, max_steps=4, save_steps=1)
    real_forward = trainer.loss.forward
    calls = {"n": 0}

    def sometimes_nan(s, t, x):
        calls["n"] += 1
        out = real_forward(s, t, x)
        if calls["n"] == 3:
            out["hsic"] = out["hsic"] * float("nan")
        return out

    trainer.loss.forward = sometimes_nan
    with pytest.raises(NonFiniteLossError, match="non-finite hsic loss at step 3"):
        trainer.fit()
    state = torch.load(tmp_path / "out" / CHECKPOINT_NAME, weights_only=False)
    assert state["step"] == 2
    for k, v in state["student"].items():
        assert torch.isfinite(v.float()).all(), k


def test_nan_skip_policy(tiny, tmp_path):
    trainer = distill_trainer(tiny, tmp_path, max_steps=3, nan_policy="skip")
    real_forward, calls = trainer.loss.forward, {"n": 0}

    def once_nan(s, t, x):
        calls["n"] += 1
        out = real_forward(s, t, x)
        if calls["n"] == 2:
            out["infonce"] = out["infonce"] + float("inf")
        return out

    trainer.loss.forward = once_nan
    summary = trainer.fit()
    assert summary == {**summary, "steps": 3, "nan_skips": 1}


def test_corpus_smaller_than_a_batch(tiny, tmp_path):
    with pytest.raises(DataError, match="fewer than one batch"):
        distill_trainer(tiny, tmp_path, n=5)


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig.from_dict({"amp": "fp8"})
    with pytest.raises(ConfigError, match="mse"):
        TrainConfig.from_dict({"stage": "finetune", "method": "mse"})
    cfg = TrainConfig.from_dict({"stage": "finetune", "method": "contrastive"})
    assert cfg.stage_defaults() == {"temperature": 0.05, "beta": 0.0, "gamma": 0.1, "projection_dim": 128,
                                    "hsic_layer": "penultimate"}
    assert TrainConfig().stage_defaults()["beta"] == "auto"


def test_the_cli_trains_with_the_library_loss_and_its_defaults():
    cfg = TrainConfig.from_dict({})
    loss = build_loss(cfg, 16, 16)
    assert type(loss) is IBKDLoss
    default = IBKDLoss(16, 16)
    assert loss.beta.auto and default.beta.auto and loss.beta.target_ratio == default.beta.target_ratio
    assert loss.normalize_hsic_inputs == default.normalize_hsic_inputs
    assert loss.hsic.gamma == default.hsic.gamma and float(loss.infonce.temperature) == float(default.infonce.temperature)
    s = torch.randn(4, 16)
    torch.testing.assert_close(loss.projection(s), s)  # identity start, as the library's default
    random_p = build_loss(TrainConfig.from_dict({"projection_init": "random"}), 16, 16)
    assert not torch.allclose(random_p.projection(s), s)
    with pytest.raises(ConfigError, match="projection_init"):
        TrainConfig.from_dict({"projection_init": "zeros"})
    # the old key name still reads, a bad beta is one line
    assert TrainConfig.from_dict({"hsic_normalize": False}).normalize_hsic_inputs is False
    with pytest.raises(ConfigError, match="beta must be a non-negative number or 'auto'"):
        TrainConfig.from_dict({"beta": "sometimes"})
    assert build_loss(TrainConfig.from_dict({"beta": 3}), 16, 16).beta.current() == 3.0


def test_data_dir_comes_from_ibkd_data_dir(tmp_path):
    import os
    import subprocess
    import sys

    code = "from ibkd.distill.trainer import TrainConfig; print(TrainConfig().data_dir)"
    env = {**os.environ, "IBKD_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == str(tmp_path.resolve())
