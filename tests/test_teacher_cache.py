import numpy as np
import pytest
import torch

from ibkd.distill.data import DataError
from ibkd.distill.models import Encoder, make_tiny_bert
from ibkd.distill.teacher_cache import build_teacher_cache, load_teacher_matrix, pca

SENTS = [f"the {w} runs in the park" for w in "man woman child dog cat horse".split()] + ["a red car", "big tree"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return Encoder.load(str(make_tiny_bert(tmp_path_factory.mktemp("t") / "bert", num_layers=2)))


class Counting:
    """Wraps an encoder, counting encoded rows; optionally fails after some calls (an interruption)."""

    def __init__(self, enc, fail_after=None):
        self.enc, self.rows, self.calls, self.fail_after = enc, 0, 0, fail_after

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode(self, sentences, **kw):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.rows += len(sentences)
        return self.enc.encode(sentences, **kw)


def test_build_then_reuse(teacher, tmp_path):
    first = build_teacher_cache(teacher, SENTS, tmp_path, progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(first)), teacher.encode(SENTS))
    counting = Counting(teacher)
    again = build_teacher_cache(counting, SENTS, tmp_path, progress=False)
    assert counting.rows == 0 and np.array_equal(first, again)
    assert isinstance(again, np.memmap)


def test_key_changes_with_corpus_and_settings(teacher, tmp_path):
    build_teacher_cache(teacher, SENTS, tmp_path, progress=False)
    counting = Counting(teacher)
    build_teacher_cache(counting, SENTS[:-1] + ["a blue car"], tmp_path, progress=False)
    assert counting.rows == len(SENTS)
    teacher.max_length = 8
    try:
        counting = Counting(teacher)
        build_teacher_cache(counting, SENTS, tmp_path, progress=False)
        assert counting.rows == len(SENTS)
    finally:
        teacher.max_length = 32
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_cache_is_rebuilt(teacher, tmp_path, damage):
    build_teacher_cache(teacher, SENTS, tmp_path, progress=False)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    data = folder / "embeddings.f32"
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(bytes(raw[:-4]))
    else:
        raw[5] ^= 0xFF
        data.write_bytes(bytes(raw))
    counting = Counting(teacher)
    rebuilt = build_teacher_cache(counting, SENTS, tmp_path, progress=False)
    assert counting.rows == len(SENTS)
    torch.testing.assert_close(torch.from_numpy(np.array(rebuilt)), teacher.encode(SENTS))


def test_interrupted_build_resumes(teacher, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(Counting(teacher, fail_after=2), SENTS, tmp_path, chunk_rows=3, progress=False)
    counting = Counting(teacher)
    out = build_teacher_cache(counting, SENTS, tmp_path, chunk_rows=3, progress=False)
    assert counting.rows == len(SENTS) - 6  # two chunks of 3 were already done
    torch.testing.assert_close(torch.from_numpy(np.array(out)), teacher.encode(SENTS))


def test_pca(teacher, tmp_path):
    reduced = build_teacher_cache(teacher, SENTS, tmp_path, progress=False, pca_dim=4)
    assert reduced.shape == (len(SENTS), 4)
    x = np.random.default_rng(0).normal(size=(50, 6)) * np.array([10, 5, 1, 0.1, 0.1, 0.1])
    out = pca(x, 2)
    assert out.shape == (50, 2) and abs(np.corrcoef(out.T)[0, 1]) < 1e-6  # decorrelated components
    assert out[:, 0].var() > out[:, 1].var() > 0


def test_user_matrices(tmp_path):
    m = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.save(tmp_path / "t.npy", m)
    torch.save({"embeddings": torch.from_numpy(m)}, tmp_path / "t.pt")
    assert np.array_equal(load_teacher_matrix(tmp_path / "t.npy", 5), m)
    assert np.array_equal(load_teacher_matrix(tmp_path / "t.pt", 5), m)
    with pytest.raises(DataError, match="5 rows but the corpus has 6"):
        load_teacher_matrix(tmp_path / "t.npy", 6)
    with pytest.raises(DataError, match="not found"):
        load_teacher_matrix(tmp_path / "x.npy", 5)
