"""The ``ibkd`` command: flags generated from TrainConfig, old names as aliases, one-line refusals before any
model is loaded, and (two tiny runs) the wiring to the trainer."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibkd.cli import build_parser, main
from ibkd.distill.cli import CACHE_TEACHER_FIELDS, TRAIN_FIELDS, build_config
from ibkd.distill.config import TrainConfig
from ibkd.distill.models import make_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
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


def config_of(argv) -> TrainConfig:
    return build_config(build_parser(argv[0]).parse_args(argv))


# -- help and flags ---------------------------------------------------------------------------------------

def _help(capsys, command) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def _help_entries(text: str) -> dict:
    """``--flag`` -> its help text, from argparse's help layout (an entry starts at two spaces + ``--``)."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (--\S+)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2) or ""
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_distill_help_shows_every_field_with_help_and_default(capsys):
    entries = _help_entries(_help(capsys, "distill"))
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":  # the command is the stage
            continue
        text = entries.get(f"--{f.name}")
        assert text is not None, f"--{f.name} missing from --help"
        assert text.strip() and not text.startswith("("), (f.name, text)  # its help, then its default
        assert "default" in text and ("(default: " in text or f.default is None), (f.name, text)
    assert set(TRAIN_FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)} - {"stage"}
    assert "also --lr" in entries["--learning_rate"] and "--no_progress for false" in entries["--progress"]
    assert "--learning-rate" not in entries and "--lr" not in entries  # other spellings: accepted, not listed


def test_cache_teacher_lists_only_its_flags(capsys):
    text = _help(capsys, "cache-teacher")
    assert "--learning_rate" not in text and "--max_steps" not in text and "--student_layers" not in text
    for name in CACHE_TEACHER_FIELDS:
        assert f"--{name}" in text, name
    _one_line_error(capsys, main(["cache-teacher", "--learning_rate", "1"]), "unrecognized arguments: --learning_rate")
    _one_line_error(capsys, main(["cache-teacher", "--set", "learning_rate=1"]), "cache-teacher has no setting")


def test_old_names_and_dashes_give_the_hf_config():
    hf = config_of(["distill", "--output_dir", "o", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8",
                    "--num_train_epochs", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3",
                    "--warmup_ratio", "0.2", "--seed", "7", "--report_to", "tensorboard", "--data_dir", "/d",
                    "--resume", "--progress", "false"])
    old = config_of(["distill", "--output", "o", "--lr", "1e-3", "--batch-size", "8", "--epochs", "2",
                     "--grad-accum", "2", "--max-steps", "3", "--warmup-ratio", "0.2", "--seed", "7",
                     "--report-to", "tensorboard", "--data-dir", "/d", "--resume_from_checkpoint", "--no-progress"])
    assert hf == old
    assert (hf.output_dir, hf.learning_rate, hf.per_device_train_batch_size, hf.max_steps, hf.progress) == \
        ("o", 1e-3, 8, 3, False)


def test_value_kinds():
    cfg = config_of(["distill", "--beta", "auto", "--gamma", "median", "--student_layers", "0,5", "--hsic_layer",
                     "penultimate", "--normalize", "false", "--no_eval", "--max_grad_norm", "1.5",
                     "--fresh_student", "none", "--allow_config_change", "seed,learning_rate", "--corpus_limit", "10"])
    assert (cfg.beta, cfg.gamma, cfg.student_layers, cfg.hsic_layer) == ("auto", "median", "0,5", "penultimate")
    assert cfg.normalize is False and cfg.no_eval is True and cfg.max_grad_norm == 1.5 and cfg.corpus_limit == 10
    assert cfg.allow_config_change == ["seed", "learning_rate"]
    assert config_of(["distill", "--beta", "0.3", "--hsic_layer", "2"]).beta == 0.3
    assert config_of(["distill", "--no_eval", "false"]).no_eval is False


def test_precedence_default_yaml_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 2.0e-5\nbatch_size: 32\nmax_steps: 10\nextra_stsb_sentences: x.csv\n")
    cfg = config_of(["distill", "--config", str(tmp_path / "c.yaml"), "--batch-size", "16", "--set",
                     "extra_stsb_sentences=null", "--corpus_limit", "none"])
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.max_steps) == (2e-5, 16, 10)
    assert cfg.extra_stsb_sentences is None and cfg.warmup_ratio == TrainConfig.warmup_ratio
    shipped = config_of(["distill", "--config", "main-minilm-2layer", "--max-steps", "2"])
    assert shipped.student_layers == "1,5" and shipped.max_steps == 2


def test_two_spellings_of_one_field_are_refused(capsys):
    _one_line_error(capsys, main(["distill", "--lr", "1e-3", "--learning_rate", "2e-3"]),
                    "--lr and --learning_rate both set learning_rate")
    _one_line_error(capsys, main(["distill", "--max_steps", "2", "--max-steps", "3"]), "both set max_steps")
    _one_line_error(capsys, main(["distill", "--progress", "--no-progress"]), "both set progress")
    _one_line_error(capsys, main(["distill", "--batch-size", "8", "--set", "per_device_train_batch_size=4"]),
                    "both set per_device_train_batch_size")


# -- refused before training, one line each -------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--max_steps", "0"], "max_steps must be a positive integer, got 0"),
    (["--max-steps", "-3"], "max_steps must be a positive integer, got -3"),
    (["--student_layers", "0,0"], "repeats layer(s) 0"),
    (["--max_steps", "ten"], "argument --max_steps: expected an integer, got 'ten'"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--beta", "big"], "argument --beta: expected a number or 'auto', got 'big'"),
    (["--set", "max_steps=ten"], "max_steps: expected an integer, got 'ten'"),
    (["--num_threads", "-1"], "num_threads must be a positive integer, got -1"),
    (["--device", "gpu"], "device must be cpu, cuda, cuda:N or auto, got 'gpu'"),
    (["--amp", "fp8"], "amp must be one of auto, bf16, fp16, off"),
    (["--set", "nonsense"], "KEY=VALUE"),
    (["--learnign_rate", "1"], "unrecognized arguments: --learnign_rate"),
])
def test_refused_flags(capsys, argv, needle):
    _one_line_error(capsys, main(["distill", *argv]), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys):
    _one_line_error(capsys, main(["distill", "--device", "cuda"]), "--device cuda: CUDA is not available")


def test_missing_files(files, tmp_path, capsys):
    _one_line_error(capsys, main(["distill", "--config", str(tmp_path / "nope.yaml")]), "config file not found")
    _one_line_error(capsys, main(["distill", "--teacher", str(files / "teacher"), "--student-layers", "0",
                                  "--corpus", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o")]),
                    "corpus file not found")
    _one_line_error(capsys, main(["distill", "--teacher", str(files / "teacher"), "--student_layers", "0",
                                  "--corpus", str(files / "corpus.txt"), "--dev", str(tmp_path / "dev.csv")]),
                    "dev file not found: %s (--dev; pass --no_eval" % (tmp_path / "dev.csv"))
    _one_line_error(capsys, main(["distill", "--corpus", str(files / "corpus.txt"), "--data_dir",
                                  str(tmp_path / "nodata")]), "data folder not found")
    assert not (tmp_path / "o").exists()


def test_config_errors(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("batch_size: 4\nlearnign_rate: 0.1\n")
    _one_line_error(capsys, main(["distill", "--config", str(tmp_path / "c.yaml")]),
                    "unknown config key(s): learnign_rate")
    (tmp_path / "f.yaml").write_text("stage: finetune\n")
    _one_line_error(capsys, main(["distill", "--config", str(tmp_path / "f.yaml")]), "stage 'finetune'")
    (tmp_path / "both.yaml").write_text("lr: 0.1\nlearning_rate: 0.2\n")
    _one_line_error(capsys, main(["distill", "--config", str(tmp_path / "both.yaml")]), "old name of learning_rate")


def test_eval_errors(files, tmp_path, capsys, monkeypatch):
    _one_line_error(capsys, main(["eval", "m", "--data_dir", str(tmp_path / "nodata")]),
                    "data folder not found: %s (--data_dir or $IBKD_DATA_DIR)" % (tmp_path / "nodata"))
    _one_line_error(capsys, main(["eval", "m", "--data-dir", str(tmp_path)]), "STS-B dev file not found")
    _one_line_error(capsys, main(["eval", "m", "--dev", str(files / "sts.csv"), "--test", str(tmp_path / "t.csv")]),
                    "STS-B test file not found: %s (--test)" % (tmp_path / "t.csv"))
    monkeypatch.delenv("IBKD_DATA_DIR")
    _one_line_error(capsys, main(["eval", "m"]), "--data_dir or $IBKD_DATA_DIR")


# -- the command as a user runs it --------------------------------------------------------------------------

def _ibkd(*argv, **env):
    return subprocess.run([sys.executable, "-m", "ibkd", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)


def test_python_m_ibkd():
    out = _ibkd("distill", "--help")
    assert out.returncode == 0 and "--per_device_train_batch_size" in out.stdout
    out = _ibkd("distill", "--max_steps", "0", "--no-progress")
    assert out.returncode == 2 and out.stderr.strip() == "ibkd: error: max_steps must be a positive integer, got 0"
    out = _ibkd("distill", "--max_steps", "0", IBKD_TRACEBACK="1")  # the traceback, for debugging
    assert out.returncode == 1 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_layers_the_application_never_imports_the_experiments():
    code = ("import sys, io, contextlib; import ibkd.distill.cli; from ibkd.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): assert main(['distill', '--help']) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith('ibkd.experiments')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# -- two tiny runs through the trainer ------------------------------------------------------------------

def test_distill_then_finetune_then_eval(files, tmp_path, capsys):
    common = ["--max-length", "16", "--no-progress", "--dev", str(files / "sts.csv"), "--test", str(files / "sts.csv")]
    rc = main(["distill", "--teacher", str(files / "teacher"), "--student_layers", "0,1", "--corpus",
               str(files / "corpus.txt"), "--per_device_train_batch_size", "8", "--max_steps", "2", "--eval-steps",
               "1", "--output", str(tmp_path / "d"), "--seed", "1", *common])
    out = capsys.readouterr().out
    assert rc == 0 and "STS-B dev Spearman x100:" in out and "STS-B test Spearman x100:" in out
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["steps"] == 2
    (tmp_path / "triplets.csv").write_text("sent0,sent1,hard_neg\n" + "".join(
        f"{WORDS[i]} runs,{WORDS[i]} plays,{WORDS[i + 1]} eats\n" for i in range(8)))
    rc = main(["finetune", "--student", str(tmp_path / "d" / "final"), "--train-file", str(tmp_path / "triplets.csv"),
               "--batch-size", "4", "--max-steps", "2", "--output_dir", str(tmp_path / "f"), *common])
    assert rc == 0 and "STS-B test Spearman" in capsys.readouterr().out
    sts = str(files / "sts.csv")
    rc = main(["eval", str(tmp_path / "f" / "final"), "--dev", sts, "--test", sts])
    out = capsys.readouterr().out
    assert rc == 0 and "parameters" in out and out.count("Spearman") == 2


def test_cache_teacher(files, tmp_path, capsys):
    rc = main(["cache-teacher", "--teacher", str(files / "teacher"), "--corpus", str(files / "corpus.txt"),
               "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "20 rows, 1 empty skipped" in out and "20 x 32" in out
