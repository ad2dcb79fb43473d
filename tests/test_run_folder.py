import json
import os
import signal
import subprocess
import sys

import pytest

from ibkd.distill.integrity import IntegrityError, write_checksums
from ibkd.distill.run_folder import LOCK_NAME, RunFolderError, claim_output_dir, clean_leftovers

# A run as far as the folder is concerned: prints "ready" once imported, claims the folder on the first line
# of stdin, prints "claimed" or the error, then holds the claim until stdin closes.
_RUN = r"""
import sys
from ibkd.distill.run_folder import RunFolderError, claim_output_dir
print("ready", flush=True)
sys.stdin.readline()
try:
    lock = claim_output_dir(sys.argv[1], resume=False, overwrite=False)
except RunFolderError as exc:
    print("refused:", exc, flush=True)
    sys.exit(1)
print("claimed", flush=True)
sys.stdin.read()
lock.release()
"""


def _start(folder):
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _go(proc):
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _finish(proc):
    proc.stdin.close()
    return proc.wait(timeout=60)


def test_two_runs_into_one_folder_at_once_the_second_is_refused(tmp_path):
    out = tmp_path / "run"
    first, second = _start(out), _start(out)
    _go(first)
    _go(second)
    answers = {first: first.stdout.readline().strip(), second: second.stdout.readline().strip()}
    claimed = [p for p, a in answers.items() if a == "claimed"]
    refused = [p for p, a in answers.items() if a.startswith("refused:")]
    assert len(claimed) == 1 and len(refused) == 1, answers
    (holder,), (other,) = claimed, refused
    assert answers[other] == (f"refused: {out} is in use by another ibkd run (pid {holder.pid}, started "
                              f"{json.loads((out / LOCK_NAME).read_text())['started']}): wait for it or choose "
                              f"another --output_dir")
    assert _finish(other) == 1 and _finish(holder) == 0
    claim_output_dir(out, resume=False, overwrite=False).release()  # free again once the holder is done


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = _start(out)
    _go(holder)
    assert holder.stdout.readline().strip() == "claimed"
    with pytest.raises(RunFolderError, match=rf"in use by another ibkd run \(pid {holder.pid}, "):
        claim_output_dir(out, resume=False, overwrite=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    holder.stdin.close()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # the stale lock file is still there
    with claim_output_dir(out, resume=False, overwrite=False) as lock:
        assert lock.held and json.loads(lock.lock_path.read_text())["pid"] == os.getpid()
    assert not lock.held


def test_claim_creates_the_folder_and_can_be_taken_again_after_release(tmp_path):
    out = tmp_path / "a" / "b"
    lock = claim_output_dir(out, resume=False, overwrite=False)
    assert out.is_dir() and (out / LOCK_NAME).exists()
    with pytest.raises(RunFolderError, match="is in use by another ibkd run"):  # even from the same process
        claim_output_dir(out, resume=False, overwrite=False)
    lock.release()
    lock.release()  # idempotent
    claim_output_dir(out, resume=False, overwrite=False).release()


@pytest.mark.parametrize("artifact", ["checkpoint-500/", "final/", "best/", "train_log.jsonl", "config.yaml",
                                      "summary.json"])
def test_previous_run_is_refused(tmp_path, artifact):
    out = tmp_path / "run"
    out.mkdir()
    if artifact.endswith("/"):
        (out / artifact).mkdir()
    else:
        (out / artifact).write_text("{}")
    with pytest.raises(RunFolderError) as e:
        claim_output_dir(out, resume=False, overwrite=False)
    assert str(e.value) == (f"{out} holds a previous run: pass --overwrite_output_dir to replace it or --resume to "
                            f"continue it")
    claim_output_dir(out, resume=False, overwrite=True).release()  # the refusal released the lock


def test_unrelated_files_are_not_a_previous_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "teacher_cache").mkdir()
    (out / "checkpoints-old").mkdir()
    claim_output_dir(out, resume=False, overwrite=False).release()


def test_overwrite_removes_the_previous_run_only(tmp_path):
    out = tmp_path / "run"
    for name in ("checkpoint-10", "checkpoint-20", "best", "final", "runs", "eval"):
        (out / name).mkdir(parents=True)
        (out / name / "weights.bin").write_bytes(b"w")
    for name in ("train_log.jsonl", "config.yaml", "summary.json", "loss_curves.png", "notes.txt"):
        (out / name).write_text("x")
    (out / "teacher_cache" / "abc").mkdir(parents=True)
    (out / "teacher_cache" / "abc" / "embeddings.f32").write_bytes(b"e")
    with claim_output_dir(out, resume=False, overwrite=True) as lock:
        assert lock.resume_from is None
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "notes.txt", "teacher_cache"]
        assert (out / "teacher_cache" / "abc" / "embeddings.f32").read_bytes() == b"e"


def test_resume(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RunFolderError) as e:
        claim_output_dir(out, resume=True, overwrite=False)
    assert str(e.value) == f"--resume: {out} holds no run to resume: drop --resume to start one"
    (out / "config.yaml").write_text("seed: 1\n")  # a run stopped before its first checkpoint: step 0 again
    with claim_output_dir(out, resume=True, overwrite=False) as lock:
        assert lock.resume_from is None
    for step in (5, 10):
        (out / f"checkpoint-{step}").mkdir()
        (out / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"m" * 64)
        write_checksums(out / f"checkpoint-{step}")
    (out / "final").mkdir()
    with claim_output_dir(out, resume=True, overwrite=False) as lock:
        assert lock.resume_from == out / "checkpoint-10"
        assert (out / "final").exists() and (out / "config.yaml").exists()  # resume keeps everything
    (out / "checkpoint-10" / "model.safetensors").write_bytes(b"m" * 10)
    with pytest.raises(IntegrityError, match=r"model\.safetensors is truncated.*previous checkpoint \(checkpoint-5\)"):
        claim_output_dir(out, resume=True, overwrite=False)
    claim_output_dir(out, resume=False, overwrite=True).release()  # the integrity error released the lock


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunFolderError, match="pass one of them"):
        claim_output_dir(tmp_path, resume=True, overwrite=True)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        claim_output_dir(tmp_path / "f", resume=False, overwrite=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_crashed_writers_are_cleaned(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"m")
    write_checksums(out / "checkpoint-3")
    dead, live = _dead_pid(), os.getppid()
    leftovers = [f".config.yaml.tmp-{dead}", f"checkpoint-3/.optimizer.pt.tmp-{dead}", ".tmp-x1y2",
                 f"teacher_cache/k/.pca8.npy.tmp-{dead}", f"notes.txt.old-{dead}"]
    for name in leftovers:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"partial")
    (out / f".best.old-{dead}" / "inner").mkdir(parents=True)
    (out / f".final.tmp-{os.getpid()}").mkdir()  # this pid's own staging folder, left by an earlier process
    (out / "teacher_cache" / "k" / f".meta.json.tmp-{live}").write_text("being written right now")
    for keep in ("notes.txt", ".hidden", "report.old-version.txt"):
        (out / keep).write_text("keep")
    with claim_output_dir(out, resume=True, overwrite=False) as lock:
        assert lock.resume_from == out / "checkpoint-3"
        remaining = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert remaining == sorted([LOCK_NAME, ".hidden", "notes.txt", "report.old-version.txt",
                                "checkpoint-3/model.safetensors", "checkpoint-3/ibkd_checksums.json",
                                f"teacher_cache/k/.meta.json.tmp-{live}"])
    assert clean_leftovers(out) == []
