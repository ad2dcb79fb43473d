import json

import pytest

from ibkd.distill.data import DataError, corpus_hash, read_labeled, read_sentences, read_stsb, stsb_sentences


def test_txt_skips_and_counts_empty_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first sentence\n\n   \nsecond one  \nthird\n")
    sentences, stats = read_sentences(path)
    assert sentences == ["first sentence", "second one", "third"]
    assert (stats.rows, stats.empty_skipped) == (3, 2)
    assert read_sentences(path, limit=2)[0] == ["first sentence", "second one"]


def test_jsonl_and_csv_columns(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": ""}) + "\n"
                                      + json.dumps({"text": "c"}) + "\n")
    sentences, stats = read_sentences(tmp_path / "c.jsonl")
    assert sentences == ["a b", "c"] and stats.empty_skipped == 2
    (tmp_path / "c.csv").write_text('id,body\n1,"hello, world"\n2,\n3,bye\n')
    assert read_sentences(tmp_path / "c.csv", column="body")[0] == ["hello, world", "bye"]
    with pytest.raises(DataError, match="no column 'nope'"):
        read_sentences(tmp_path / "c.csv", column="nope")
    with pytest.raises(DataError, match="text column"):
        read_sentences(tmp_path / "c.csv")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_sentences(tmp_path / "nope.txt")


def test_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["x y", "", "z"]})
    sentences, stats = read_sentences(ds)
    assert sentences == ["x y", "z"] and stats.empty_skipped == 1


def test_stsb_quoting_off_and_extra_fields(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text('main\tf\t2012\t0001\t4.5\tHe said "hi.\tShe said "bye".\textra\tfields\n'
                    "main\tf\t2012\t0002\t1.0\tA cat.\tA dog.\n")
    s1, s2, scores = read_stsb(path)
    assert s1 == ['He said "hi.', "A cat."] and s2 == ['She said "bye".', "A dog."] and scores == [4.5, 1.0]
    assert stsb_sentences(path) == ['He said "hi.', 'She said "bye".', "A cat.", "A dog."]
    path.write_text("only\tthree\tfields\n")
    with pytest.raises(DataError, match="7 tab-separated"):
        read_stsb(path)


def test_labeled_formats(tmp_path):
    (tmp_path / "t.csv").write_text("sent0,sent1,hard_neg\na,b,c\nd,e,f\n,x,y\n")
    data = read_labeled(tmp_path / "t.csv")
    assert data.anchors == ["a", "d"] and data.hard_negatives == ["c", "f"] and data.stats.empty_skipped == 1
    (tmp_path / "p.csv").write_text("sent0,sent1\na,b\nd,e\n")
    assert read_labeled(tmp_path / "p.csv").hard_negatives is None
    (tmp_path / "m.csv").write_text("sent0,sent1,hard_neg\na,b,c\nd,e,\n")  # one hard negative missing
    assert read_labeled(tmp_path / "m.csv").hard_negatives is None
    (tmp_path / "s.csv").write_text("sent0,sent1,score\na,b,4.5\nd,e,1.0\n")
    scored = read_labeled(tmp_path / "s.csv", min_score=4.0)
    assert scored.anchors == ["a"] and scored.scores == [4.5]
    (tmp_path / "sts.csv").write_text("g\tf\ty\t1\t5.0\tx\ty\ng\tf\ty\t2\t0.5\tu\tv\n")
    assert read_labeled(tmp_path / "sts.csv", min_score=4).positives == ["y"]


def test_corpus_hash_depends_on_order_and_boundaries():
    assert corpus_hash(["ab", "c"]) != corpus_hash(["a", "bc"])
    assert corpus_hash(["a", "b"]) != corpus_hash(["b", "a"])
    assert corpus_hash(["a", "b"]) == corpus_hash(["a", "b"])
