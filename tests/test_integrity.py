import json
import shutil

import pytest

from ibkd.distill.integrity import (MANIFEST, IntegrityError, checkpoints, newest_valid_checkpoint, verify_checksums,
                                    write_checksums)


def _checkpoint(folder, payload=b"weights" * 1000):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "sub").mkdir()
    (folder / "sub" / "trainer_state.json").write_text('{"global_step": 3}')
    write_checksums(folder)
    return folder


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_sealed_folder_verifies_and_lists_every_file(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint-3")
    verify_checksums(ckpt)
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "sub/trainer_state.json"}
    assert files["model.safetensors"]["size"] == 7000 and len(files["model.safetensors"]["sha256"]) == 64


def test_flipped_bit_names_the_file(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint-3")
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    raw[1234] ^= 0x10
    (ckpt / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError) as e:
        verify_checksums(ckpt)
    message = _one_line(e)
    assert str(ckpt / "model.safetensors") in message and "corrupted" in message and "delete it" in message


def test_truncated_empty_and_missing_files(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint-3")
    target = ckpt / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(IntegrityError, match=r"model\.safetensors is truncated \(100 of 7000 bytes\)") as e:
        verify_checksums(ckpt)
    _one_line(e)
    target.write_bytes(b"")
    with pytest.raises(IntegrityError, match=r"model\.safetensors is empty \(expected 7000 bytes\)"):
        verify_checksums(ckpt)
    target.unlink()
    with pytest.raises(IntegrityError, match=r"model\.safetensors is missing"):
        verify_checksums(ckpt)


def test_missing_or_corrupt_manifest(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint-3")
    (ckpt / MANIFEST).write_text('{"files": {"model.safe')
    with pytest.raises(IntegrityError, match="checksums .* are unreadable") as e:
        verify_checksums(ckpt)
    _one_line(e)
    (ckpt / MANIFEST).unlink()
    with pytest.raises(IntegrityError) as e:
        verify_checksums(ckpt)
    assert _one_line(e) == (f"checkpoint {ckpt} has no checksums ({MANIFEST}): it was not written completely; "
                            "delete it (resume then uses the previous checkpoint) or start over with "
                            "--overwrite_output_dir")


def test_what_and_remedy_name_the_thing(tmp_path):
    folder = _checkpoint(tmp_path / "cache")
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"^teacher cache: .* delete the cache folder$"):
        verify_checksums(folder, what="teacher cache", remedy="delete the cache folder")


def test_staging_files_are_not_sealed(tmp_path):
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / "a.bin").write_bytes(b"a")
    (ckpt / ".a.bin.tmp-999").write_bytes(b"half")
    write_checksums(ckpt)
    assert set(json.loads((ckpt / MANIFEST).read_text())["files"]) == {"a.bin"}


def test_newest_valid_checkpoint(tmp_path):
    assert newest_valid_checkpoint(tmp_path / "absent") is None
    assert newest_valid_checkpoint(tmp_path) is None
    _checkpoint(tmp_path / "checkpoint-9")
    _checkpoint(tmp_path / "checkpoint-10")  # numeric order, not string order
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint folder")
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert newest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_damaged_newest_checkpoint_is_refused_not_skipped(tmp_path):
    _checkpoint(tmp_path / "checkpoint-9")
    newest = _checkpoint(tmp_path / "checkpoint-10")
    (newest / "model.safetensors").write_bytes(b"")
    with pytest.raises(IntegrityError) as e:
        newest_valid_checkpoint(tmp_path)
    message = _one_line(e)
    assert "model.safetensors is empty" in message
    assert f"delete {newest} to resume from the previous checkpoint (checkpoint-9)" in message
    shutil.rmtree(newest)  # as the message says: the previous one is used
    assert newest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-9"


def test_unsealed_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    _checkpoint(tmp_path / "checkpoint-9")
    unsealed = _checkpoint(tmp_path / "checkpoint-10")
    (unsealed / MANIFEST).unlink()  # the run was killed while saving it: the manifest is written last
    with caplog.at_level("WARNING", logger="ibkd.distill.integrity"):
        assert newest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-9"
    assert f"{unsealed} has no checksums" in caplog.text and "using the checkpoint before it" in caplog.text
    (tmp_path / "checkpoint-9" / "model.safetensors").write_bytes(b"w")  # the fallback is verified too
    with pytest.raises(IntegrityError, match=r"checkpoint-9/model\.safetensors is truncated.*to start from scratch"):
        newest_valid_checkpoint(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint-9")
    assert newest_valid_checkpoint(tmp_path) is None


def test_single_damaged_checkpoint_says_start_from_scratch(tmp_path):
    only = _checkpoint(tmp_path / "checkpoint-5")
    (only / "sub" / "trainer_state.json").write_text('{"global_step": 4}')  # same size, other bytes
    with pytest.raises(IntegrityError, match=r"trainer_state\.json is corrupted.*to start from scratch"):
        newest_valid_checkpoint(tmp_path)


def test_sealed_folder_replaced_atomically(tmp_path):
    from ibkd.distill._io import atomic_write_dir

    final = tmp_path / "final"

    def fill(version):
        def write(folder):
            (folder / "model.safetensors").write_bytes(version)
            write_checksums(folder)
        return write

    atomic_write_dir(final, fill(b"v1"))
    atomic_write_dir(final, fill(b"v2"))
    verify_checksums(final, what="model")
    assert (final / "model.safetensors").read_bytes() == b"v2"

    def crash(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(final, crash)
    assert (final / "model.safetensors").read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no staging folder left behind
