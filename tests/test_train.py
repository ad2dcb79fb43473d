"""The distillation application on sentence-transformers' trainer: what it trains with, what it writes, and
that it refuses to lose or mix work (NaN, a changed config on resume, corrupt checkpoints, a used folder)."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ibkd.distill.callbacks import NonFiniteLossError
from ibkd.distill.config import ConfigError, TrainConfig
from ibkd.distill.inputs import distill_dataset, to_sentence_transformer
from ibkd.distill.integrity import IntegrityError
from ibkd.distill.models import Encoder, build_student, make_tiny_bert
from ibkd.distill.run_folder import RunFolderError
from ibkd.distill.trainer import build_loss, last_checkpoint, run
from ibkd.losses import STAGE1_DEFAULTS, IBKDLoss, SupervisedIBKDLoss

WORDS = "man woman child dog cat horse plays guitar piano runs eats apple bread red blue car tree".split()


def sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_bert(root / "teacher", num_layers=3, hidden_size=32, dropout=0.1)
    make_tiny_bert(root / "teacher-no-dropout", num_layers=3, hidden_size=32, dropout=0.0)
    (root / "corpus.txt").write_text("\n".join(dict.fromkeys(sentences(80))) + "\n")
    rows = [f"main-captions\tMSRvid\t2012test\t{i:04d}\t{(i * 7) % 6:.1f}\t{a}\t{b}"
            for i, (a, b) in enumerate(zip(sentences(40, 1), sentences(40, 2)))]
    (root / "sts.csv").write_text("\n".join(rows) + "\n")
    return root


def config(files, out, **overrides):
    values = dict(teacher=str(files / "teacher"), student_layers="0,2", corpus=str(files / "corpus.txt"),
                  per_device_train_batch_size=8, max_steps=3, save_steps=1, max_length=16, output_dir=str(out),
                  seed=3, progress=False, plot=False, dev=None, test=None)
    values.update(overrides)
    return TrainConfig.from_dict(values)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_distill_exports_the_student_with_its_loss_state_card_and_log(files, tmp_path):
    summary = run(config(files, tmp_path / "out", dev=str(files / "sts.csv"), test=str(files / "sts.csv")))
    final = tmp_path / "out" / "final"
    assert summary["steps"] == 3 and summary["student"] == str(final)
    assert {"dev_spearman", "test_spearman"} <= set(summary)
    for name in ("model.safetensors", "modules.json", "ibkd_projection.safetensors", "ibkd_checksums.json",
                 "README.md"):
        assert (final / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "infonce", "hsic", "beta", "grad_norm_infonce", "grad_norm_hsic", "grad_ratio_hsic_infonce",
                "lr", "sentences_per_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "learning_rate" in saved and "per_device_train_batch_size: 8" in saved


def test_the_cli_trains_with_the_library_loss_and_its_defaults(files, tmp_path):
    cfg = config(files, tmp_path / "out")
    model = to_sentence_transformer(build_student(Encoder.load(str(files / "teacher")), layers=[0, 2]), "cpu")
    loss = build_loss(cfg, model, 48)
    assert type(loss.ibkd) is IBKDLoss
    assert loss.ibkd.beta.auto == (STAGE1_DEFAULTS["beta"] == "auto")
    assert float(loss.ibkd.infonce.temperature) == STAGE1_DEFAULTS["temperature"]
    stage2 = build_loss(config(files, tmp_path / "o2", stage="finetune", train_file=str(files / "sts.csv")), model)
    assert type(stage2.ibkd) is SupervisedIBKDLoss


def test_without_projection_the_students_own_vector_enters_the_infonce(files, tmp_path):
    model = to_sentence_transformer(build_student(Encoder.load(str(files / "teacher")), layers=[0, 2]), "cpu")
    loss = build_loss(config(files, tmp_path / "o1", projection=False), model, 32)
    assert isinstance(loss.ibkd.projection, torch.nn.Identity)
    assert not any(name.startswith("ibkd.projection") for name, _ in loss.named_parameters())
    stage2 = build_loss(config(files, tmp_path / "o2", stage="finetune", train_file=str(files / "sts.csv"),
                               projection=False), model)
    assert isinstance(stage2.ibkd.projection, torch.nn.Identity)
    with pytest.raises(ConfigError, match="projection_dim 16 needs the projection"):
        config(files, tmp_path / "o3", projection=False, projection_dim=16)
    summary = run(config(files, tmp_path / "out", projection=False, max_steps=2))
    assert summary["steps"] == 2
    run(config(files, tmp_path / "out", projection=False, max_steps=3, resume=True,
               allow_config_change=["max_steps"]))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 3


def test_teacher_vectors_are_the_label_column():
    data = distill_dataset(["a b", "c d"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert data.column_names == ["sentence", "label"]
    assert data[1]["label"] == [3.0, 4.0, 5.0]


def test_grad_cache_trains_like_the_uncached_loss(files, tmp_path):
    # without dropout: GradCache draws its masks per chunk, so only then are the two runs the same function
    teacher = str(files / "teacher-no-dropout")
    run(config(files, tmp_path / "plain", max_steps=2, teacher=teacher))
    run(config(files, tmp_path / "cached", max_steps=2, grad_cache_chunk=3, teacher=teacher))
    plain, cached = weights(tmp_path / "plain" / "final"), weights(tmp_path / "cached" / "final")
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("method, terms", [("contrastive", {"infonce"}), ("mse", {"mse"})])
def test_baselines_log_their_terms(files, tmp_path, method, terms):
    run(config(files, tmp_path / "out", method=method, max_steps=2))
    record = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[-1])
    assert terms <= set(record)


def test_method_none_exports_the_initial_student(files, tmp_path):
    summary = run(config(files, tmp_path / "out", method="none"))
    assert summary["steps"] == 0 and (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_finetune_on_labelled_pairs(files, tmp_path):
    summary = run(config(files, tmp_path / "out", stage="finetune", train_file=str(files / "sts.csv"), max_steps=2))
    assert summary["steps"] == 2
    record = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[-1])
    assert {"infonce", "hsic", "beta"} <= set(record)


def _nan_at_call(monkeypatch, call, term, value):
    real, calls = IBKDLoss.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == call:
                out = dict(out, **{term: out[term] * value, "loss": out["loss"] * value})
        return out

    monkeypatch.setattr(IBKDLoss, "forward", forward)


def test_nan_stop_names_the_step_and_keeps_finite_checkpoints(files, tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, 3, "hsic", float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite hsic loss at step 3; the last good checkpoint is .*checkpoint-2"):
        run(config(files, tmp_path / "out", max_steps=4))
    good = last_checkpoint(tmp_path / "out")
    assert good.name == "checkpoint-2"
    assert all(torch.isfinite(v).all() for v in weights(good).values())


def test_nan_skip_leaves_the_weights_of_the_skipped_step(files, tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, 2, "infonce", float("inf"))
    summary = run(config(files, tmp_path / "out", max_steps=3, nan_policy="skip", save_total_limit=None))
    assert summary["nan_skips"] == 1 and summary["steps"] == 3
    before, after = weights(tmp_path / "out" / "checkpoint-1"), weights(tmp_path / "out" / "checkpoint-2")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_folder_with_a_previous_run_is_refused_unless_overwritten(files, tmp_path):
    run(config(files, tmp_path / "out", max_steps=1))
    with pytest.raises(RunFolderError, match="holds a previous run"):
        run(config(files, tmp_path / "out", max_steps=1))
    run(config(files, tmp_path / "out", max_steps=1, overwrite_output_dir=True))


def test_resume_refuses_a_changed_config_unless_allowed(files, tmp_path):
    run(config(files, tmp_path / "out", max_steps=2))
    with pytest.raises(ConfigError, match=r"learning_rate \(0\.0001 -> 0\.0002\)"):
        run(config(files, tmp_path / "out", max_steps=2, resume=True, learning_rate=2e-4))
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        run(config(files, tmp_path / "out", max_steps=2, resume=True, per_device_train_batch_size=4))
    run(config(files, tmp_path / "out", max_steps=3, resume=True, allow_config_change=["max_steps"]))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 3


def test_a_run_saved_before_a_field_existed_resumes_with_that_fields_default(files, tmp_path):
    run(config(files, tmp_path / "out", max_steps=2))
    saved = tmp_path / "out" / "config.yaml"
    values = yaml.safe_load(saved.read_text())
    del values["projection"]
    saved.write_text(yaml.safe_dump(values))
    run(config(files, tmp_path / "out", max_steps=3, resume=True, allow_config_change=["max_steps"]))
    with pytest.raises(ConfigError, match=r"projection \(True -> False\)"):
        run(config(files, tmp_path / "out", max_steps=3, resume=True, projection=False))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_checkpoint_is_named_not_used(files, tmp_path, damage):
    run(config(files, tmp_path / "out", max_steps=2, save_total_limit=None))
    target = tmp_path / "out" / "checkpoint-2" / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data[: len(data) // 2] if damage == "truncate" else b"" if damage == "empty" else data))
    with pytest.raises(IntegrityError, match=r"checkpoint-2.*model\.safetensors"):
        run(config(files, tmp_path / "out", max_steps=3, resume=True, allow_config_change=["max_steps"]))


def test_an_unfinished_checkpoint_is_skipped_for_the_previous_one(files, tmp_path):
    run(config(files, tmp_path / "out", max_steps=2, save_total_limit=None))
    (tmp_path / "out" / "checkpoint-2" / "ibkd_checksums.json").unlink()  # as if killed while writing it
    assert last_checkpoint(tmp_path / "out").name == "checkpoint-1"


def test_evaluation_during_training_exports_the_best_dev_checkpoint(files, tmp_path):
    summary = run(config(files, tmp_path / "out", max_steps=2, eval_steps=1, dev=str(files / "sts.csv")))
    assert summary["best_checkpoint"] is not None and "dev_spearman" in summary


def test_report_to_tensorboard_writes_events(files, tmp_path):
    pytest.importorskip("tensorboard")
    run(config(files, tmp_path / "out", max_steps=1, report_to="tensorboard"))
    assert list((tmp_path / "out").rglob("events.out.tfevents.*"))


def test_report_to_an_unknown_integration_is_refused_before_training(files, tmp_path):
    with pytest.raises(ConfigError, match="report_to must be none or one of"):
        run(config(files, tmp_path / "out", report_to="tensorbored"))
    assert not (tmp_path / "out").exists()
