"""The compact student: factorized word embeddings (small table + up-projection) under the teacher's layers."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ibkd.distill.compact import (FACTORIZED_KEYS, bert_parameter_count, build_compact_student,
                                 compact_student_from_config, factorize_student, load_compact_table,
                                 lstsq_up_projection, parameter_table, pca_compact_student, pca_table)
from ibkd.distill.compact_modeling import CompactBertConfig, CompactBertModel
from ibkd.distill.evaluation import count_parameters
from ibkd.distill.config import ConfigError, TrainConfig
from ibkd.distill.embedding_table import save_small_table
from ibkd.distill.models import Encoder, make_tiny_bert, subset_layers
from ibkd.distill.trainer import last_checkpoint, run

SENTS = ["a man plays the guitar", "the dog runs", "two people eat bread in the park .", "red"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", num_layers=3, hidden_size=32, dropout=0.0))


@pytest.fixture(scope="module")
def teacher(tiny):
    return Encoder.load(tiny).eval()


def random_table(vocab_size, d_small, seed=0):
    return torch.randn(vocab_size, d_small, generator=torch.Generator().manual_seed(seed))


def write_table_folder(folder, table, tokenizer=None, **meta):
    """A table folder written by ``ibkd.distill.embedding_table.save_small_table``."""
    return save_small_table(folder, table, tokenizer, {"method": "test", **meta})


def hand_token_states(teacher, student, layers, sentence):
    """One sentence (no padding, so no attention mask): the student's table and up-projection, then the
    teacher's own position/token-type embeddings, LayerNorm and layers, one by one."""
    batch = teacher.tokenize([sentence])
    ids, token_types = batch["input_ids"][0], batch["token_type_ids"][0]
    factorized = student.model.embeddings.word_embeddings
    emb = teacher.model.embeddings
    words = factorized.table.weight[ids] @ factorized.up.weight.T + factorized.up.bias
    h = words + emb.position_embeddings.weight[torch.arange(len(ids))] + emb.token_type_embeddings.weight[token_types]
    h = F.layer_norm(h, (h.shape[-1],), emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps).unsqueeze(0)
    for i in layers:
        out = teacher.model.encoder.layer[i](h)
        h = out[0] if isinstance(out, tuple) else out
    return h[0]


@pytest.mark.parametrize("layers", [[0, 2], [2, 0, 1]])
def test_forward_matches_hand_computation_token_by_token(teacher, layers):
    student = build_compact_student(teacher, layers, random_table(teacher.config.vocab_size, 8)).eval()
    assert isinstance(student.model, CompactBertModel) and student.num_layers == len(layers)
    batch = student.tokenize(SENTS)  # padded batch: the hand computation runs one sentence at a time
    with torch.no_grad():
        out = student.model(**batch).last_hidden_state
        pooled = student(batch)["embedding"]
        for row, sentence in enumerate(SENTS):
            expected = hand_token_states(teacher, student, layers, sentence)
            n = len(expected)
            assert int(batch["attention_mask"][row].sum()) == n
            for position in range(n):
                torch.testing.assert_close(out[row, position], expected[position], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(pooled[row], expected.mean(0), atol=2e-5, rtol=1e-5)


def test_lstsq_reproduces_the_word_embeddings_when_the_table_is_wide(teacher):
    vocab = teacher.config.vocab_size
    student = build_compact_student(teacher, [0, 2], random_table(vocab, vocab + 3)).eval()  # d_small >= V
    factorized = student.model.embeddings.word_embeddings
    ids = torch.arange(vocab)
    with torch.no_grad():
        torch.testing.assert_close(factorized(ids), teacher.model.embeddings.word_embeddings.weight, atol=1e-4, rtol=0)
        plain = subset_layers(teacher, [0, 2]).eval()  # so the compact student starts as the layer-subset student
        batch = student.tokenize(SENTS)
        torch.testing.assert_close(student(batch)["embedding"], plain(batch)["embedding"], atol=1e-4, rtol=1e-4)


def test_lstsq_recovers_a_low_rank_embedding_matrix(tiny):
    teacher = Encoder.load(tiny).eval()
    vocab, hidden, rank = teacher.config.vocab_size, teacher.dim, 5
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(vocab, rank, generator=gen, dtype=torch.float64)
    true_w, true_b = torch.randn(hidden, rank, generator=gen, dtype=torch.float64), torch.randn(hidden, generator=gen, dtype=torch.float64)
    low_rank = table @ true_w.T + true_b  # E of rank 5 (+ offset), exactly representable
    w, b = lstsq_up_projection(table, low_rank)
    torch.testing.assert_close(w.double(), true_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.double(), true_b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        teacher.model.embeddings.word_embeddings.weight.copy_(low_rank)
    student = build_compact_student(teacher, [1], table.float()).eval()
    factorized = student.model.embeddings.word_embeddings
    torch.testing.assert_close(factorized(torch.arange(vocab)), low_rank.float(), atol=1e-5, rtol=1e-5)
    # a rank-deficient table (duplicated columns) still gives the exact fit (minimum-norm solution)
    w2, b2 = lstsq_up_projection(torch.cat([table, table], 1), low_rank)
    torch.testing.assert_close((torch.cat([table, table], 1) @ w2.double().T + b2.double()), low_rank, atol=1e-5, rtol=1e-5)


def test_lstsq_is_the_least_squares_solution(teacher):
    table = random_table(teacher.config.vocab_size, 4, seed=1)
    target = teacher.model.embeddings.word_embeddings.weight.detach()
    w, b = lstsq_up_projection(table, target)
    residual = (table @ w.T + b - target).double()
    # normal equations: the residual is orthogonal to every column of [T 1]
    design = torch.cat([table, torch.ones(len(table), 1)], 1).double()
    assert (design.T @ residual).abs().max() < 1e-4


def test_pca_table_gives_the_best_rank_d_fit(teacher):
    e = teacher.model.embeddings.word_embeddings.weight.detach().double()
    d = 5
    table = pca_table(e, d)
    assert table.shape == (e.shape[0], d)
    w, b = lstsq_up_projection(table, e)
    residual = ((table.double() @ w.double().T + b.double()) - e).pow(2).sum()
    singular = torch.linalg.svdvals(e - e.mean(0))
    torch.testing.assert_close(residual, singular[d:].pow(2).sum(), rtol=1e-4, atol=1e-6)  # Eckart-Young
    with pytest.raises(ValueError, match="d_small"):
        pca_table(e, e.shape[1] + 1)


def test_random_up_init_is_seeded(teacher):
    table = random_table(teacher.config.vocab_size, 6)
    a = build_compact_student(teacher, [0], table, up_init="random", seed=1).model.embeddings.word_embeddings
    b = build_compact_student(teacher, [0], table, up_init="random", seed=1).model.embeddings.word_embeddings
    c = build_compact_student(teacher, [0], table, up_init="random", seed=2).model.embeddings.word_embeddings
    assert torch.equal(a.up.weight, b.up.weight) and not torch.equal(a.up.weight, c.up.weight)
    assert torch.count_nonzero(a.up.bias) == 0 and 0.01 < float(a.up.weight.detach().std()) < 0.04
    assert torch.equal(a.table.weight, table)


def test_parameter_count_formula(teacher):
    cfg = teacher.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size)
    assert count_parameters(teacher) == bert_parameter_count(num_layers=3, pooler=True, **common)
    assert count_parameters(subset_layers(teacher, [0, 2])) == bert_parameter_count(num_layers=2, pooler=True, **common)
    for d in (1, 8, 13):
        student = build_compact_student(teacher, [0, 2], random_table(cfg.vocab_size, d))
        assert student.model.pooler is None
        expected = bert_parameter_count(num_layers=2, embedding_dim=d, **common)
        assert count_parameters(student) == expected == count_parameters(student.model)
        # the factorization replaces V*H by V*d + d*H + H; the pooler (H*H + H) is gone
        assert count_parameters(subset_layers(teacher, [0, 2])) - expected == (
            cfg.vocab_size * cfg.hidden_size - (cfg.vocab_size * d + d * cfg.hidden_size + cfg.hidden_size)
            + cfg.hidden_size ** 2 + cfg.hidden_size)
    rows = parameter_table(teacher, layers=(0, 2), sizes=(4, 8))
    assert [r["embedding_dim"] for r in rows] == [cfg.hidden_size, cfg.hidden_size, 4, 8]
    assert rows[0]["parameters"] == count_parameters(teacher) and rows[0]["fraction_of_teacher"] == 1.0
    assert rows[3]["parameters"] == count_parameters(build_compact_student(teacher, [0, 2], random_table(cfg.vocab_size, 8)))


def test_export_has_no_full_word_embedding_matrix(teacher, tmp_path):
    vocab, hidden = teacher.config.vocab_size, teacher.dim
    student = build_compact_student(teacher, [0, 2], random_table(vocab, 8))
    student.save(tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(tuple(t.shape) != (vocab, hidden) for t in tensors.values())
    assert set(FACTORIZED_KEYS) <= set(tensors) and tuple(tensors[FACTORIZED_KEYS[0]].shape) == (vocab, 8)
    assert not any(k.startswith("pooler") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == count_parameters(student)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "ibkd_compact_bert" and config["embedding_dim"] == 8
    assert config["auto_map"] == {"AutoConfig": "compact_modeling.CompactBertConfig",
                                  "AutoModel": "compact_modeling.CompactBertModel"}
    assert (tmp_path / "out" / "compact_modeling.py").is_file()


_OUTSIDE_IBKD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder, sentences, result_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    result = {"class": type(model).__module__ + "." + type(model).__name__,
              "automodel": torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()}
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        result["st"] = None
    else:
        st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
        result["st"] = st.encode(sentences, convert_to_tensor=True).cpu().tolist()
    result["ibkd_imported"] = any(name == "ibkd" or name.startswith("ibkd.") for name in sys.modules)
    with open(result_path, "w") as f:
        json.dump(result, f)
""")


def test_export_loads_outside_ibkd_with_trust_remote_code(teacher, tmp_path):
    student = build_compact_student(teacher, [2, 0], random_table(teacher.config.vocab_size, 8))
    student.normalize = True
    student.save(tmp_path / "out")
    expected = student.encode(SENTS)
    script = tmp_path / "load_outside.py"
    script.write_text(_OUTSIDE_IBKD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), json.dumps(SENTS),
                           str(tmp_path / "result.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert not result["ibkd_imported"]
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith(".CompactBertModel")
    torch.testing.assert_close(torch.tensor(result["automodel"]), expected, atol=1e-5, rtol=1e-5)
    if importlib.util.find_spec("sentence_transformers") is None:
        assert result["st"] is None
    else:
        torch.testing.assert_close(torch.tensor(result["st"]), expected, atol=1e-5, rtol=1e-5)
    # inside ibkd no trust_remote_code is needed (the model type is registered)
    reloaded = Encoder.load(str(tmp_path / "out"))
    assert isinstance(reloaded.model, CompactBertModel) and reloaded.normalize
    torch.testing.assert_close(reloaded.encode(SENTS), expected, atol=1e-6, rtol=1e-6)


def test_config_round_trip():
    config = CompactBertConfig(embedding_dim=7, vocab_size=11, hidden_size=8, num_attention_heads=2)
    again = CompactBertConfig.from_dict(config.to_dict())
    assert (again.embedding_dim, again.vocab_size, again.model_type) == (7, 11, "ibkd_compact_bert")
    model = CompactBertModel(again)
    assert model.embeddings.word_embeddings(torch.tensor([[1, 2]])).shape == (1, 2, 8)


def test_bad_inputs(teacher, tmp_path):
    vocab = teacher.config.vocab_size
    with pytest.raises(ValueError, match="rows but the teacher"):
        build_compact_student(teacher, [0], random_table(vocab + 1, 4))
    with pytest.raises(ValueError, match="2-D float"):
        build_compact_student(teacher, [0], torch.zeros(vocab, dtype=torch.long).view(vocab, 1))
    with pytest.raises(ValueError, match="2-D float"):
        build_compact_student(teacher, [0], torch.zeros(vocab))
    with pytest.raises(TypeError, match="torch.Tensor"):
        build_compact_student(teacher, [0], [[0.0]] * vocab)
    bad = random_table(vocab, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        build_compact_student(teacher, [0], bad)
    with pytest.raises(ValueError, match="up_init"):
        build_compact_student(teacher, [0], random_table(vocab, 4), up_init="zeros")
    with pytest.raises(ValueError, match="out of range"):
        build_compact_student(teacher, [3], random_table(vocab, 4))
    compact = build_compact_student(teacher, [0], random_table(vocab, 4))
    with pytest.raises(ValueError, match="already"):
        factorize_student(compact, random_table(vocab, 4))
    with pytest.raises(ValueError, match="same rows"):
        lstsq_up_projection(torch.zeros(3, 2), torch.zeros(4, 2))
    # table folders
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_compact_table(tmp_path / "missing", teacher.tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="table.safetensors"):
        load_compact_table(tmp_path / "empty", teacher.tokenizer)
    write_table_folder(tmp_path / "small", random_table(vocab - 2, 4))
    with pytest.raises(ValueError, match="another vocabulary"):
        load_compact_table(tmp_path / "small", teacher.tokenizer)
    meta_file = write_table_folder(tmp_path / "meta", random_table(vocab, 4)) / "embedding_config.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "vocab_size": vocab + 5}))
    with pytest.raises(ValueError, match="vocab_size"):
        load_compact_table(tmp_path / "meta", teacher.tokenizer)
    tokenizer = teacher.tokenizer
    swapped = write_table_folder(tmp_path / "swapped", random_table(vocab, 4), tokenizer)
    vocab_file = swapped / "tokenizer.json"
    data = json.loads(vocab_file.read_text())
    words = data["model"]["vocab"]
    words["man"], words["woman"] = words["woman"], words["man"]  # same size, other token -> row mapping
    vocab_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="differs from the teacher's tokenizer"):
        load_compact_table(swapped, teacher.tokenizer)
    table, meta = load_compact_table(write_table_folder(tmp_path / "good", random_table(vocab, 4), tokenizer), tokenizer)
    assert table.shape == (vocab, 4) and meta["method"] == "test"


# -- through the trainer ------------------------------------------------------------------------

WORDS = "man woman child dog cat horse plays guitar piano runs eats apple bread red blue car tree".split()


def _sts_file(path):
    rows = []
    for i in range(10):
        a = " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(3))
        b = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3))
        rows.append(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{i % 6}.000\t{a}\t{b}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_config_needs_student_layers():
    with pytest.raises(ConfigError, match="compact_embeddings needs student_layers"):
        TrainConfig.from_dict({"compact_embeddings": "x"})
    with pytest.raises(ConfigError, match="give one of student, student_layers"):  # not a finished student too
        TrainConfig.from_dict({"compact_embeddings": "x", "student_layers": "0", "student": "y"})


def test_distill_end_to_end_with_the_compact_student(tiny, tmp_path):
    teacher = Encoder.load(tiny)
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 5)) for i in range(24)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    table = random_table(teacher.config.vocab_size, 6)
    folder = write_table_folder(tmp_path / "table", table, teacher.tokenizer)
    sts = _sts_file(tmp_path / "sts.csv")
    settings = dict(teacher=tiny, student_layers="0,2", compact_embeddings=str(folder), corpus=str(tmp_path / "corpus.txt"),
                    per_device_train_batch_size=8, max_length=16, eval_steps=2, dev=sts, test=sts, progress=False,
                    plot=False, num_threads=1, seed=3)

    def cfg(output, **more):
        return TrainConfig.from_dict({**settings, "output_dir": str(output), **more})

    summary = run(cfg(tmp_path / "full", max_steps=4, save_steps=2))
    assert summary["steps"] == 4 and "dev_spearman" in summary and "test_spearman" in summary
    student = Path(summary["student"])
    assert (student / "compact_modeling.py").is_file()
    loaded = Encoder.load(str(student))
    assert isinstance(loaded.model, CompactBertModel) and loaded.num_layers == 2
    assert loaded.model.embeddings.word_embeddings.table.weight.shape == table.shape
    # training moved the table and the up-projection away from their initial values
    final = load_file(str(student / "model.safetensors"))
    assert not torch.equal(final[FACTORIZED_KEYS[0]], table)

    # as if interrupted after the step-2 checkpoint: resuming from it gives the weights of the whole run
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for later in ("checkpoint-4", "final"):
        shutil.rmtree(tmp_path / "resumed" / later)
    assert last_checkpoint(tmp_path / "resumed").name == "checkpoint-2"
    resumed = run(cfg(tmp_path / "resumed", max_steps=4, save_steps=2, resume=True))
    assert resumed["steps"] == 4
    again = load_file(str(Path(resumed["student"]) / "model.safetensors"))
    assert again.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(again[key], final[key], atol=1e-6, rtol=1e-6, msg=key)


def test_compact_config_errors(tiny, tmp_path):
    teacher = Encoder.load(tiny)
    (tmp_path / "corpus.txt").write_text("\n".join(["a man plays", "the dog runs"] * 8) + "\n")
    base = dict(teacher=tiny, student_layers="0,2", corpus=str(tmp_path / "corpus.txt"), per_device_train_batch_size=4,
                max_steps=1, max_length=16, no_eval=True, progress=False, plot=False, output_dir=str(tmp_path / "out"),
                overwrite_output_dir=True)
    with pytest.raises(ConfigError, match="compact_embeddings folder not found"):
        run(TrainConfig.from_dict({**base, "compact_embeddings": str(tmp_path / "nowhere")}))
    wrong = write_table_folder(tmp_path / "wrong", random_table(teacher.config.vocab_size + 1, 4))
    with pytest.raises(ConfigError, match="another vocabulary"):
        run(TrainConfig.from_dict({**base, "compact_embeddings": str(wrong)}))


# -- the PCA start and trimmed position embeddings ------------------------------------------------

def test_pca_start_is_the_rank_d_approximation_of_the_word_embeddings(teacher):
    e = teacher.model.embeddings.word_embeddings.weight.detach().double()
    mean = e.mean(0)
    _, _, vh = torch.linalg.svd(e - mean, full_matrices=False)
    for d in (3, 7):
        student = pca_compact_student(subset_layers(teacher, [0, 2]), d).eval()
        factorized = student.model.embeddings.word_embeddings
        directions = vh[:d]  # (d, H)
        # table = centred E on the top-d directions, up-projection = those directions, bias = the mean
        torch.testing.assert_close(factorized.table.weight.double(), (e - mean) @ directions.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(factorized.up.weight.double(), directions.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(factorized.up.bias.double(), mean, atol=1e-6, rtol=1e-6)
        with torch.no_grad():
            rows = factorized(torch.arange(e.shape[0])).double()
        torch.testing.assert_close(rows, mean + (e - mean) @ directions.T @ directions, atol=1e-5, rtol=1e-5)
        singular = torch.linalg.svdvals(e - mean)
        torch.testing.assert_close((rows - e).pow(2).sum(), singular[d:].pow(2).sum(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="d_small"):
        pca_compact_student(subset_layers(teacher, [0]), teacher.dim + 1)


def test_trimmed_positions_give_the_untrimmed_outputs(tiny):
    teacher = Encoder.load(tiny, max_length=12).eval()
    assert teacher.config.max_position_embeddings == 64
    table = random_table(teacher.config.vocab_size, 6)
    full = build_compact_student(teacher, [0, 2], table).eval()
    trimmed = build_compact_student(teacher, [0, 2], table, max_positions=12).eval()
    emb = trimmed.model.embeddings
    assert emb.position_embeddings.weight.shape == (12, teacher.dim) and trimmed.config.max_position_embeddings == 12
    assert emb.position_ids.shape[-1] == 12 and emb.token_type_ids.shape[-1] == 12
    torch.testing.assert_close(emb.position_embeddings.weight, teacher.model.embeddings.position_embeddings.weight[:12])
    assert trimmed.tokenizer.model_max_length == 12 and teacher.tokenizer.model_max_length > 12  # a copy was changed
    sentences = SENTS + [" ".join(["the dog runs"] * 6)]  # longer than 12 tokens: truncated to max_length
    batch = trimmed.tokenize(sentences)
    assert batch["input_ids"].shape[1] == 12
    with torch.no_grad():
        torch.testing.assert_close(trimmed.model(**batch).last_hidden_state, full.model(**batch).last_hidden_state)
    torch.testing.assert_close(trimmed.encode(sentences), full.encode(sentences))
    assert count_parameters(full) - count_parameters(trimmed) == (64 - 12) * teacher.dim
    with pytest.raises(ValueError, match="below the student's max_length 12"):
        build_compact_student(teacher, [0], table, max_positions=11)
    with pytest.raises(ValueError, match="beyond the model's 64"):
        build_compact_student(teacher, [0], table, max_positions=65)
    with pytest.raises(ValueError, match="max_positions must be a positive int"):
        build_compact_student(teacher, [0], table, max_positions=12.0)


def test_parameter_formula_with_trimmed_positions(teacher):
    cfg = teacher.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  type_vocab_size=cfg.type_vocab_size)
    for d, positions in ((5, 32), (9, 40), (9, 64)):  # the fixture's max_length is 32
        student = pca_compact_student(subset_layers(teacher, [0, 2]), d, max_positions=positions)
        expected = bert_parameter_count(num_layers=2, embedding_dim=d, max_position_embeddings=positions, **common)
        assert count_parameters(student) == expected
    rows = parameter_table(teacher, layers=(0, 2), sizes=(5,), max_positions=33)
    assert rows[-1]["parameters"] == count_parameters(pca_compact_student(subset_layers(teacher, [0, 2]), 5,
                                                                          max_positions=33))
    # the docstring's closed form for all-MiniLM-L6-v2 (V 30522, H 384, I 1536) with layers {0, 5}
    minilm = dict(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_layers=2)
    for d, positions in ((96, 512), (126, 64), (127, 64), (3, 7)):
        assert bert_parameter_count(embedding_dim=d, max_position_embeddings=positions, **minilm) == \
            30906 * d + 384 * positions + 3_550_848
    assert bert_parameter_count(embedding_dim=126, max_position_embeddings=64, **minilm) == 7_469_580 <= 7_500_000
    assert bert_parameter_count(embedding_dim=127, max_position_embeddings=64, **minilm) > 7_500_000


def test_trimmed_pca_student_export_round_trip(teacher, tmp_path):
    from sentence_transformers import SentenceTransformer

    student = pca_compact_student(subset_layers(Encoder.load(teacher.name, max_length=10), [2, 0]), 6,
                                  max_positions=10).eval()
    student.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 10 and config["embedding_dim"] == 6
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 10
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tuple(tensors["embeddings.position_embeddings.weight"].shape) == (10, teacher.dim)
    sentences = SENTS + [" ".join(["the dog runs"] * 6)]
    expected = student.encode(sentences)
    reloaded = Encoder.load(str(tmp_path / "out"))
    assert isinstance(reloaded.model, CompactBertModel) and reloaded.max_length == 10
    torch.testing.assert_close(reloaded.encode(sentences), expected, atol=1e-6, rtol=1e-6)
    st = SentenceTransformer(str(tmp_path / "out"), trust_remote_code=True, device="cpu")
    assert st.max_seq_length == 10
    torch.testing.assert_close(st.encode(sentences, convert_to_tensor=True).cpu(), expected, atol=1e-5, rtol=1e-5)


def test_compact_student_from_config(teacher, tmp_path):
    vocab = teacher.config.vocab_size
    table = random_table(vocab, 4)
    folder = write_table_folder(tmp_path / "table", table, teacher.tokenizer)

    def build(**values):
        cfg = TrainConfig.from_dict({"student_layers": "0,2", "max_length": 16, **values})
        return compact_student_from_config(subset_layers(Encoder.load(teacher.name, max_length=16), [0, 2]), teacher, cfg)

    from_table = build(compact_embeddings=str(folder))
    assert torch.equal(from_table.model.embeddings.word_embeddings.table.weight, table)
    assert from_table.config.max_position_embeddings == teacher.config.max_position_embeddings
    e = teacher.model.embeddings.word_embeddings.weight
    pca_folder_width = build(compact_embeddings=str(folder), compact_init="pca", compact_max_positions=20)
    torch.testing.assert_close(pca_folder_width.model.embeddings.word_embeddings.table.weight, pca_table(e, 4))
    assert pca_folder_width.config.max_position_embeddings == 20
    pca = build(compact_init="pca", compact_dim=7, compact_max_positions=16)
    assert pca.model.embeddings.word_embeddings.table.weight.shape == (vocab, 7)
    expected = pca_compact_student(subset_layers(Encoder.load(teacher.name, max_length=16), [0, 2]), 7, max_positions=16)
    for key, value in expected.model.state_dict().items():
        torch.testing.assert_close(pca.model.state_dict()[key], value, msg=key)
    with pytest.raises(ConfigError, match=r"compact_dim must be in 1\.\.32"):
        build(compact_init="pca", compact_dim=33)
    with pytest.raises(ConfigError, match=r"compact_max_positions must be in 16\.\.64"):
        build(compact_init="pca", compact_dim=3, compact_max_positions=65)
    with pytest.raises(ConfigError, match="compact_embeddings: .*another vocabulary"):
        build(compact_embeddings=str(write_table_folder(tmp_path / "wrong", random_table(vocab + 1, 4))))


@pytest.mark.parametrize("values, message", [
    ({"compact_init": "pca"}, "compact_init pca needs student_layers"),
    ({"compact_init": "pca", "student_layers": "0"}, "compact_init pca needs compact_dim"),
    ({"compact_init": "svd", "student_layers": "0", "compact_dim": 4}, "compact_init must be table or pca"),
    ({"compact_init": "table", "student_layers": "0"}, "compact_init table needs a compact_embeddings folder"),
    ({"compact_embeddings": "x", "student_layers": "0", "compact_dim": 4}, "compact_dim is the width of the pca"),
    ({"compact_init": "pca", "student_layers": "0", "compact_dim": 0}, "compact_dim must be a positive integer"),
    ({"student_layers": "0", "compact_max_positions": 128}, "compact_max_positions trims the compact student"),
    ({"compact_init": "pca", "student_layers": "0", "compact_dim": 4, "compact_max_positions": 64, "max_length": 65},
     "compact_max_positions 64 is below max_length 65"),
    ({"compact_max_positions": "sixty"}, "compact_max_positions: expected an integer"),
])
def test_compact_option_errors_name_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_distill_with_the_pca_start_and_trimmed_positions(tiny, tmp_path):
    """compact_init pca needs no table folder; the trimmed student trains, checkpoints and exports."""
    teacher = Encoder.load(tiny)
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 5)) for i in range(24)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    sts = _sts_file(tmp_path / "sts.csv")
    cfg = TrainConfig.from_dict(dict(
        teacher=tiny, student_layers="0,2", compact_init="pca", compact_dim=5, compact_max_positions=16,
        corpus=str(tmp_path / "corpus.txt"), per_device_train_batch_size=8, max_length=16, max_steps=2, eval_steps=2,
        save_steps=2, dev=sts, test=sts, progress=False, plot=False, num_threads=1, seed=3,
        output_dir=str(tmp_path / "out")))
    summary = run(cfg)
    assert summary["steps"] == 2 and "test_spearman" in summary
    loaded = Encoder.load(summary["student"])
    assert isinstance(loaded.model, CompactBertModel) and loaded.config.max_position_embeddings == 16
    table = loaded.model.embeddings.word_embeddings.table.weight
    start = pca_table(teacher.model.embeddings.word_embeddings.weight, 5)
    assert table.shape == start.shape and not torch.equal(table, start)  # started at the PCA table, then trained
    assert count_parameters(loaded) == bert_parameter_count(
        vocab_size=teacher.config.vocab_size, hidden_size=teacher.dim, intermediate_size=teacher.config.intermediate_size,
        num_layers=2, max_position_embeddings=16, embedding_dim=5)
