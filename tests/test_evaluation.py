"""ibkd.distill.evaluation: STS scores against hand-computed values and scipy, file parsing edge cases, what is
measured on the way (parameters, dim, throughput, eval mode)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from scipy import stats as scipy_stats

from ibkd.distill import evaluation as ev
from ibkd.distill.stsb import stsb_path


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
    path = stsb_path(os.environ["IBKD_DATA_DIR"], "dev")  # tests/conftest.py sets the variable
    if not path.exists():
        pytest.skip("shared STS-B data not present")
    data = ev.load_stsb(path)
    assert len(data.scores) == 1500 and all(0 <= s <= 5 for s in data.scores)


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


def test_evaluate_sts_on_a_file_with_a_plain_function(tmp_path):
    path = tmp_path / "sts-dev.csv"
    path.write_text("g\tf\ty\t1\t1.0\tab\tcd\ng\tf\ty\t2\t4.0\tab\tab\ng\tf\ty\t3\t2\tab\tac\n")
    result = ev.evaluate_sts(hashing_encode, path, batch_size=4)
    assert result["task"] == "sts-dev" and result["n"] == 3 and result["parameters"] is None
    cosine = torch.nn.functional.cosine_similarity(hashing_encode(["ab", "ab", "ab"]),
                                                   hashing_encode(["cd", "ab", "ac"])).numpy()
    assert result["spearman"] == pytest.approx(100 * scipy_stats.spearmanr(cosine, [1.0, 4.0, 2.0]).statistic)
    with pytest.raises(ValueError, match="at least 2 scored pairs"):
        ev.evaluate_sts(hashing_encode, (["a"], ["b"], [1.0]))
