import json

import pandas as pd
import pytest
from transformers import HfArgumentParser

from unidetox.distill.corpus import (
    DGHS_TARGETS,
    ToxicCorpusConfig,
    corpus_fingerprint,
    load_dghs,
    load_text_file,
    load_toxic_corpus,
)


def test_dghs_local_matches_paper_filter(shared_data):
    corpus = load_dghs()
    # Reference computation with pandas: label == hate and target exactly one of the 34 codes.
    frames = [pd.read_csv(shared_data / "dghs" / f) for f in ("db_dev.csv", "db_test.csv")]
    expected = [
        row.text
        for frame in frames
        for row in frame.itertuples()
        if row.label == "hate" and row.target in DGHS_TARGETS
    ]
    assert corpus.column_names == ["text"]
    assert corpus["text"] == expected
    assert len(corpus) == 2044  # SOURCE.md: dev 998 + test 1,046


def test_dghs_split_filter_names_values_when_empty(shared_data):
    # The offline files have no `train` rows: the error names the filter and the values present.
    with pytest.raises(ValueError, match=r"'split' holds 'dev'") as err:
        load_dghs(paths=[shared_data / "dghs" / "db_dev.csv"], splits=["train"])
    assert "db_dev.csv" in str(err.value)


def test_davidson_class_filter_with_integer_values(shared_data):
    path = shared_data / "davidson_hate_offensive" / "labeled_data.csv"
    corpus = load_text_file(path, text_column="tweet", filters={"class": [0, 1]})
    frame = pd.read_csv(path)
    assert len(corpus) == int(frame["class"].isin([0, 1]).sum()) == 20620
    hate_only = load_text_file(path, text_column="tweet", filters={"class": ["0"]})
    assert len(hate_only) == 1430


def test_missing_file_names_path_and_override(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv") as err:
        load_text_file(tmp_path / "nope.csv")
    assert "path" in str(err.value)


def test_missing_text_column_names_columns(tmp_path):
    path = tmp_path / "x.csv"
    pd.DataFrame({"tweet": ["a", "b"], "class": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"Text column 'text' is not in .*x.csv.*\['tweet', 'class'\]"):
        load_text_file(path)


def test_missing_filter_column(tmp_path):
    path = tmp_path / "x.csv"
    pd.DataFrame({"text": ["a"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="Filter column 'label'"):
        load_text_file(path, filters={"label": ["hate"]})


def test_jsonl_and_txt_and_max_samples(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": f"text {i}", "tox": i % 2}) for i in range(10)))
    txt = tmp_path / "b.txt"
    txt.write_text("first line\n\nsecond line\n")
    config = ToxicCorpusConfig(path=[str(jsonl), str(txt)], text_column="content", filters=None)
    with pytest.raises(ValueError, match="Text column 'content' is not in .*b.txt"):
        load_toxic_corpus(config)
    corpus = load_text_file(jsonl, text_column="content", filters={"tox": [1]})
    assert corpus["text"] == [f"text {i}" for i in range(1, 10, 2)]
    assert load_text_file(txt)["text"] == ["first line", "second line"]
    subset = load_toxic_corpus(ToxicCorpusConfig(path=[str(jsonl)], text_column="content", max_samples=3))
    again = load_toxic_corpus(ToxicCorpusConfig(path=[str(jsonl)], text_column="content", max_samples=3))
    assert len(subset) == 3 and subset["text"] == again["text"]
    assert set(subset["text"]) <= {f"text {i}" for i in range(10)}


def test_relative_paths_resolve_against_data_dir(shared_data):
    config = ToxicCorpusConfig(path=["dghs/db_dev.csv"], data_dir=str(shared_data), filters={"label": ["hate"]})
    assert len(load_toxic_corpus(config)) == 1858


def test_config_validation_and_hf_parsing():
    with pytest.raises(ValueError, match="exactly one of `path` and `hub_id`"):
        ToxicCorpusConfig()
    with pytest.raises(ValueError, match="exactly one"):
        ToxicCorpusConfig(path=["a.csv"], hub_id="x/y")
    with pytest.raises(ValueError, match="list no values"):
        ToxicCorpusConfig(path=["a.csv"], filters={"label": []})
    (parsed,) = HfArgumentParser(ToxicCorpusConfig).parse_dict(
        {"path": ["a.csv"], "filters": {"class": [0, 1]}, "text_column": "tweet"}
    )
    assert parsed.filters == {"class": [0, 1]} and parsed.text_column == "tweet"


def test_hub_failure_is_clear_and_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="data=dghs_local"):
        load_dghs(hub=True)


def test_corpus_fingerprint_depends_on_texts_and_order():
    import datasets

    a = datasets.Dataset.from_dict({"text": ["x", "y"]})
    b = datasets.Dataset.from_dict({"text": ["y", "x"]})
    assert corpus_fingerprint(a) == corpus_fingerprint(datasets.Dataset.from_dict({"text": ["x", "y"]}))
    assert corpus_fingerprint(a) != corpus_fingerprint(b)
