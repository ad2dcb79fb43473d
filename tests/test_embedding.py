"""Embedding distillation by encoding (ibkd.distill.embedding_table) and the table experiment
(ibkd.experiments.embedding): tiny tables, a tiny random BERT tokenizer and tiny
STS-format files written here (never the shared data or the real teacher)."""

from __future__ import annotations

import argparse
import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ibkd.distill.embedding_table import EncodingDistiller, load_small_table, save_small_table
from ibkd.experiments.embedding import (
    DirectEmbedding,
    EmbeddingTaskConfig,
    TaskHead,
    add_arguments,
    evaluate_small_table,
    mean_pool_ids,
    render_markdown,
    run_cli,
    select_learning_rate,
    tokenize_pairs,
    train_sts_embedding,
)
from ibkd.experiments.embedding.model import DirectArm, pair_cosines
from ibkd.distill.models import make_tiny_bert

D_BIG = 24  # differs from every other width used here, so a tensor with D_BIG columns can only come from E
GROUPS = ("man woman child dog cat horse people group", "car road street city house park river sea")
FAST = dict(epochs=6, batch_size=8, task_hidden=12, max_length=16)


def _toy_pairs(seed: int, count: int) -> list[tuple[str, str, float]]:
    """Two word groups; a pair scores 5 when both sentences come from the same group, else 0. The two
    sentences of a pair never share a word, so the untrained mean-pooled cosine carries no signal."""
    rng = random.Random(seed)
    groups = [g.split() for g in GROUPS]
    pairs = []
    for i in range(count):
        g1 = rng.randrange(2)
        g2 = g1 if i % 2 == 0 else 1 - g1
        words1 = rng.sample(groups[g1], 3)
        words2 = rng.sample([w for w in groups[g2] if w not in words1], 3)
        pairs.append((" ".join(words1), " ".join(words2), 5.0 if g1 == g2 else 0.0))
    return pairs


def _write_sts(path, pairs) -> str:
    path.write_text("".join(f"genre\tfile\t2020\t{i}\t{score}\t{a}\t{b}\n" for i, (a, b, score) in enumerate(pairs)))
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding")
    teacher = make_tiny_bert(root / "teacher", hidden_size=D_BIG, num_layers=1, num_heads=2, intermediate_size=16)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    test_pairs = _toy_pairs(2, 24)
    shuffled = [p[:2] for p in test_pairs]
    scores = [p[2] for p in test_pairs]
    random.Random(5).shuffle(scores)
    paths = {
        "train": _write_sts(root / "train.csv", _toy_pairs(0, 64)),
        "dev": _write_sts(root / "dev.csv", _toy_pairs(1, 24)),
        "test": _write_sts(root / "test.csv", test_pairs),
        "test_shuffled": _write_sts(root / "test_shuffled.csv", [(a, b, s) for (a, b), s in zip(shuffled, scores)]),
    }
    generator = torch.Generator().manual_seed(0)
    big_table = torch.randn(len(tokenizer), D_BIG, generator=generator) * 0.3
    return dict(root=root, teacher=str(teacher), tokenizer=tokenizer, big_table=big_table, **paths)


# -- the encoder and the baseline ------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
def test_distiller_shapes_and_formula(activation):
    torch.manual_seed(0)
    big = torch.randn(11, D_BIG)
    distiller = EncodingDistiller(big, 5, activation=activation)
    ids = torch.tensor([[0, 3, 10], [3, 3, 1]])
    out = distiller(ids)
    assert out.shape == (2, 3, 5) and distiller.d_small == 5
    act = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda x: x}[activation]
    w, b = distiller.encoder.weight.double(), distiller.encoder.bias.double()
    expected = act(big.double()[ids] @ w.T + b)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 4096])
def test_precompute_equals_encoder_applied_row_by_row(chunk_rows):
    torch.manual_seed(1)
    big = torch.randn(10, D_BIG)
    distiller = EncodingDistiller(big, 7)
    table = distiller.precompute(chunk_rows=chunk_rows)
    assert table.shape == (10, 7) and table.dtype == torch.float32 and not table.requires_grad
    row_by_row = torch.stack([distiller(torch.tensor(i)) for i in range(10)]).detach()
    torch.testing.assert_close(table, row_by_row)
    torch.testing.assert_close(distiller.table(), table)


def test_big_table_is_a_frozen_buffer():
    big = torch.randn(9, D_BIG)
    distiller = EncodingDistiller(big, 4)
    names = {name for name, _ in distiller.named_parameters()}
    assert names == {"encoder.weight", "encoder.bias"}
    assert not distiller.big_table.requires_grad
    assert "big_table" not in distiller.state_dict()  # never saved with the encoder either
    distiller(torch.tensor([1, 2, 2])).sum().backward()
    assert distiller.big_table.grad is None and distiller.encoder.weight.grad is not None
    optimizer = torch.optim.Adam(distiller.parameters())
    assert all(p is not distiller.big_table for group in optimizer.param_groups for p in group["params"])


def test_direct_embedding_is_random_normal():
    torch.manual_seed(0)
    direct = DirectEmbedding(4000, 16)
    table = direct.table()
    assert table.shape == (4000, 16) and direct.d_small == 16
    assert isinstance(direct.embedding, torch.nn.Embedding) and direct.embedding.weight.requires_grad
    assert abs(table.std().item() - 16 ** -0.5) < 0.01 and abs(table.mean().item()) < 0.01
    assert DirectEmbedding(10, 4, init_std=2.0).init_std == 2.0


def test_direct_arm_trains_like_the_full_table():
    """The direct arm trains a copy of the training words' rows only; under Adam this must equal training
    the whole table (rows that never get a gradient never move)."""
    torch.manual_seed(3)
    vocab, d = 30, 6
    full = DirectEmbedding(vocab, d)
    compact = DirectArm(copy.deepcopy(full), torch.tensor([2, 5, 7, 8, 11, 20]))
    head_full = TaskHead(d, 5)
    head_compact = copy.deepcopy(head_full)

    class FullArm(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def embed(self, ids):
            return self.module(ids)

    full_arm = FullArm(full)
    opt_full = torch.optim.Adam(list(full.parameters()) + list(head_full.parameters()), lr=0.05)
    opt_compact = torch.optim.Adam([compact.rows] + list(head_compact.parameters()), lr=0.05)
    batches = [torch.tensor([[2, 5, 0], [7, 8, 11], [20, 2, 0], [5, 11, 8]]),
               torch.tensor([[8, 8, 0], [2, 0, 0], [11, 20, 7], [5, 0, 0]])]
    for step in range(6):
        ids = batches[step % 2]
        mask = ids != 0
        target = torch.tensor([0.9, 0.1])
        for arm, head, opt in ((full_arm, head_full, opt_full), (compact, head_compact, opt_compact)):
            loss = F.mse_loss(pair_cosines(arm, head, ids, mask), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(compact.final_table(), full.table())
    untouched = [i for i in range(vocab) if i not in (2, 5, 7, 8, 11, 20)]
    assert torch.equal(compact.final_table()[untouched], compact.direct.table()[untouched])


# -- pooling and tokenization ----------------------------------------------------------------------------------
def test_mean_pool_ids_matches_a_loop():
    table = torch.randn(12, 3)
    ids = torch.tensor([[1, 4, 4, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False, False, False, False]])
    pooled = mean_pool_ids(lambda u: table[u], ids, mask)
    torch.testing.assert_close(pooled[0], (table[1] + 2 * table[4]) / 3)
    torch.testing.assert_close(pooled[1], table[7])
    assert torch.equal(pooled[2], torch.zeros(3))


def test_tokenize_pairs_masks_special_tokens(toy):
    split = tokenize_pairs(toy["tokenizer"], toy["dev"], max_length=16)
    tok = toy["tokenizer"]
    assert split.ids.shape[0] == 2 * len(split) == 48
    real = split.ids[split.mask]
    for special in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id):
        assert not (real == special).any()
    assert (split.mask.sum(1) == 3).all()  # three words per toy sentence


# -- training ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["distilled", "direct"])
def test_training_learns_the_toy_task(toy, method):
    big_before = toy["big_table"].clone()
    cfg = EmbeddingTaskConfig(d_small=8, method=method, lr=0.03, seed=0, **FAST)
    result = train_sts_embedding(toy["tokenizer"], toy["big_table"], toy["train"], toy["dev"], toy["test"], cfg)
    assert result["method"] == method and result["d_small"] == 8 and result["seed"] == 0
    assert result["table"].shape == (len(toy["tokenizer"]), 8)
    assert 1 <= result["best_epoch"] <= FAST["epochs"] and len(result["dev_curve"]) == FAST["epochs"]
    assert result["dev_spearman"] == max(result["dev_curve"])
    # the best possible score on this toy set is 86.7 (binary gold with ties); untrained runs score -36..65
    assert result["dev_spearman"] > max(result["init_dev_spearman"] + 10, 80) and result["test_spearman"] > 70
    assert torch.equal(toy["big_table"], big_before)  # E is read, never written


def test_distilled_table_is_the_encoding_of_E(toy):
    cfg = EmbeddingTaskConfig(d_small=6, method="distilled", lr=0.03, **FAST)
    result = train_sts_embedding(toy["tokenizer"], toy["big_table"], toy["train"], toy["dev"], toy["test"], cfg)
    # the returned table has a row for every word, including words the task never saw: f(E W + b)
    unseen = toy["tokenizer"].convert_tokens_to_ids(["apple", "snow", "letter"])
    assert result["table"][unseen].abs().sum() > 0


def test_selection_never_looks_at_test(toy):
    cfg = EmbeddingTaskConfig(d_small=8, method="direct", lr=0.03, seed=1, **FAST)
    runs = [train_sts_embedding(toy["tokenizer"], toy["big_table"], toy["train"], toy["dev"], toy[name], cfg)
            for name in ("test", "test_shuffled")]
    assert runs[0]["best_epoch"] == runs[1]["best_epoch"]
    assert runs[0]["dev_curve"] == runs[1]["dev_curve"]
    assert torch.equal(runs[0]["table"], runs[1]["table"])
    assert runs[0]["test_spearman"] != runs[1]["test_spearman"]


def test_learning_rate_chosen_on_dev(toy):
    cfg = EmbeddingTaskConfig(d_small=8, method="distilled", **FAST)
    best = select_learning_rate(toy["tokenizer"], toy["big_table"], toy["train"], toy["dev"], toy["test"], cfg,
                                lr_grid=(1e-4, 0.03))
    assert set(best["dev_by_lr"]) == {repr(1e-4), repr(0.03)}
    assert best["dev_spearman"] == max(best["dev_by_lr"].values())
    assert best["lr"] == {v: float(k) for k, v in best["dev_by_lr"].items()}[best["dev_spearman"]]


def test_teacher_soft_targets(toy):
    cfg = EmbeddingTaskConfig(d_small=8, method="distilled", lr=0.03, teacher_weight=0.5, **FAST)
    result = train_sts_embedding(toy["tokenizer"], toy["big_table"], toy["train"], toy["dev"], toy["test"], cfg)
    assert result["teacher_weight"] == 0.5 and result["dev_spearman"] > result["init_dev_spearman"]


def test_same_seed_same_result(toy):
    cfg = EmbeddingTaskConfig(d_small=4, method="distilled", lr=0.01, epochs=2, batch_size=8, task_hidden=5)
    a, b = (train_sts_embedding(toy["tokenizer"], toy["big_table"], toy["train"], toy["dev"], toy["test"], cfg)
            for _ in range(2))
    assert torch.equal(a["table"], b["table"]) and a["dev_curve"] == b["dev_curve"]


# -- the exported folder -------------------------------------------------------------------------------------------
def _trained(toy, method="distilled"):
    cfg = EmbeddingTaskConfig(d_small=8, method=method, lr=0.03, **FAST)
    return cfg, train_sts_embedding(toy["tokenizer"], toy["big_table"], toy["train"], toy["dev"], toy["test"], cfg)


def test_save_load_round_trip(toy, tmp_path):
    cfg, result = _trained(toy)
    meta = {"activation": "tanh", "method": "distilled", "teacher": "tiny", "dev_spearman": result["dev_spearman"],
            "test_spearman": result["test_spearman"], "max_length": cfg.max_length, "nan": float("nan")}
    save_small_table(tmp_path / "t", result["table"], toy["tokenizer"], meta, task_head=result["task_head"])
    table, loaded = load_small_table(tmp_path / "t")
    assert torch.equal(table, result["table"])
    assert loaded["d_small"] == 8 and loaded["vocab_size"] == len(toy["tokenizer"]) and loaded["teacher"] == "tiny"
    assert loaded["dev_spearman"] == result["dev_spearman"] and loaded["nan"] is None
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert tokenizer.get_vocab() == toy["tokenizer"].get_vocab()
    # the folder alone reproduces the reported scores
    assert evaluate_small_table(tmp_path / "t", toy["dev"]) == pytest.approx(result["dev_spearman"], abs=1e-3)
    assert evaluate_small_table(tmp_path / "t", toy["test"]) == pytest.approx(result["test_spearman"], abs=1e-3)


def test_exported_folder_holds_nothing_of_E_or_the_encoder(toy, tmp_path):
    _, result = _trained(toy)
    save_small_table(tmp_path / "t", result["table"], toy["tokenizer"], {"method": "distilled"},
                     task_head=result["task_head"])
    tensors = {}
    for file in (tmp_path / "t").glob("*.safetensors"):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    assert set(tensors) == {"table.safetensors:weight", "task_head.safetensors:proj.weight",
                            "task_head.safetensors:proj.bias"}
    assert all(D_BIG not in t.shape for t in tensors.values())
    assert not list((tmp_path / "t").glob("*.bin")) and not list((tmp_path / "t").glob("*.pt"))
    config = json.loads((tmp_path / "t" / "embedding_config.json").read_text())
    assert not any(isinstance(v, list) for v in config.values())


def test_save_rejects_bad_tables(toy, tmp_path):
    with pytest.raises(ValueError, match="table"):
        save_small_table(tmp_path / "x", torch.zeros(5), toy["tokenizer"], {})
    with pytest.raises(ValueError, match="tokenizer"):
        save_small_table(tmp_path / "x", torch.zeros(3, 4), toy["tokenizer"], {})
    with pytest.raises(FileNotFoundError, match="folder"):
        load_small_table(tmp_path / "missing")


# -- bad inputs --------------------------------------------------------------------------------------------------
def test_bad_arguments(toy, tmp_path):
    big = torch.randn(5, D_BIG)
    with pytest.raises(ValueError, match="d_small"):
        EncodingDistiller(big, 0)
    with pytest.raises(ValueError, match="activation"):
        EncodingDistiller(big, 4, activation="swish")
    with pytest.raises(ValueError, match="big_table"):
        EncodingDistiller(torch.randn(5), 4)
    with pytest.raises(ValueError, match="method"):
        EmbeddingTaskConfig(method="pca").validate()
    with pytest.raises(ValueError, match="batch_size"):
        EmbeddingTaskConfig(batch_size=1).validate()
    with pytest.raises(ValueError, match="unknown"):
        EmbeddingTaskConfig.from_dict({"d_smal": 3})
    cfg = EmbeddingTaskConfig(d_small=4, **FAST)
    with pytest.raises(FileNotFoundError, match="dev_path"):
        train_sts_embedding(toy["tokenizer"], toy["big_table"], toy["train"], tmp_path / "nope.csv", toy["test"], cfg)
    with pytest.raises(ValueError, match="rows"):
        train_sts_embedding(toy["tokenizer"], big, toy["train"], toy["dev"], toy["test"], cfg)


# -- command line ------------------------------------------------------------------------------------------------
def _cli(argv) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def _data_flags(toy):
    return ["--teacher", toy["teacher"], "--train", toy["train"], "--dev", toy["dev"], "--test", toy["test"],
            "--epochs", "3", "--batch-size", "8", "--task-hidden", "12", "--max-length", "16"]


def test_cli_single_run(toy, tmp_path, capsys):
    rc = _cli([*_data_flags(toy), "--dim", "6", "--method", "direct", "--lr-grid", "0.01,0.03",
               "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    dev = float(out.split("STS-B dev Spearman x100: ")[1].split()[0])
    assert "STS-B test Spearman x100:" in out
    table, meta = load_small_table(tmp_path / "out")
    assert table.shape == (len(toy["tokenizer"]), 6) and meta["method"] == "direct" and meta["lr"] in (0.01, 0.03)
    assert meta["teacher"] == toy["teacher"] and set(meta["dev_by_lr"]) == {repr(0.01), repr(0.03)}
    assert evaluate_small_table(tmp_path / "out", toy["dev"]) == pytest.approx(dev, abs=0.01)


def test_cli_compare_writes_report(toy, tmp_path, capsys):
    report_path = tmp_path / "r" / "embedding.json"
    rc = _cli([*_data_flags(toy), "--compare", "--sizes", "4,6", "--seeds", "0", "--lr", "0.03",
               "--report", str(report_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads(report_path.read_text())
    assert len(report["rows"]) == 4 and {(r["d_small"], r["method"]) for r in report["rows"]} == {
        (4, "distilled"), (4, "direct"), (6, "distilled"), (6, "direct")}
    assert all(r["lr"] == 0.03 for r in report["rows"])
    assert {"torch", "cpu"} <= set(report["environment"]) and report["wall_seconds"] > 0
    assert report["settings"]["sizes"] == [4, 6] and report["settings"]["epochs"] == 3
    assert report["reference"]["d_big"] == D_BIG
    assert out.startswith(render_markdown(report).splitlines()[0])
    assert "| 4 |" in out and "| 6 |" in out and "frozen big table" in out


@pytest.mark.parametrize("argv, needle", [
    (["--dim", "0", "--output", "o"], "--dim must be a positive int"),
    (["--dim", "4", "--activation", "swish", "--output", "o"], "--activation must be one of"),
    (["--dim", "4", "--method", "pca", "--output", "o"], "--method must be one of"),
    (["--dim", "4"], "--output_dir is required"),
    (["--output", "o"], "--dim is required"),
])
def test_cli_bad_input_is_one_line(toy, tmp_path, capsys, argv, needle):
    rc = _cli([*_data_flags(toy), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("ibkd: error:") and needle in err, err


def test_cli_missing_files(toy, tmp_path, capsys):
    rc = _cli(["--teacher", toy["teacher"], "--dim", "4", "--output", str(tmp_path / "o"),
               "--data_dir", str(tmp_path / "nodata")])
    err = capsys.readouterr().err
    assert rc == 2 and "--data_dir" in err and "train" in err
    rc = _cli([*_data_flags(toy), "--dim", "4", "--output", str(tmp_path / "o"), "--dev", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "--dev" in err and "not found" in err
    rc = _cli(["--teacher", str(tmp_path / "noteacher"), "--dim", "4", "--output", str(tmp_path / "o"),
               "--train", toy["train"], "--dev", toy["dev"], "--test", toy["test"]])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
