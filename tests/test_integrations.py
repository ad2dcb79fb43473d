"""ibkd.integrations: the sentence-transformers losses under the real SentenceTransformerTrainer and
the Hugging Face IBKDTrainer, on a tiny random BERT built offline."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from ibkd import IBKDLoss  # noqa: E402

SENTENCES = [
    "a man is eating food", "a woman plays the violin", "the child is playing in the park",
    "a dog runs on the grass", "two cats sit in the house", "an old man rides a horse",
    "a young woman is playing guitar", "the big dog is happy", "a small cat eats fast",
    "three children are playing ball", "the red house is big", "a sad man sits in the street",
]
WORDS = sorted({w for s in SENTENCES for w in s.split()} | {"guitar", "blue", "slow"})
TEACHER_DIM = 12


def make_tiny_bert(path, hidden=16, layers=2, heads=2, seed=0):
    """A random 2-layer BERT plus a word-level WordPiece vocabulary, written to ``path``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    # from_pretrained on the folder (not the constructor's vocab_file, which transformers 5 ignores)
    tokenizer = BertTokenizerFast.from_pretrained(str(path))
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def teacher_vectors(sentences, dim=TEACHER_DIM):
    """Deterministic 'teacher' vectors: a fixed random projection of bag-of-words counts."""
    g = torch.Generator().manual_seed(123)
    table = torch.randn(len(WORDS), dim, generator=g)
    out = torch.zeros(len(sentences), dim)
    for i, s in enumerate(sentences):
        for w in s.split():
            out[i] += table[WORDS.index(w)]
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_tiny_tokenizer_knows_the_words(tiny_bert):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_bert))("a man is eating food")["input_ids"]
    assert 1 not in ids  # no [UNK]


# ------------------------------------------------------------------------------------------------
# sentence-transformers
# ------------------------------------------------------------------------------------------------
st = pytest.importorskip("sentence_transformers")


def tiny_st_model(path):
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    transformer = Transformer(str(path), max_seq_length=16)
    getter = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    dim = getter()
    return SentenceTransformer(modules=[transformer, Pooling(dim, "mean")], device="cpu")


def _hf_reference(model, sentences, layer):
    """s and x computed straight from the Hugging Face model inside the SentenceTransformer."""
    features = model.preprocess(sentences) if hasattr(model, "preprocess") else model.tokenize(sentences)
    backbone = model[0].auto_model
    features = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out = backbone(**features, output_hidden_states=True)
    mask = features["attention_mask"].unsqueeze(-1).float()
    pool = lambda h: (h * mask).sum(1) / mask.sum(1)  # noqa: E731
    return features, pool(out.last_hidden_state), pool(out.hidden_states[layer])


def test_distillation_loss_equals_ibkd_loss_on_hf_tensors(tiny_bert):
    from ibkd.integrations.sentence_transformers import IBKDDistillationLoss

    model = tiny_st_model(tiny_bert)
    loss = IBKDDistillationLoss(model, TEACHER_DIM, beta=0.5)
    sentences = SENTENCES[:6]
    teacher = teacher_vectors(sentences)
    features, s, x = _hf_reference(model, sentences, layer=0)
    out = loss([dict(features)], teacher)
    assert set(out) == {"infonce", "hsic"}
    expected = loss.ibkd(s, teacher, x)
    torch.testing.assert_close(out["infonce"] + out["hsic"], expected["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["infonce"].detach(), expected["infonce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["hsic"], 0.5 * expected["hsic"], rtol=1e-5, atol=1e-6)
    # the gradient of the whole objective reaches the student and P
    (out["infonce"] + out["hsic"]).backward()
    assert loss.ibkd.projection.weight.grad.abs().sum() > 0
    assert model[0].auto_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # hidden states were switched on for that pass only
    assert not model[0].auto_model.config.output_hidden_states


def test_distillation_loss_input_errors(tiny_bert):
    from ibkd.integrations.sentence_transformers import IBKDDistillationLoss

    model = tiny_st_model(tiny_bert)
    loss = IBKDDistillationLoss(model, TEACHER_DIM)
    features, _, _ = _hf_reference(model, SENTENCES[:3], layer=0)
    with pytest.raises(ValueError, match="label"):
        loss([dict(features)], None)
    with pytest.raises(ValueError, match="dim 5"):
        loss([dict(features)], torch.randn(3, 5))
    with pytest.raises(ValueError, match="input_layer 7"):
        IBKDDistillationLoss(model, TEACHER_DIM, input_layer=7)([dict(features)], teacher_vectors(SENTENCES[:3]))


def test_supervised_loss_with_and_without_hard_negatives(tiny_bert):
    from ibkd import functional as F_ibkd
    from ibkd.integrations.sentence_transformers import IBKDSupervisedLoss

    model = tiny_st_model(tiny_bert)
    loss = IBKDSupervisedLoss(model, projection_dim=None, beta=1.0, gamma=0.1, normalize_hsic_inputs=False)
    anchors, positives, negatives = SENTENCES[:4], SENTENCES[4:8], SENTENCES[8:12]
    fa, sa, xa = _hf_reference(model, anchors, layer=-2)
    fp, sp, _ = _hf_reference(model, positives, layer=-1)
    fn, sn, _ = _hf_reference(model, negatives, layer=-1)
    pairs = loss([dict(fa), dict(fp)])
    triplets = loss([dict(fa), dict(fp), dict(fn)])
    torch.testing.assert_close(pairs["infonce"], F_ibkd.infonce(sa, sp, temperature=0.05), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triplets["infonce"], F_ibkd.infonce(sa, torch.cat([sp, sn]), temperature=0.05),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triplets["hsic"], F_ibkd.hsic(xa, sa, gamma=0.1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="anchor, positive"):
        loss([dict(fa)])


def _st_train(model, loss, dataset, tmp_path, steps=4):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st_out"), per_device_train_batch_size=6, max_steps=steps, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train()
    return trainer


def test_distillation_loss_with_sentence_transformer_trainer(tiny_bert, tmp_path):
    from ibkd.integrations.sentence_transformers import IBKDDistillationLoss

    model = tiny_st_model(tiny_bert)
    dataset = datasets.Dataset.from_dict({"sentence": SENTENCES, "label": teacher_vectors(SENTENCES).tolist()})
    loss = IBKDDistillationLoss(model, TEACHER_DIM)
    before_student = model[0].auto_model.encoder.layer[0].attention.self.query.weight.detach().clone()
    before_projection = loss.ibkd.projection.weight.detach().clone()
    trainer = _st_train(model, loss, dataset, tmp_path)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("infonce" in h and "hsic" in h for h in logged)
    assert all(math.isfinite(h["loss"]) for h in logged)
    for h in logged:  # the components sum to the logged loss (one step per log)
        assert h["infonce"] + h["hsic"] == pytest.approx(h["loss"], rel=1e-3, abs=1e-3)
    assert not torch.equal(before_student, model[0].auto_model.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(before_projection, loss.ibkd.projection.weight)  # P is trained too
    # the trained student still encodes, and P round-trips
    assert model.encode(["a man is eating food"]).shape == (1, 16)
    loss.save_projection(tmp_path)
    fresh = IBKDDistillationLoss(model, TEACHER_DIM)
    fresh.load_projection(tmp_path)
    assert torch.equal(fresh.ibkd.projection.weight, loss.ibkd.projection.weight)


def test_supervised_loss_with_sentence_transformer_trainer(tiny_bert, tmp_path):
    from ibkd.integrations.sentence_transformers import IBKDSupervisedLoss

    model = tiny_st_model(tiny_bert)
    dataset = datasets.Dataset.from_dict({"anchor": SENTENCES, "positive": SENTENCES[1:] + SENTENCES[:1],
                                          "negative": SENTENCES[2:] + SENTENCES[:2]})
    loss = IBKDSupervisedLoss(model, projection_dim=8)
    before = loss.ibkd.projection.weight.detach().clone()
    trainer = _st_train(model, loss, dataset, tmp_path, steps=2)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"infonce", "hsic"} <= set(h) for h in logged)
    assert not torch.equal(before, loss.ibkd.projection.weight)


# ------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ------------------------------------------------------------------------------------------------
def _hf_dataset(tokenizer, sentences):
    encoded = tokenizer(sentences, truncation=True, max_length=16)
    return datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                                       "teacher_embedding": teacher_vectors(sentences).tolist(),
                                       "unused": list(range(len(sentences)))})


def _hf_trainer(tiny_bert, tmp_path, steps=3, **kwargs):
    from transformers import AutoModel, AutoTokenizer, TrainingArguments

    from ibkd.integrations.hf_trainer import IBKDTrainer, TeacherEmbeddingCollator

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    model = AutoModel.from_pretrained(str(tiny_bert))
    args = TrainingArguments(output_dir=str(tmp_path / "hf_out"), per_device_train_batch_size=6, max_steps=steps,
                             learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, **kwargs)
    loss = IBKDLoss(16, TEACHER_DIM, temperature=1.0, beta=0.2, gamma=1.0)
    trainer = IBKDTrainer(model=model, args=args, train_dataset=_hf_dataset(tokenizer, SENTENCES),
                          eval_dataset=_hf_dataset(tokenizer, SENTENCES[:6]),
                          data_collator=TeacherEmbeddingCollator(tokenizer), ibkd_loss=loss)
    return trainer, model, loss, tokenizer


def test_hf_trainer_loss_matches_ibkd_loss(tiny_bert, tmp_path):
    trainer, model, loss, tokenizer = _hf_trainer(tiny_bert, tmp_path)
    from ibkd.integrations.hf_trainer import TeacherEmbeddingCollator

    rows = [dict(r) for r in _hf_dataset(tokenizer, SENTENCES[:5]).remove_columns("unused")]
    batch = TeacherEmbeddingCollator(tokenizer)(rows)
    assert batch["teacher_embedding"].shape == (5, TEACHER_DIM) and batch["input_ids"].shape[0] == 5
    model.eval()
    got = trainer.compute_loss(model, dict(batch))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    s = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    x = (out.hidden_states[0] * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(got, loss(s, batch["teacher_embedding"], x)["loss"], rtol=1e-5, atol=1e-6)


def test_hf_trainer_trains_student_and_projection_logs_and_saves(tiny_bert, tmp_path):
    from ibkd.integrations.hf_trainer import LOSS_STATE_NAME

    trainer, model, loss, _ = _hf_trainer(tiny_bert, tmp_path, steps=3, gradient_accumulation_steps=2)
    before_student = model.embeddings.word_embeddings.weight.detach().clone()
    before_projection = loss.projection.weight.detach().clone()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"infonce", "hsic"} <= set(h) and math.isfinite(h["loss"]) for h in logged)
    assert not torch.equal(before_student, model.embeddings.word_embeddings.weight)
    assert not torch.equal(before_projection, loss.projection.weight)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])

    out_dir = tmp_path / "saved"
    trainer.save_model(str(out_dir))
    from safetensors.torch import load_file

    state = load_file(str(out_dir / LOSS_STATE_NAME))
    torch.testing.assert_close(state["projection.weight"], loss.projection.weight.detach())
    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(str(out_dir))  # a plain AutoModel folder
    torch.testing.assert_close(reloaded.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


# ------------------------------------------------------------------------------------------------
# evaluation of a SentenceTransformer (an object with .encode that is also an nn.Module)
# ------------------------------------------------------------------------------------------------
def test_evaluation_accepts_a_sentence_transformer(tiny_bert):
    from ibkd.distill import evaluation as ev

    model = tiny_st_model(tiny_bert)
    pairs = (SENTENCES[:6], SENTENCES[6:], [0.5, 1.0, 2.0, 3.5, 4.0, 5.0])
    result = ev.evaluate_sts(model, pairs, batch_size=4)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["embedding_dim"] == 16 and result["sentences_encoded"] == 12
    as_function = ev.evaluate_sts(lambda texts: model.encode(texts), pairs, batch_size=5)
    assert as_function["parameters"] is None
    assert as_function["spearman"] == pytest.approx(result["spearman"], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# GradCache variants and the defaults the integrations hand to the library
# ------------------------------------------------------------------------------------------------
def _grads_after(loss, features, labels):
    loss.zero_grad()
    out = loss([dict(f) for f in features], labels)
    total = sum(out.values())
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in loss.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("mini_batch_size", [1, 4, 5])
def test_cached_distillation_loss_equals_the_uncached_loss(tiny_bert, mini_batch_size):
    from ibkd.integrations.sentence_transformers import CachedIBKDDistillationLoss, IBKDDistillationLoss

    sentences = SENTENCES[:10]
    results = []
    for cls, kwargs in ((IBKDDistillationLoss, {}), (CachedIBKDDistillationLoss, {"mini_batch_size": mini_batch_size})):
        torch.manual_seed(0)
        model = tiny_st_model(tiny_bert)
        loss = cls(model, TEACHER_DIM, beta=0.7, **kwargs)
        features, _, _ = _hf_reference(model, sentences, layer=0)
        results.append(_grads_after(loss, [features], teacher_vectors(sentences)))
    (out_plain, g_plain), (out_cached, g_cached) = results
    for key in out_plain:
        torch.testing.assert_close(out_cached[key], out_plain[key], rtol=1e-5, atol=1e-6)
    assert g_plain.keys() == g_cached.keys() and any(k.startswith("model.") for k in g_plain) and "ibkd.projection.weight" in g_plain
    for name in g_plain:
        torch.testing.assert_close(g_cached[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cached_loss_frees_each_steps_embeddings(tiny_bert, monkeypatch):
    # the replay hook lives on the cached embeddings' grad accumulators: if it held those embeddings, each step's
    # (B, D) leaves and their gradients would stay alive for good (a cycle through autograd that gc cannot see)
    import gc
    import weakref

    from ibkd.integrations.sentence_transformers import CachedIBKDDistillationLoss

    hooked, real = [], torch.autograd.graph.register_multi_grad_hook

    def spy(tensors, fn, **kwargs):
        hooked.extend(weakref.ref(t) for t in tensors)
        return real(tensors, fn, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "register_multi_grad_hook", spy)
    sentences = SENTENCES[:8]
    model = tiny_st_model(tiny_bert)
    loss = CachedIBKDDistillationLoss(model, TEACHER_DIM, beta=0.7, mini_batch_size=3)
    features, _, _ = _hf_reference(model, sentences, layer=0)
    for _ in range(3):
        _grads_after(loss, [features], teacher_vectors(sentences))
    gc.collect()
    assert len(hooked) == 6 and all(ref() is None for ref in hooked)  # (s, x) per step, all freed


def test_cached_supervised_loss_equals_the_uncached_loss(tiny_bert):
    from ibkd.integrations.sentence_transformers import CachedIBKDSupervisedLoss, IBKDSupervisedLoss

    columns = (SENTENCES[:6], SENTENCES[6:], SENTENCES[3:9])
    results = []
    for cls, kwargs in ((IBKDSupervisedLoss, {}), (CachedIBKDSupervisedLoss, {"mini_batch_size": 4})):
        torch.manual_seed(0)
        model = tiny_st_model(tiny_bert)
        loss = cls(model, beta=0.5, projection_dim=8, **kwargs)
        features = [_hf_reference(model, c, layer=-1)[0] for c in columns]
        results.append(_grads_after(loss, features, None))
    (out_plain, g_plain), (out_cached, g_cached) = results
    for key in out_plain:
        torch.testing.assert_close(out_cached[key], out_plain[key], rtol=1e-5, atol=1e-6)
    for name in g_plain:
        torch.testing.assert_close(g_cached[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------
# length-sorted chunks: the padded batch's vectors and gradients, with fewer padded tokens
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
@pytest.mark.parametrize("cached", [False, True])
def test_length_chunks_equal_the_padded_batch(tiny_bert, chunk, cached):
    from ibkd.integrations.sentence_transformers import CachedIBKDDistillationLoss, IBKDDistillationLoss

    sentences = SENTENCES[:10]  # 4 to 7 words: the batch is padded
    results = []
    for length_chunk_size in (None, chunk):
        torch.manual_seed(0)
        model = tiny_st_model(tiny_bert)
        kwargs = {"mini_batch_size": 4} if cached else {}
        cls = CachedIBKDDistillationLoss if cached else IBKDDistillationLoss
        loss = cls(model, TEACHER_DIM, beta=0.7, length_chunk_size=length_chunk_size, **kwargs)
        features, _, _ = _hf_reference(model, sentences, layer=0)
        results.append(_grads_after(loss, [features], teacher_vectors(sentences)))
    (out_plain, g_plain), (out_chunked, g_chunked) = results
    for key in out_plain:
        torch.testing.assert_close(out_chunked[key], out_plain[key], rtol=1e-5, atol=1e-6)
    assert g_plain.keys() == g_chunked.keys() and any(k.startswith("model.") for k in g_plain)
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_length_chunks_in_the_supervised_loss(tiny_bert):
    from ibkd.integrations.sentence_transformers import IBKDSupervisedLoss

    columns = (SENTENCES[:6], SENTENCES[6:], SENTENCES[3:9])
    results = []
    for length_chunk_size in (None, 2):
        torch.manual_seed(0)
        model = tiny_st_model(tiny_bert)
        loss = IBKDSupervisedLoss(model, beta=0.5, projection_dim=8, length_chunk_size=length_chunk_size)
        results.append(_grads_after(loss, [_hf_reference(model, c, layer=-1)[0] for c in columns], None))
    (out_plain, g_plain), (out_chunked, g_chunked) = results
    for key in out_plain:
        torch.testing.assert_close(out_chunked[key], out_plain[key], rtol=1e-5, atol=1e-6)
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert loss.get_config_dict()["length_chunk_size"] == 2


def test_length_chunks_cut_only_right_padding():
    from ibkd.integrations.sentence_transformers.length_chunks import embed_by_length

    seen = []

    def embed(features):  # a row's vector: the sum of its ids; x: its length
        seen.append(tuple(features["input_ids"].shape))
        assert features.get("row_vectors", torch.zeros(1, 6)).shape[1] == 6
        ids, mask = features["input_ids"].double(), features["attention_mask"]
        return (ids * mask).sum(1, keepdim=True), mask.sum(1, keepdim=True).double()

    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    ids = torch.arange(24).reshape(4, 6) + 1
    rows_data = torch.randn(4, 6)  # per-row floats whose width equals the padded length: kept whole
    features = {"input_ids": ids, "attention_mask": mask, "modality": "text", "row_vectors": rows_data}
    expected = embed(features)
    seen.clear()
    s, x = embed_by_length(embed, features, 2)
    assert seen == [(2, 2), (2, 6)]  # lengths 1, 2 | 4, 6
    torch.testing.assert_close(s, expected[0])
    torch.testing.assert_close(x, expected[1])
    left = {"input_ids": ids, "attention_mask": mask.flip(1)}  # left padding: nothing may be cut
    seen.clear()
    s, _ = embed_by_length(embed, left, 2)
    assert seen == [(2, 6), (2, 6)]
    torch.testing.assert_close(s, embed(left)[0])


@pytest.mark.parametrize("bad", [-1, 2.5, True, "32"])
def test_length_chunk_size_must_be_a_count(tiny_bert, bad):
    from ibkd.integrations.sentence_transformers import IBKDDistillationLoss

    with pytest.raises(ValueError, match="length_chunk_size must be a positive int"):
        IBKDDistillationLoss(tiny_st_model(tiny_bert), TEACHER_DIM, length_chunk_size=bad)


def test_cached_loss_trains_under_the_trainer(tiny_bert, tmp_path):
    from ibkd.integrations.sentence_transformers import CachedIBKDDistillationLoss

    model = tiny_st_model(tiny_bert)
    dataset = datasets.Dataset.from_dict({"sentence": SENTENCES, "label": teacher_vectors(SENTENCES).tolist()})
    loss = CachedIBKDDistillationLoss(model, TEACHER_DIM, mini_batch_size=2)
    before = model[0].auto_model.embeddings.word_embeddings.weight.detach().clone()
    trainer = _st_train(model, loss, dataset, tmp_path, steps=2)
    assert not torch.equal(before, model[0].auto_model.embeddings.word_embeddings.weight)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedIBKDDistillationLoss(model, TEACHER_DIM, mini_batch_size=0)


def test_integrations_use_the_library_defaults(tiny_bert, tmp_path):
    from ibkd.integrations.sentence_transformers import IBKDDistillationLoss, IBKDSupervisedLoss
    from ibkd.losses import SupervisedIBKDLoss

    model = tiny_st_model(tiny_bert)
    stage1, library1 = IBKDDistillationLoss(model, 16).ibkd, IBKDLoss(16, 16)
    stage2, library2 = IBKDSupervisedLoss(model).ibkd, SupervisedIBKDLoss(16)
    for ours, lib in ((stage1, library1), (stage2, library2)):
        assert ours.beta.auto and lib.beta.auto and ours.beta.target_ratio == lib.beta.target_ratio
        assert ours.normalize_hsic_inputs == lib.normalize_hsic_inputs and ours.hsic.gamma == lib.hsic.gamma
        assert float(ours.infonce.temperature) == float(lib.infonce.temperature)
    assert torch.equal(stage1.projection.weight, torch.eye(16))  # identity start


def test_st_loss_loads_a_legacy_projection_file(tiny_bert, tmp_path):
    from ibkd.integrations.sentence_transformers import IBKDDistillationLoss

    model = tiny_st_model(tiny_bert)
    old = IBKDDistillationLoss(model, TEACHER_DIM, projection_init="random")
    # an earlier release pickled the wrapped IBKDLoss state ("projection.*", no beta state)
    torch.save({k: v for k, v in old.ibkd.state_dict().items() if not k.startswith("beta.")},
               tmp_path / "ibkd_projection.pt")
    fresh = IBKDDistillationLoss(model, TEACHER_DIM)
    fresh.load_projection(tmp_path)
    assert torch.equal(fresh.ibkd.projection.weight, old.ibkd.projection.weight)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ibkd_projection.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read the loss state"):
        fresh.load_projection(tmp_path / "bad")


def test_feature_rows_are_taken_from_row_level_entries_only():
    from ibkd.integrations.sentence_transformers.features import batch_rows, take_rows

    ids = torch.arange(12).reshape(4, 3)
    features = {"input_ids": ids, "attention_mask": torch.ones(4, 3, dtype=torch.long),
                "prompt_length": torch.tensor(2), "modality": "text", "other": torch.zeros(5, 2)}
    assert batch_rows(features) == 4
    part = take_rows(features, slice(1, 3))
    assert torch.equal(part["input_ids"], ids[1:3]) and part["attention_mask"].shape == (2, 3)
    assert part["prompt_length"] is features["prompt_length"] and part["modality"] == "text"
    assert part["other"] is features["other"]  # 5 rows: not the batch's
    picked = take_rows(features, torch.tensor([3, 0]))
    assert torch.equal(picked["input_ids"], ids[[3, 0]])
    assert batch_rows({"sentence_embedding": torch.zeros(7, 2)}) == 7
    with pytest.raises(ValueError, match="no tensor"):
        batch_rows({"modality": "text"})
