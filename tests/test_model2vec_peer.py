"""The Model2Vec peer: model2vec's distill of a tiny random BERT, the encoder adapter and the row."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("model2vec.distill", reason="model2vec with its distill extra is not installed "
                                                "(pip install 'model2vec[distill]')")

from model2vec import StaticModel  # noqa: E402

from ibkd.distill.evaluation import count_parameters, evaluate_sts  # noqa: E402
from ibkd.distill.models import make_tiny_bert  # noqa: E402
from ibkd.experiments.reproduce.model2vec_peer import (Model2VecError, StaticEncoder, distill_model2vec,  # noqa: E402
                                                       run_model2vec_row)
from ibkd.experiments.reproduce.run import evaluate_encoder  # noqa: E402

WORDS = "man woman child dog cat horse plays guitar piano runs eats apple bread red blue car tree".split()
SENTS = ["a man plays the guitar", "the dog runs", "red", "zzzz qqqq"]  # the last: unknown words only


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", num_layers=2, hidden_size=32, dropout=0.0))


@pytest.fixture(scope="module")
def distilled(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("m2v") / "model"
    return distill_model2vec(tiny, out, pca_dims=8, device="cpu")


def _sts_file(path):
    rows = []
    for i in range(12):
        a = " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(3))
        b = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3))
        rows.append(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{i % 6}.000\t{a}\t{b}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_distill_saves_a_static_model(distilled):
    folder = Path(distilled["folder"])
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    static = StaticModel.from_pretrained(str(folder))
    assert distilled["embedding_dim"] == static.dim == 8
    assert distilled["parameters"] == distilled["vocab_size"] * 8 == static.embedding.size
    assert distilled["pca_dims"] == 8 and distilled["distill_seconds"] >= 0 and distilled["model2vec_version"]


def test_adapter_is_the_static_models_encode(distilled):
    encoder = StaticEncoder.load(distilled["folder"])
    static = StaticModel.from_pretrained(distilled["folder"])
    vectors = encoder.encode(SENTS, batch_size=2)
    assert vectors.dtype == torch.float32 and vectors.shape == (len(SENTS), 8)
    np.testing.assert_allclose(vectors.numpy(), static.encode(SENTS).astype(np.float32), rtol=1e-6, atol=1e-6)
    norms = vectors[:3].norm(dim=1)  # Model2Vec normalises (a sentence of unknown tokens only stays zero)
    torch.testing.assert_close(norms, torch.ones(3), atol=1e-3, rtol=0)
    assert count_parameters(encoder) == distilled["parameters"] and encoder.dim == 8
    assert encoder.encode(["the dog runs"]).shape == (1, 8)


def test_the_reproduction_scores_the_adapter(distilled, tmp_path):
    sts = _sts_file(tmp_path / "sts.csv")
    encoder = StaticEncoder.load(distilled["folder"])
    res = evaluate_sts(encoder, sts, batch_size=5)
    assert res["parameters"] == distilled["parameters"] and res["embedding_dim"] == 8 and res["n"] == 12
    out = evaluate_encoder(encoder, {"dev": sts, "test": sts}, 4)
    assert out["dev_spearman"] == out["test_spearman"] and np.isfinite(out["dev_spearman"])
    assert out["parameters"] == distilled["parameters"] and out["sentences_per_second"] > 0


def test_row(tiny, tmp_path):
    sts = _sts_file(tmp_path / "sts.csv")
    ctx = SimpleNamespace(spec={"common": {"teacher": tiny}, "eval_batch_size": 8}, sts={"dev": sts, "test": sts},
                          data_dir=None, num_threads=None)
    row = SimpleNamespace(info={"pca_dims": 4, "device": "cpu"})
    out = run_model2vec_row(row, ctx, tmp_path / "row", teacher=tiny, evaluate=evaluate_encoder)
    assert out["student"] == str(tmp_path / "row" / "model") and out["student_path"] == "model"
    assert out["embedding_dim"] == 4 and out["parameters"] == out["vocab_size"] * 4 and out["pca_dims"] == 4
    for key in ("train_seconds", "dev_spearman", "test_spearman", "sentences_per_second", "sentences_per_second_by_split"):
        assert key in out
    # a second distillation of the same teacher gives the same scores
    again = run_model2vec_row(row, ctx, tmp_path / "row2", teacher=tiny, evaluate=evaluate_encoder)
    assert (again["dev_spearman"], again["parameters"]) == (out["dev_spearman"], out["parameters"])


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(Model2VecError, match="pca_dims"):
        distill_model2vec(tiny, tmp_path / "x", pca_dims=0)
    with pytest.raises(Model2VecError, match="teacher_path_or_id"):
        distill_model2vec(str(tmp_path / "missing"), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StaticEncoder.load(tmp_path / "nowhere")
