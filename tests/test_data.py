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


# -- every error on a file's content names the file and the line --------------------------------------------

def _fails(path, reader, line, message):
    with pytest.raises(DataError) as e:
        reader(path)
    text = str(e.value)
    assert text.startswith(f"{path}:{line}: ") and "\n" not in text, text
    assert message in text, text


def test_corpus_txt_not_utf8(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("one\ntwo\nd\xe9j\xe0 vu\n".encode("latin-1"))
    _fails(path, read_sentences, 3, "not UTF-8 text (byte 0xe9 at column 2)")


def test_corpus_jsonl_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n')
    _fails(path, read_sentences, 3, "invalid JSON")
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    _fails(path, read_sentences, 2, "no 'text' key (this row has: body)")
    path.write_text('{"text": "a"}\n{"text": ["b"]}\n')
    _fails(path, read_sentences, 2, "'text' holds list")
    path.write_text('"a plain string is a sentence"\n42\n')
    _fails(path, read_sentences, 2, "expected a JSON object or string, got int")
    path.write_text('{"id": 1}\n')
    _fails(path, read_sentences, 1, "cannot tell the text column")
    path.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: no 'body' key \(this row has: text\)"):
        read_sentences(path, column="body")
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    _fails(path, read_sentences, 2, "not UTF-8")


def test_corpus_csv_errors(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,text\n1,"a sentence, quoted"\n2,"spans\ntwo lines"\n3,too,many\n')
    _fails(path, read_sentences, 5, "3 fields, but the header has 2 (id, text)")  # the quoted field spans 3-4
    path.write_text('id,text\n1,fine\n2,"never closed\n3,more\n')
    _fails(path, read_sentences, 3, "malformed csv")
    path.write_text('id,text\n1,"closed" then text\n')
    _fails(path, read_sentences, 2, "malformed csv")
    path.write_text("id,text\n1,only\n2\n")
    _fails(path, read_sentences, 3, "1 fields, but the header has 2")
    path.write_bytes(b"id,text\n1,\x80bad\n")
    _fails(path, read_sentences, 2, "not UTF-8")
    path.write_text("id,body\n1,x\n")
    _fails(path, read_sentences, 1, "cannot tell the text column")


def test_corpus_csv_tsv_read(tmp_path):
    (tmp_path / "c.csv").write_text('\ufeffid,text\n1,"spans\ntwo lines"\n\n2,"say ""hi"""\n')
    sentences, stats = read_sentences(tmp_path / "c.csv")  # byte-order mark of spreadsheet exports dropped
    assert sentences == ["spans\ntwo lines", 'say "hi"'] and stats.empty_skipped == 1
    (tmp_path / "c.tsv").write_text("sentence\tid\na, b\t1\nc\t2\n")
    assert read_sentences(tmp_path / "c.tsv")[0] == ["a, b", "c"]


def test_corpus_reads_only_what_limit_needs(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"one\ntwo\n\xff\n")  # the bad line is past the limit
    assert read_sentences(path, limit=2)[0] == ["one", "two"]


def test_labeled_jsonl_errors(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"sent0": "a", "sent1": "b"}\n{"sent0": "a", "sent1": }\n')
    _fails(path, read_labeled, 2, "invalid JSON")
    path.write_text('{"sent0": "a", "sent1": "b"}\n\n{"sent0": "a", "other": "b"}\n')
    _fails(path, read_labeled, 3, "no sent1 or positive key (this row has: sent0, other)")
    path.write_text('{"sent0": "a", "sent1": "b", "score": "high"}\n')
    _fails(path, read_labeled, 1, "score 'high' is not a number")
    path.write_text('{"sent0": "a", "sent1": "b", "score": true}\n')
    _fails(path, read_labeled, 1, "score True is not a number")
    path.write_text('{"sent0": "a", "sent1": 7}\n')
    _fails(path, read_labeled, 1, "'sent1' holds int 7, not text")
    path.write_text('["a", "b"]\n')
    _fails(path, read_labeled, 1, "expected a JSON object with sent0 and sent1, got list")
    path.write_text('{"anchor": "a", "positive": "b", "score": 3}\n')
    assert read_labeled(path).scores == [3.0]


def test_labeled_csv_errors(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("sent0,sent1,score\na,b,4.5\nc,d,high\n")
    _fails(path, read_labeled, 3, "score 'high' is not a number")
    path.write_text("sent0,sent1,score\na,b,nan\n")
    _fails(path, read_labeled, 2, "score 'nan' is not a number")
    path.write_text("sent0,sent1,score\na,b,4.5\nc,d,\n")
    _fails(path, read_labeled, 3, "no score, but other rows (e.g. line 2) have one")
    path.write_text("sent0,sent1,hard_neg\na,b,c\nd,e\n")
    _fails(path, read_labeled, 3, "2 fields, but the header has 3")
    path.write_text("query,document\na,b\n")
    _fails(path, read_labeled, 1, "the header (query, document) has no sent0 or anchor column")
    path.write_text("sent0,text\na,b\n")
    _fails(path, read_labeled, 1, "has no sent1 or positive column")
    path.write_bytes(b"sent0,sent1\na,b\n\xc3(,x\n")
    _fails(path, read_labeled, 3, "not UTF-8")


def test_labeled_stsb_errors_name_the_line(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("g\tf\ty\t1\t5.0\tx\ty\ng\tf\ty\t2\thigh\tu\tv\n")
    _fails(path, read_labeled, 2, "score (field 5) is not a number: 'high'")


def test_missing_hard_negative_is_reported(tmp_path, caplog):
    (tmp_path / "m.csv").write_text("sent0,sent1,hard_neg\na,b,c\nd,e,\n")
    with caplog.at_level("WARNING", logger="ibkd.distill.data"):
        assert read_labeled(tmp_path / "m.csv").hard_negatives is None
    assert f"{tmp_path / 'm.csv'}:3: no hard negative" in caplog.text


# -- STS-B: the one place that knows the layout -------------------------------------------------------------

def test_stsb_layout(tmp_path):
    from ibkd.distill.stsb import STSB_SPLITS, stsb_path

    assert STSB_SPLITS == ("train", "dev", "test")
    assert stsb_path(tmp_path, "dev") == tmp_path / "sts" / "stsbenchmark" / "sts-dev.csv"
    with pytest.raises(ValueError, match="one of train, dev, test, got 'validation'"):
        stsb_path(tmp_path, "validation")


def test_stsb_reader_errors(tmp_path):
    from ibkd.distill.stsb import read_stsb as read_pairs

    path = tmp_path / "sts-dev.csv"
    path.write_text("g\tf\ty\t1\t4.0\t a \tb\r\n\n")
    assert read_pairs(path) == ([(" a ", "b")], [4.0])  # verbatim; callers strip if they want
    path.write_text("g\tf\ty\t1\t4.0\ta\tb\ng\tf\ty\t2\tinf\ta\tb\n")
    _fails(path, read_pairs, 2, "score (field 5) is not a number: 'inf'")
    path.write_bytes(b"g\tf\ty\t1\t4.0\ta\t\xe9\n")
    _fails(path, read_pairs, 1, "not UTF-8")
    path.write_text("\n\n")
    with pytest.raises(DataError, match="contains no sentence pairs"):
        read_pairs(path)
    with pytest.raises(DataError, match="STS-B file not found"):
        read_pairs(tmp_path / "nope.csv")


def test_stsb_real_files():
    import os

    from ibkd.distill.stsb import STSB_SPLITS, read_stsb as read_pairs, stsb_path

    sizes = {}
    for split in STSB_SPLITS:
        path = stsb_path(os.environ["IBKD_DATA_DIR"], split)
        if not path.exists():
            pytest.skip(f"STS-B not present at {path}")
        pairs, scores = read_pairs(path)
        assert all(0 <= s <= 5 for s in scores)
        sizes[split] = len(pairs)
    assert sizes == {"train": 5749, "dev": 1500, "test": 1379}
