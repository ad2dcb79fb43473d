"""TrainConfig: parsing, the refusals before training (issue 11, "Nothing silent" #5), the checks that need
the machine (preflight) or the teacher (check_against_model), and the config a run writes."""

import dataclasses

import pytest
import torch

from ibkd.distill.config import (ALIASES, CONFIG_FILE, ConfigError, TrainConfig, field_parser, load_saved_config,
                                 write_resolved_config)
from ibkd.distill.preflight import check_against_model, check_device, preflight


@pytest.fixture
def data(tmp_path):
    """A data folder with the STS-B layout and a corpus, and a config pointing at it."""
    sts = tmp_path / "data" / "sts" / "stsbenchmark"
    sts.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (sts / f"sts-{split}.csv").write_text("g\tf\ty\t0\t1.0\ta man\ta woman\n")
    (tmp_path / "data" / "wiki").mkdir()
    (tmp_path / "data" / "wiki" / "wiki_sentences.txt").write_text("a man\na woman\n")
    return tmp_path / "data"


def test_every_field_has_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help", "").strip(), f.name


def test_old_names_give_the_same_config():
    old = {"output": "o", "lr": 0.5, "batch_size": 8, "epochs": 2.0, "grad_accum": 3, "eval_batch_size": 4,
           "log_every": 5, "hsic_normalize": False, "resume_from_checkpoint": True}
    new = {ALIASES[k]: v for k, v in old.items()}
    assert TrainConfig.from_dict(old) == TrainConfig.from_dict(new)
    with pytest.raises(ConfigError, match="lr is the old name of learning_rate"):
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.2})


def test_text_values_are_parsed_like_flags():
    # PyYAML reads 1e-4 as text; "0, 5" is the YAML spelling of two layers
    cfg = TrainConfig.from_dict({"learning_rate": "1e-4", "student_layers": "0, 5", "beta": "auto", "gamma": "0.5",
                                 "max_steps": "3", "no_eval": "true", "hsic_layer": "penultimate",
                                 "allow_config_change": "learning_rate, seed", "corpus_limit": "none"})
    assert cfg.learning_rate == 1e-4 and cfg.student_layers == "0,5" and cfg.student_layer_list() == [0, 5]
    assert (cfg.beta, cfg.gamma, cfg.max_steps, cfg.no_eval) == ("auto", 0.5, 3, True)
    assert cfg.hsic_layer == "penultimate" and cfg.allow_config_change == ["learning_rate", "seed"]
    assert cfg.corpus_limit is None
    assert field_parser("student_layers")("none") is None and field_parser("beta")("0.2") == 0.2


@pytest.mark.parametrize("values, message", [
    ({"max_steps": 0}, "max_steps must be a positive integer, got 0"),
    ({"max_steps": -5}, "max_steps must be a positive integer, got -5"),
    ({"max_steps": "ten"}, "max_steps: expected an integer, got 'ten'"),
    ({"learning_rate": "fast"}, "learning_rate: expected a number, got 'fast'"),
    ({"beta": "big"}, "beta: expected a number or 'auto', got 'big'"),
    ({"gamma": -1.0}, "gamma must be a positive number or 'median'"),
    ({"student_layers": "0,0"}, "repeats layer(s) 0"),
    ({"student_layers": [1, 3, 1]}, "repeats layer(s) 1"),
    ({"student_layers": "-1,2"}, "numbered from 0"),
    ({"student_layers": "0,x"}, "expected comma-separated layer numbers"),
    ({"num_threads": -1}, "num_threads must be a positive integer, got -1"),
    ({"num_threads": 0}, "num_threads must be a positive integer, got 0"),
    ({"device": "gpu"}, "device must be cpu, cuda, cuda:N or auto, got 'gpu'"),
    ({"eval_steps": 0}, "eval_steps must be a positive integer"),
    ({"corpus_limit": -3}, "corpus_limit must be a positive integer"),
    ({"length_chunk_size": -1}, "length_chunk_size must be an integer >= 0, got -1"),
    ({"warmup_ratio": 1.5}, "warmup_ratio must be in [0, 1)"),
    ({"resume": "maybe"}, "resume: expected true or false, got 'maybe'"),
    ({"student": "s", "student_layers": "0"}, "give one of student, student_layers, fresh_student"),
    ({"allow_config_change": ["learnign_rate"]}, "unknown field(s) learnign_rate"),
    ({"resume": True, "overwrite_output_dir": True}, "not both"),
])
def test_refused_values(values, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(values)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_device_checks():
    check_device("cpu")
    check_device("auto")
    with pytest.raises(ConfigError, match="must be cpu, cuda, cuda:N or auto"):
        check_device("cuda0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
            check_device("cuda")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            preflight(TrainConfig(device="cuda:1", no_eval=True, method="none"))
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_preflight_missing_dev_and_test(data):
    cfg = TrainConfig.from_dict({"data_dir": str(data)})
    found = preflight(cfg)
    assert found["dev"] == str(data / "sts" / "stsbenchmark" / "sts-dev.csv") and "corpus" in found
    (data / "sts" / "stsbenchmark" / "sts-test.csv").unlink()
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    message = str(info.value)
    assert message.startswith("test file not found: ") and "(--test, under --data_dir / $IBKD_DATA_DIR" in message
    assert "pass --no_eval to train without evaluation" in message
    preflight(TrainConfig.from_dict({"data_dir": str(data), "no_eval": True}))  # then they need not exist
    with pytest.raises(ConfigError, match=r"dev file not found: .*nope.csv \(--dev; pass --no_eval"):
        preflight(TrainConfig.from_dict({"data_dir": str(data), "dev": str(data / "nope.csv")}))


def test_preflight_inputs(data, tmp_path):
    with pytest.raises(ConfigError, match=r"corpus file not found: .*missing.txt \(--corpus\)"):
        preflight(TrainConfig.from_dict({"data_dir": str(data), "corpus": str(tmp_path / "missing.txt")}))
    with pytest.raises(ConfigError, match="data folder not found: .*nowhere .--data_dir or .IBKD_DATA_DIR"):
        preflight(TrainConfig.from_dict({"data_dir": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="needs the data folder: pass --data_dir or set .IBKD_DATA_DIR"):
        preflight(TrainConfig(data_dir=None))
    with pytest.raises(ConfigError, match="stage finetune needs --train_file"):
        preflight(TrainConfig.from_dict({"data_dir": str(data), "stage": "finetune", "student": "s"}))
    with pytest.raises(ConfigError, match=r"extra_stsb_sentences file not found: .*sts-nope.csv"):
        preflight(TrainConfig.from_dict({"data_dir": str(data),
                                         "extra_stsb_sentences": "{data_dir}/sts/stsbenchmark/sts-nope.csv"}))
    # a datasets corpus is not a file; method none reads no corpus
    preflight(TrainConfig.from_dict({"data_dir": str(data), "corpus": "hf:some/dataset"}))
    preflight(TrainConfig.from_dict({"data_dir": str(data), "method": "none", "corpus": str(tmp_path / "x")}))


def test_check_against_model():
    cfg = TrainConfig.from_dict({"student_layers": "0,5", "max_length": 128})
    check_against_model(cfg, num_layers=6, max_positions=512)
    with pytest.raises(ConfigError, match=r"layer\(s\) 5 out of range, the teacher has 2 layers \(0-1\)"):
        check_against_model(cfg, num_layers=2, max_positions=512)
    with pytest.raises(ConfigError, match="max_length 128 is beyond the model's 64 position embeddings"):
        check_against_model(cfg, num_layers=6, max_positions=64)
    check_against_model(cfg, num_layers=6, max_positions=None)  # a model without a position limit
    deep = TrainConfig.from_dict({"student_layers": "0,5", "hsic_layer": 3})
    with pytest.raises(ConfigError, match="hsic_layer 3 out of range for a 2-layer student"):
        check_against_model(deep, num_layers=6, max_positions=512, student_num_layers=2)


def test_resolved_config_round_trip(tmp_path):
    cfg = TrainConfig.from_dict({"lr": 3e-4, "student_layers": "0,5", "beta": "auto", "fresh_student": None,
                                 "allow_config_change": ["seed"], "output": str(tmp_path), "data_dir": "/d"})
    path = write_resolved_config(cfg, tmp_path)
    assert path == tmp_path / CONFIG_FILE and "learning_rate: 0.0003" in path.read_text()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    saved = load_saved_config(tmp_path)
    assert TrainConfig.from_dict(saved) == cfg
    assert load_saved_config(tmp_path / "elsewhere") is None
    (tmp_path / CONFIG_FILE).write_text("- a list\n")
    with pytest.raises(ConfigError, match="a config must be a mapping"):
        load_saved_config(tmp_path)


def test_bf16_on_a_cpu_without_native_bf16_is_said_not_refused(monkeypatch, caplog):
    from ibkd.distill import preflight as pre

    monkeypatch.setattr(pre, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="ibkd.distill"):
        pre.check_amp("bf16", "cpu")
    assert "slower than --amp off" in caplog.text
    caplog.clear()
    monkeypatch.setattr(pre, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="ibkd.distill"):
        pre.check_amp("bf16", "cpu")
        pre.check_amp("off", "cpu")
    assert caplog.text == ""


def test_amp_auto_takes_bf16_only_where_the_hardware_computes_it(monkeypatch):
    from ibkd.distill import preflight as pre
    from ibkd.distill.config import TrainConfig
    from ibkd.distill.trainer import training_arguments

    monkeypatch.setattr(pre, "cpu_has_native_bf16", lambda: False)
    assert pre.resolve_amp("auto", "cpu") == "off"
    assert pre.resolve_amp("bf16", "cpu") == "bf16" and pre.resolve_amp("off", "cpu") == "off"
    args = training_arguments(TrainConfig(amp="auto", max_steps=1, eval_steps=1, save_steps=1), "cpu", evaluate=False)
    assert args.bf16 is False and args.fp16 is False
    monkeypatch.setattr(pre, "cpu_has_native_bf16", lambda: True)
    assert pre.resolve_amp("auto", "cpu") == "bf16"
    args = training_arguments(TrainConfig(amp="auto", max_steps=1, eval_steps=1, save_steps=1), "cpu", evaluate=False)
    assert args.bf16 is True
