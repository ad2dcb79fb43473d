import numpy as np
import pytest
import torch

from ibkd.distill.data import DataError
from ibkd.distill.models import Encoder, make_tiny_bert
from ibkd.distill.integrity import IntegrityError
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


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(raw[:-4]))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))


def _refused(teacher, tmp_path, file, message, **kw):
    """The damaged cache is refused with one line naming the file and saying how to rebuild; deleting the
    folder, as it says, rebuilds it."""
    counting = Counting(teacher)
    with pytest.raises(IntegrityError) as e:
        build_teacher_cache(counting, SENTS, tmp_path, progress=False, **kw)
    text = str(e.value)
    assert "\n" not in text and str(file) in text and message in text, text
    assert f"delete the cache folder {file.parent} and run again to rebuild it" in text
    assert counting.rows == 0
    import shutil

    shutil.rmtree(file.parent)
    rebuilt = build_teacher_cache(counting, SENTS, tmp_path, progress=False, **kw)
    assert counting.rows == len(SENTS)
    return rebuilt


@pytest.mark.parametrize("damage,message", [("truncate", "is truncated"), ("corrupt", "is corrupted"),
                                            ("empty", "is empty")])
def test_damaged_cache_is_refused(teacher, tmp_path, damage, message):
    build_teacher_cache(teacher, SENTS, tmp_path, progress=False)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    _damage(folder / "embeddings.f32", damage)
    rebuilt = _refused(teacher, tmp_path, folder / "embeddings.f32", message)
    torch.testing.assert_close(torch.from_numpy(np.array(rebuilt)), teacher.encode(SENTS))


def test_unreadable_meta_is_refused(teacher, tmp_path):
    build_teacher_cache(teacher, SENTS, tmp_path, progress=False)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (folder / "meta.json").write_text('{"key_fields": {"vers')
    _refused(teacher, tmp_path, folder / "meta.json", "is unreadable")


@pytest.mark.parametrize("damage,message", [("truncate", "is truncated"), ("corrupt", "is corrupted")])
def test_damaged_pca_is_refused(teacher, tmp_path, damage, message):
    build_teacher_cache(teacher, SENTS, tmp_path, progress=False, pca_dim=4)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    _damage(folder / "pca4.npy", damage)
    rebuilt = _refused(teacher, tmp_path, folder / "pca4.npy", message, pca_dim=4)
    assert rebuilt.shape == (len(SENTS), 4)


def test_pca_is_reused_and_recomputed_when_its_record_is_missing(teacher, tmp_path, monkeypatch):
    first = np.array(build_teacher_cache(teacher, SENTS, tmp_path, progress=False, pca_dim=4))
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    import ibkd.distill.teacher_cache as tc

    calls = []
    real = tc.pca
    monkeypatch.setattr(tc, "pca", lambda m, d: calls.append(d) or real(m, d))
    assert np.array_equal(build_teacher_cache(teacher, SENTS, tmp_path, progress=False, pca_dim=4), first)
    assert calls == []
    (folder / "pca4.json").unlink()  # a writer killed between the projection and its record
    assert np.array_equal(build_teacher_cache(teacher, SENTS, tmp_path, progress=False, pca_dim=4), first)
    assert calls == [4] and (folder / "pca4.json").exists()


def test_interrupted_build_resumes(teacher, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(Counting(teacher, fail_after=2), SENTS, tmp_path, chunk_rows=3, progress=False)
    counting = Counting(teacher)
    out = build_teacher_cache(counting, SENTS, tmp_path, chunk_rows=3, progress=False)
    assert counting.rows == len(SENTS) - 6  # two chunks of 3 were already done
    torch.testing.assert_close(torch.from_numpy(np.array(out)), teacher.encode(SENTS))


def test_leftovers_of_killed_writers_are_removed(teacher, tmp_path):
    import subprocess
    import sys

    build_teacher_cache(teacher, SENTS, tmp_path, progress=False)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / f".pca4.npy.tmp-{dead.pid}").write_bytes(b"partial")
    build_teacher_cache(teacher, SENTS, tmp_path, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["build.lock", "embeddings.f32", "meta.json"]


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


def test_cache_written_before_sizes_were_recorded_is_still_used(teacher, tmp_path):
    import json

    build_teacher_cache(teacher, SENTS, tmp_path, progress=False)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    meta = json.loads((folder / "meta.json").read_text())
    del meta["size"]
    (folder / "meta.json").write_text(json.dumps(meta))
    counting = Counting(teacher)
    build_teacher_cache(counting, SENTS, tmp_path, progress=False)
    assert counting.rows == 0
    _damage(folder / "embeddings.f32", "truncate")
    with pytest.raises(IntegrityError, match="is truncated"):
        build_teacher_cache(counting, SENTS, tmp_path, progress=False)


def test_builders_of_one_cache_wait_for_each_other(teacher, tmp_path):
    """Two builders started together (two rows of `ibkd reproduce --workers 2`): the cache is encoded once,
    the second waits for the first and reads its finished matrix."""
    import threading
    import time

    started = threading.Event()

    class Slow(Counting):
        def encode(self, sentences, **kw):
            started.set()
            time.sleep(0.3)  # long enough for the other builder to arrive while this one holds the lock
            return super().encode(sentences, **kw)

    builders = [Slow(teacher), Counting(teacher)]
    out = [None, None]

    def build(i):
        out[i] = np.array(build_teacher_cache(builders[i], SENTS, tmp_path, progress=False, chunk_rows=4))

    first = threading.Thread(target=build, args=(0,))
    first.start()
    started.wait(5)
    second = threading.Thread(target=build, args=(1,))
    second.start()
    first.join(30)
    second.join(30)
    assert builders[0].rows == len(SENTS) and builders[1].rows == 0
    assert np.array_equal(out[0], out[1])
