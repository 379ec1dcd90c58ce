import gzip
import json

import pytest
import torch

from tpserve.engine.errors import ConfigError
from tpserve.quant import datasets as qd
from tpserve.quant.datasets import calib_windows, load_calib_texts


class CharTokenizer:
    """One token per character: enough to check windowing."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "jsonl one"}) + "\n" + json.dumps({"text": "jsonl two"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "json list"}, {"text": "json list 2", "id": 3}]))
    (tmp_path / "d.json").write_text(json.dumps({"text": ["json dict"]}))
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row"], "other": [1]}), tmp_path / "f.parquet")
    assert load_calib_texts(str(tmp_path / "a.txt")) == ["first line", "second line"]
    assert load_calib_texts(str(tmp_path / "c.json")) == ["json list", "json list 2"]
    assert load_calib_texts(str(tmp_path)) == [
        "first line", "second line", "jsonl one", "jsonl two", "json list", "json list 2",
        "json dict", "gzipped", "parquet row",
    ]


def test_local_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match="'text'"):
        load_calib_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="no text"):
        load_calib_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="--calib-dataset PATH"):
        load_calib_texts("no_such_dataset_name")


def test_hub_unreachable_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(qd, "_hub_reachable", lambda timeout_s=5.0: False)
    with pytest.raises(ConfigError, match="--calib-dataset PATH"):
        load_calib_texts("c4")


def test_hub_offline_without_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_DATASETS_OFFLINE"):
        load_calib_texts("wikitext2")


def test_windows_deterministic_and_in_text():
    texts = [f"doc{i} " + "abcdefghij" * (i + 1) for i in range(20)]
    tok = CharTokenizer()
    w1 = calib_windows(texts, tok, n_samples=6, seqlen=16, seed=0)
    w2 = calib_windows(texts, tok, n_samples=6, seqlen=16, seed=0)
    w3 = calib_windows(texts, tok, n_samples=6, seqlen=16, seed=1)
    assert w1.shape == (6, 16) and w1.dtype == torch.long
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    joined = "\n\n".join(texts)
    for row in w1:
        assert "".join(map(chr, row.tolist())).replace("\n\n", "") in joined.replace("\n\n", "")


def test_windows_text_too_short():
    with pytest.raises(ConfigError, match="calib-seqlen"):
        calib_windows(["short"], CharTokenizer(), n_samples=2, seqlen=64)


def test_pileval_names_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zstandard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install zstandard"):
        load_calib_texts("pileval")
