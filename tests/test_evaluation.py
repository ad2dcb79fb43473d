"""ibkd.distill.evaluation: metrics against hand-computed values, file parsing edge cases, chunked search."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ibkd import evaluation as ev

scipy_stats = pytest.importorskip("scipy.stats")


# ------------------------------------------------------------------------------------------------
# fake encoders
# ------------------------------------------------------------------------------------------------
class TableEncoder(nn.Module):
    """Looks sentences up in a fixed table of vectors; counts calls. An nn.Module with 3 params."""

    def __init__(self, table: dict[str, list[float]]):
        super().__init__()
        self.table = table
        self.weight = nn.Parameter(torch.zeros(3))
        self.calls: list[list[str]] = []
        self.training_seen: list[bool] = []

    def encode(self, texts, batch_size=None):
        self.calls.append(list(texts))
        self.training_seen.append(self.training)
        assert not torch.is_grad_enabled()
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def hashing_encode(texts: list[str]) -> torch.Tensor:
    """A deterministic bag-of-characters embedding: similar strings get similar vectors."""
    out = torch.zeros(len(texts), 26)
    for i, text in enumerate(texts):
        for ch in text.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1.0
    return out + 0.01


# ------------------------------------------------------------------------------------------------
# correlations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_and_pearson_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, size=57).astype(float)  # many ties
    y = x + rng.normal(size=57)
    y[::7] = y[1]  # ties on the other side too
    assert ev.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert ev.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)


def test_spearman_hand_values():
    assert ev.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1,2,3 ; y = 1,3,2 -> d² = 0,1,1 -> 1 - 6·2/(3·8) = 0.5
    assert ev.spearman([1, 2, 3], [5, 9, 7]) == pytest.approx(0.5)
    assert math.isnan(ev.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="at least 2"):
        ev.spearman([1], [1])


# ------------------------------------------------------------------------------------------------
# STS parsing
# ------------------------------------------------------------------------------------------------
def test_load_stsb_extra_fields_quotes_and_blank_lines(tmp_path):
    path = tmp_path / "sts-dev.csv"
    rows = [
        'main-captions\tMSRvid\t2012test\t0001\t5.000\tA "quoted sentence.\tAnother one."',
        "",
        "main-news\theadlines\t2016\t0281\t2.5\tFirst\tSecond\tsource one\tsource two",
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = ev.load_stsb(path)
    assert data.sents1 == ['A "quoted sentence.', "First"]  # quoting off: quotes kept verbatim
    assert data.sents2 == ['Another one."', "Second"]
    assert data.scores == [5.0, 2.5]


def test_load_stsb_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("g\tf\ty\ti\t1.0\ta\tb\ng\tf\ty\ti\t1.0\tonly six\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: expected at least 7"):
        ev.load_stsb(path)
    path.write_text("g\tf\ty\ti\thigh\ta\tb\n")
    with pytest.raises(ValueError, match=r"bad\.csv:1: score"):
        ev.load_stsb(path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        ev.load_stsb(tmp_path / "missing.csv")


def test_load_real_stsb_file_if_present():
    path = "/work/shared/data/sts/stsbenchmark/sts-dev.csv"
    import os

    if not os.path.exists(path):
        pytest.skip("shared STS-B data not present")
    data = ev.load_stsb(path)
    assert len(data.scores) == 1500 and all(0 <= s <= 5 for s in data.scores)


def _write_senteval(folder, name, pairs, golds):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"STS.input.{name}.txt").write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    (folder / f"STS.gs.{name}.txt").write_text("".join(f"{g}\n" for g in golds), encoding="utf-8")


def test_senteval_blank_gold_skips_pair_and_all_setting_concatenates(tmp_path):
    folder = tmp_path / "STS12-en-test"
    _write_senteval(folder, "MSRpar", [("a cat", "a cat"), ("dog", "zebra"), ("skipped", "pair"), ("cab", "cat")],
                    ["5.0", "0.5", "", "3.0"])
    _write_senteval(folder, "OnWN", [("hello", "yellow"), ("abc", "xyz"), ("sun", "sun")], ["3", "1", "5"])
    subsets = ev.load_senteval_sts(folder)
    assert list(subsets) == ["MSRpar", "OnWN"]
    assert subsets["MSRpar"].sents1 == ["a cat", "dog", "cab"]
    assert subsets["MSRpar"].scores == [5.0, 0.5, 3.0]

    result = ev.evaluate_senteval_sts(hashing_encode, folder, batch_size=2)
    all_s1 = subsets["MSRpar"].sents1 + subsets["OnWN"].sents1
    all_s2 = subsets["MSRpar"].sents2 + subsets["OnWN"].sents2
    gold = subsets["MSRpar"].scores + subsets["OnWN"].scores
    cosine = torch.nn.functional.cosine_similarity(hashing_encode(all_s1), hashing_encode(all_s2)).numpy()
    assert result["n"] == 6
    assert result["spearman"] == pytest.approx(100 * scipy_stats.spearmanr(cosine, gold).statistic, abs=1e-9)
    per = {k: v["spearman"] for k, v in result["subsets"].items()}
    assert result["mean_spearman"] == pytest.approx((per["MSRpar"] + per["OnWN"]) / 2)
    assert result["wmean_spearman"] == pytest.approx((3 * per["MSRpar"] + 3 * per["OnWN"]) / 6)


def test_senteval_misaligned_and_missing_gold(tmp_path):
    folder = tmp_path / "sts"
    _write_senteval(folder, "x", [("a", "b"), ("c", "d")], ["1"])
    with pytest.raises(ValueError, match="align"):
        ev.load_senteval_sts(folder)
    (folder / "STS.gs.x.txt").unlink()
    with pytest.raises(FileNotFoundError, match="STS.gs.x.txt"):
        ev.load_senteval_sts(folder)


def test_load_sick_keeps_test_rows(tmp_path):
    header = ["pair_ID", "sentence_A", "sentence_B", "entailment_label", "relatedness_score", "SemEval_set"]
    rows = [["1", "a b", "a c", "NEUTRAL", "3.6", "TRAIN"], ["2", "x y", "x y", "ENTAILMENT", "4.9", "TEST"],
            ["3", "p", "q", "NEUTRAL", "1.2", "TRIAL"], ["4", "m n", "n m", "NEUTRAL", "4.0", "TEST"]]
    (tmp_path / "SICK.txt").write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    data = ev.load_sick(tmp_path)  # folder form
    assert data == ev.STSData(["x y", "m n"], ["x y", "n m"], [4.9, 4.0])
    assert ev.load_sick(tmp_path / "SICK.txt", split="TRAIN").scores == [3.6]


def test_evaluate_sts_against_hand_cosines_and_reports_model_facts():
    table = {"a": [1, 0], "b": [1, 1], "c": [0, 1], "d": [-1, 1]}
    model = TableEncoder(table)
    model.train()
    # cosines: (a,a)=1, (a,b)=.707, (a,c)=0, (a,d)=-.707 ; gold in reverse order of one swap
    pairs = (["a", "a", "a", "a"], ["a", "b", "c", "d"], [4.0, 3.0, 1.0, 2.0])
    result = ev.evaluate_sts(model, pairs, batch_size=3)
    assert result["spearman"] == pytest.approx(80.0)  # ranks 4,3,2,1 vs 4,3,1,2: 1 - 6·2/60 = 0.8
    cos = [1.0, 2**-0.5, 0.0, -(2**-0.5)]
    assert result["pearson"] == pytest.approx(100 * scipy_stats.pearsonr(cos, pairs[2]).statistic)
    assert result["n"] == 4 and result["parameters"] == 3 and result["embedding_dim"] == 2
    assert result["sentences_encoded"] == 4  # "a" encoded once
    assert result["sentences_per_second"] > 0
    assert all(len(c) <= 3 for c in model.calls)  # batch_size respected
    assert model.training_seen == [False] * len(model.calls) and model.training  # eval during, restored after


def test_evaluate_dispatch_stsb_folder(tmp_path):
    (tmp_path / "sts-dev.csv").write_text("g\tf\ty\t1\t1.0\tab\tcd\ng\tf\ty\t2\t4.0\tab\tab\ng\tf\ty\t3\t2\tab\tac\n")
    result = ev.evaluate(hashing_encode, "stsb", tmp_path, split="dev", batch_size=4)
    assert result["task"] == "stsb" and result["split"] == "dev" and result["n"] == 3
    assert result["parameters"] is None
    with pytest.raises(ValueError, match="task must be one of"):
        ev.evaluate(hashing_encode, "mnli", tmp_path)


def test_hub_loading_code_path(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake_load_dataset(name, split):
        seen.update(name=name, split=split)
        return datasets.Dataset.from_dict({"sentence1": ["ab", "ab", "ab"], "sentence2": ["ab", "cd", "ac"],
                                           "score": [5.0, 0.0, 2.5]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = ev.evaluate(hashing_encode, "sts13")
    assert seen == {"name": "mteb/sts13-sts", "split": "test"}
    assert result["n"] == 3 and result["spearman"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------
# retrieval
# ------------------------------------------------------------------------------------------------
def test_ranking_metrics_hand_computed():
    qrels = [{"d1": 1, "d3": 2}, {"d9": 1}, {"d2": 1}]
    rankings = [["d3", "d2", "d1"], ["d1", "d2"], ["d5", "d2"]]
    m = ev.ranking_metrics(rankings, qrels, mrr_k=10, ndcg_k=10, recall_ks=(1, 2))
    # q1: first relevant at rank 1 -> 1 ; q2: none -> 0 ; q3: rank 2 -> 1/2
    assert m["mrr@10"] == pytest.approx((1 + 0 + 0.5) / 3)
    # q1: DCG = 2/log2(2) + 1/log2(4) = 2.5 ; IDCG = 2 + 1/log2(3) ; q3: DCG = 1/log2(3), IDCG = 1
    ndcg_q1 = 2.5 / (2 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + 0 + 1 / math.log2(3)) / 3)
    # recall@1: q1 1/2, q3 0 ; recall@2: q1 1/2, q3 1
    assert m["recall@1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert m["recall@2"] == pytest.approx((0.5 + 0 + 1) / 3)


def test_ranking_metrics_cutoffs_and_nonpositive_judgments():
    # relevant doc at rank 3 is outside MRR@2; a judged 0 doc is not relevant
    m = ev.ranking_metrics([["a", "b", "c"]], [{"a": 0, "c": 1}], mrr_k=2, ndcg_k=2, recall_ks=(3,))
    assert m == {"mrr@2": 0.0, "ndcg@2": 0.0, "recall@3": 1.0}


@pytest.mark.parametrize("score", ["cos", "dot"])
@pytest.mark.parametrize("corpus_chunk,query_chunk,k", [(7, 3, 5), (1, 100, 4), (50, 2, 60), (13, 5, 1)])
def test_chunked_search_equals_dense_search_with_duplicates(score, corpus_chunk, query_chunk, k):
    g = torch.Generator().manual_seed(0)
    corpus = torch.randn(41, 8, generator=g)
    corpus[20] = corpus[3]  # exact ties across chunks
    corpus[21] = corpus[3]
    corpus[5] = corpus[4]  # and inside a chunk
    queries = torch.randn(11, 8, generator=g)
    queries[0] = corpus[3]
    scores, indices = ev.exact_search(queries, corpus, k, score=score, corpus_chunk_size=corpus_chunk,
                                      query_chunk_size=query_chunk)
    q, c = (torch.nn.functional.normalize(queries), torch.nn.functional.normalize(corpus)) if score == "cos" else (
        queries, corpus)
    dense = torch.sort(q @ c.T, dim=1, descending=True, stable=True)
    width = min(k, corpus.shape[0])
    assert torch.equal(indices, dense.indices[:, :width])
    torch.testing.assert_close(scores, dense.values[:, :width], rtol=1e-5, atol=1e-6)
    if k >= 3:  # ties resolved to the lowest index: corpus 3, 20, 21 in that order for the first query
        assert indices[0, :3].tolist() == [3, 20, 21]


def test_exact_search_from_lazy_chunks_and_errors():
    corpus = torch.randn(10, 4)
    chunks = (corpus[i:i + 3] for i in range(0, 10, 3))
    _, idx = ev.exact_search(corpus[:2], chunks, 10)
    assert idx[:, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="score"):
        ev.exact_search(corpus, corpus, 3, score="l2")
    with pytest.raises(ValueError, match="empty"):
        ev.exact_search(corpus, iter([]), 3)


def _write_beir(folder, corpus, queries, qrels, header=True):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{r}" for q, d, r in qrels]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")


def test_evaluate_retrieval_on_tiny_beir_folder(tmp_path):
    corpus = [{"_id": "d1", "title": "apple", "text": "apple pie"}, {"_id": "d2", "title": "", "text": "zebra zoo"},
              {"_id": "d3", "title": "banana", "text": "bananas"}, {"_id": "q2", "title": "", "text": "kiwi kiwi"}]
    queries = [{"_id": "q1", "text": "apple"}, {"_id": "q2", "text": "kiwi kiwi"}, {"_id": "q3", "text": "unjudged"},
               {"_id": "q4", "text": "banana"}]
    qrels = [("q1", "d1", 1), ("q2", "d2", 1), ("q4", "d3", 2), ("q4", "missing-doc", 1), ("q5", "d1", 1)]
    _write_beir(tmp_path, corpus, queries, qrels)
    data = ev.load_beir(tmp_path)
    assert data.query_ids == ["q1", "q2", "q4"]  # q3 unjudged, q5 has no text
    assert data.corpus_texts[0] == "apple apple pie" and data.corpus_texts[1] == "zebra zoo"

    result = ev.evaluate_retrieval(hashing_encode, tmp_path, batch_size=2, corpus_chunk_size=3, recall_ks=(1, 3))
    # q1 -> d1 first. q2: its own id "q2" is in the corpus and dropped (BEIR's ignore_identical_ids),
    # leaving d2 somewhere in 3 docs. q4 -> d3 first, but "missing-doc" can never be retrieved.
    with torch.no_grad():
        q = torch.nn.functional.normalize(hashing_encode(data.query_texts))
        c = torch.nn.functional.normalize(hashing_encode(data.corpus_texts))
    order = torch.sort(q @ c.T, dim=1, descending=True, stable=True).indices.tolist()
    rankings = [[data.corpus_ids[i] for i in row if data.corpus_ids[i] != qid]
                for qid, row in zip(data.query_ids, order)]
    expected = ev.ranking_metrics(rankings, [data.qrels[q] for q in data.query_ids], recall_ks=(1, 3))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value)
    assert rankings[0][0] == "d1" and rankings[2][0] == "d3"
    assert result["recall@3"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert result["num_queries"] == 3 and result["corpus_size"] == 4 and result["embedding_dim"] == 26
    assert result["sentences_encoded"] == 3 + 4


def test_load_beir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        ev.load_beir(tmp_path)
    _write_beir(tmp_path, [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "x"}], [("q1", "d1", 0)], header=False)
    with pytest.raises(ValueError, match="no query"):
        ev.load_beir(tmp_path)


def test_format_result_one_line():
    line = ev.format_result({"task": "stsb", "spearman": 81.234, "pearson": 80.0, "n": 3, "embedding_dim": 4,
                             "parameters": 2_000_000, "sentences_per_second": 123.4})
    assert line.startswith("stsb: spearman=81.23") and "2.00M params" in line and "123 sent/s" in line
