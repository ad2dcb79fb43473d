import json

import pytest

from ibkd.distill.cli import main
from ibkd.distill.models import make_tiny_bert

WORDS = "man woman child dog cat horse plays guitar piano runs eats apple bread red blue car tree".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_bert(root / "teacher", num_layers=2, hidden_size=32)
    lines = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + i % 4)) for i in range(20)]
    (root / "corpus.txt").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    (root / "sts.csv").write_text("".join(f"g\tf\ty\t{i}\t{i % 6}.0\t{lines[i]}\t{lines[i + 1]}\n" for i in range(12)))
    return root


def _one_line_error(capsys, rc, needle):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ibkd: error:") and needle in err, err


def test_unknown_config_key(files, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("batch_size: 4\nlearnign_rate: 0.1\n")
    _one_line_error(capsys, main(["distill", "--config", str(tmp_path / "c.yaml")]), "unknown config key(s): learnign_rate")


def test_missing_files(files, tmp_path, capsys):
    _one_line_error(capsys, main(["distill", "--config", str(tmp_path / "nope.yaml")]), "config file not found")
    _one_line_error(capsys, main(["distill", "--teacher", str(files / "teacher"), "--student-layers", "0",
                                  "--corpus", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o")]),
                    "file not found")
    _one_line_error(capsys, main(["distill", "--teacher", str(tmp_path / "noteacher"), "--student-layers", "0",
                                  "--output", str(tmp_path / "o")]), "does not exist")


def test_bad_values(files, tmp_path, capsys):
    _one_line_error(capsys, main(["distill", "--amp", "fp8"]), "amp must be")
    _one_line_error(capsys, main(["distill", "--set", "nonsense"]), "KEY=VALUE")
    (tmp_path / "f.yaml").write_text("stage: finetune\n")
    _one_line_error(capsys, main(["distill", "--config", str(tmp_path / "f.yaml")]), "stage 'finetune'")


def test_corpus_smaller_than_a_batch(files, tmp_path, capsys):
    rc = main(["distill", "--teacher", str(files / "teacher"), "--student-layers", "0", "--corpus",
               str(files / "corpus.txt"), "--batch-size", "64", "--output", str(tmp_path / "o"), "--no-progress"])
    _one_line_error(capsys, rc, "fewer than one batch of 64")


def test_distill_then_finetune_then_eval(files, tmp_path, capsys):
    common = ["--max-length", "16", "--no-progress", "--dev", str(files / "sts.csv"), "--test", str(files / "sts.csv")]
    rc = main(["distill", "--teacher", str(files / "teacher"), "--student-layers", "0,1", "--corpus",
               str(files / "corpus.txt"), "--batch-size", "8", "--max-steps", "2", "--eval-steps", "1",
               "--output", str(tmp_path / "d"), "--seed", "1", *common])
    out = capsys.readouterr().out
    assert rc == 0 and "STS-B dev Spearman x100:" in out and "STS-B test Spearman x100:" in out
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["student"].endswith("best")
    (tmp_path / "triplets.csv").write_text("sent0,sent1,hard_neg\n" + "".join(
        f"{WORDS[i]} runs,{WORDS[i]} plays,{WORDS[i + 1]} eats\n" for i in range(8)))
    rc = main(["finetune", "--student", str(tmp_path / "d" / "final"), "--train-file", str(tmp_path / "triplets.csv"),
               "--batch-size", "4", "--max-steps", "2", "--output", str(tmp_path / "f"), *common])
    assert rc == 0 and "STS-B test Spearman" in capsys.readouterr().out
    rc = main(["eval", str(tmp_path / "f" / "final"), "--dev", str(files / "sts.csv"), "--test", str(files / "sts.csv")])
    out = capsys.readouterr().out
    assert rc == 0 and "parameters" in out and out.count("Spearman") == 2


def test_cache_teacher_and_baseline_none(files, tmp_path, capsys):
    rc = main(["cache-teacher", "--teacher", str(files / "teacher"), "--corpus", str(files / "corpus.txt"),
               "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "20 rows, 1 empty skipped" in out and "20 x 32" in out
    rc = main(["distill", "--method", "none", "--teacher", str(files / "teacher"), "--student-layers", "0",
               "--corpus", str(files / "corpus.txt"), "--output", str(tmp_path / "n"), "--no-progress",
               "--dev", str(files / "sts.csv"), "--test", str(files / "sts.csv")])
    assert rc == 0 and "STS-B dev Spearman" in capsys.readouterr().out
    assert (tmp_path / "n" / "final" / "modules.json").exists()
