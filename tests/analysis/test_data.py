from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.data import labelled_subset, load_dataset, make_splits
from runtimes.errors import ConfigError, DataError


def test_digits_is_the_real_sklearn_set() -> None:
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.modality == "image"
    assert ds.label_names == tuple(str(i) for i in range(10))
    assert ds.items[0].dtype == np.uint8 and ds.items[0].shape == (8, 8)
    assert max(int(x.max()) for x in ds.items) == 255  # 16 (the data's maximum) maps to 255


def test_splits_are_deterministic_disjoint_and_stratified() -> None:
    labels = load_dataset("digits").labels
    a, b = make_splits(labels, seed=0), make_splits(labels, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], make_splits(labels, seed=1)["test"])
    together = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(together) == len(labels) == len(set(together.tolist()))
    assert len(a["test"]) == pytest.approx(0.2 * len(labels), abs=10)
    assert set(labels[a["test"]].tolist()) == set(range(10))


def test_labelled_subset_is_a_stratified_fraction() -> None:
    labels = load_dataset("digits").labels
    train = make_splits(labels)["train"]
    sub = labelled_subset(train, labels, 0.1, seed=3)
    assert set(sub.tolist()) <= set(train.tolist())
    assert len(sub) == pytest.approx(0.1 * len(train), abs=10)
    assert set(labels[sub].tolist()) == set(range(10))
    assert np.array_equal(sub, labelled_subset(train, labels, 0.1, seed=3))
    assert not np.array_equal(sub, labelled_subset(train, labels, 0.1, seed=4))
    with pytest.raises(ConfigError):
        labelled_subset(train, labels, 0.0, seed=0)


def test_imagefolder(tmp_path: Path) -> None:
    digits = load_dataset("digits")
    for i in range(6):
        cls = tmp_path / ("cat" if i % 2 else "dog")
        cls.mkdir(exist_ok=True)
        Image.fromarray(digits.items[i]).save(cls / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert len(ds) == 6 and ds.label_names == ("cat", "dog") and ds.modality == "image"


def test_text_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,y\ngood film,pos\nbad film,neg\nfine,pos\n")
    ds = load_dataset(f"text:{csv_path}?text=sentence&label=y")
    assert ds.items == ["good film", "bad film", "fine"] and ds.label_names == ("neg", "pos")
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("a", 1), ("b", 10), ("c", 2)]))
    assert load_dataset(f"text:{jl}").label_names == ("1", "2", "10")


def test_tweets_builtin_is_deduplicated() -> None:
    ds = load_dataset("tweets")
    assert ds.label_names == ("negative", "neutral", "positive")
    assert len(ds) == len(set(ds.items)) > 30000


@pytest.mark.parametrize("make, error, words", [
    (lambda p: f"text:{p}/missing.csv", DataError, "does not exist"),
    (lambda p: f"imagefolder:{p}/nowhere", DataError, "does not exist"),
    (lambda p: "mnist", ConfigError, "unknown data spec"),
])
def test_bad_specs(tmp_path: Path, make, error, words: str) -> None:
    with pytest.raises(error, match=words):
        load_dataset(make(tmp_path))


def test_missing_column_empty_and_encoding(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("text,category\nhello,a\n")
    with pytest.raises(DataError, match="no column 'label'.*category"):
        load_dataset(f"text:{p}")
    p.write_text("text,label\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(f"text:{p}")
    p.write_bytes("text,label\ncaf\xe9,a\nb,b\n".encode("latin-1"))
    with pytest.raises(DataError, match="encoding=latin-1"):
        load_dataset(f"text:{p}")
    assert load_dataset(f"text:{p}?encoding=latin-1").items[0] == "caf\xe9"
    empty = tmp_path / "folder"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"imagefolder:{empty}")


def test_limit_gives_a_fixed_stratified_subset() -> None:
    a, b = load_dataset("digits?limit=100"), load_dataset("digits?limit=100")
    assert len(a) == 100 and np.bincount(a.labels).tolist() == [10] * 10
    assert all(np.array_equal(x, y) for x, y in zip(a.items, b.items))
    with pytest.raises(ConfigError, match="limit must be"):
        load_dataset("digits?limit=ten")
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset("digits?text=x")


@pytest.mark.parametrize("encoding", ["nope", "rot13", ""])
def test_an_unknown_text_encoding_is_a_data_error(tmp_path: Path, encoding: str) -> None:
    p = tmp_path / "d.csv"
    p.write_text("text,label\nhello,a\nbye,b\n")
    with pytest.raises(DataError, match=f"unknown text encoding '{encoding}'"):
        load_dataset(f"text:{p}?encoding={encoding}")
