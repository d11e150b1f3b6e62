"""Visual question answering data: vqa-digits (templated questions on real digit images) and vqa:PATH."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.data import load_dataset, make_splits
from analysis.vqa import DIGIT_ANSWERS, QUESTIONS_PER_IMAGE
from runtimes.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def vqa():
    return load_dataset("vqa-digits")


def _truth(digit: int, question: str) -> str:
    """The answer, worked out from the question text alone."""
    if question == "which digit is this?":
        return str(digit)
    n = int(re.findall(r"\d", question)[0]) if re.search(r"\d", question) else None
    checks = {"even": digit % 2 == 0, "odd": digit % 2 == 1, "larger": n is not None and digit > n,
              "smaller": n is not None and digit < n, "a ": n == digit}
    word = next(w for w in ("even", "odd", "larger", "smaller", "a ") if w in question)
    return "yes" if checks[word] else "no"


def test_vqa_digits_asks_about_the_real_digit_images(vqa) -> None:
    digits = load_dataset("digits")
    assert vqa.modality == "image-text" and vqa.label_names == DIGIT_ANSWERS
    assert len(vqa) == QUESTIONS_PER_IMAGE * len(digits)
    for row in range(0, len(vqa), 97):
        image, question = vqa.items[row]
        g = int(vqa.groups[row])
        assert np.array_equal(image, digits.items[g])  # the same pixels as the digits set
        digit = int(digits.label_names[digits.labels[g]])
        assert vqa.label_names[vqa.labels[row]] == _truth(digit, question), question
    yes, no = ((vqa.labels == DIGIT_ANSWERS.index(a)).mean() for a in ("yes", "no"))
    assert abs(yes - no) < 0.1  # yes/no questions are balanced, so "always yes" is no shortcut


def test_vqa_digits_is_deterministic(vqa) -> None:
    again = load_dataset("vqa-digits")
    assert [q for _, q in again.items] == [q for _, q in vqa.items]
    assert np.array_equal(again.labels, vqa.labels) and np.array_equal(again.groups, vqa.groups)


def test_splits_keep_every_image_in_one_split(vqa) -> None:
    a = make_splits(vqa.labels, seed=0, groups=vqa.groups)
    b = make_splits(vqa.labels, seed=0, groups=vqa.groups)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    images = {k: set(vqa.groups[v].tolist()) for k, v in a.items()}
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(len(vqa)))
    assert len(images["test"]) == pytest.approx(0.2 * 1797, abs=10)
    limited = load_dataset("vqa-digits?limit=300")  # a subset keeps each row's image
    assert len(limited) == 300 and limited.groups is not None
    split = make_splits(limited.labels, groups=limited.groups)
    assert not set(limited.groups[split["train"]].tolist()) & set(limited.groups[split["test"]].tolist())


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_vqa_jsonl_reads_images_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 80 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    rows = [{"image": f"img/{i}.png", "question": q, "answer": a}
            for i in range(3) for q, a in (("is it dark?", "yes" if i == 0 else "no"), ("how bright?", str(i)))]
    ds = load_dataset(f"vqa:{_write(tmp_path / 'qa.jsonl', rows)}")
    assert ds.modality == "image-text" and len(ds) == 6
    assert ds.label_names == ("0", "1", "2", "no", "yes")
    assert Path(ds.items[0][0]) == (tmp_path / "img" / "0.png").resolve() and ds.items[0][1] == "is it dark?"
    assert ds.groups.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("rows, words", [
    ([], "is empty"),
    (["\n"], "is empty"),
    ([{"image": "img/0.png", "answer": "yes"}], "no 'question' field"),
    ([{"image": "img/0.png", "question": "q?", "answer": ""}], "no 'answer' field"),
    ([{"question": "q?", "answer": "yes"}], "no 'image' field"),
    ([{"image": "img/missing.png", "question": "q?", "answer": "yes"}], "not found"),
    (["{not json"], "not valid JSON"),
    ([[1, 2]], "expected an object"),
    ([{"image": "img/0.png", "question": "q?", "answer": "yes"}] * 2, "1 distinct answer"),
])
def test_vqa_jsonl_errors_are_one_line_data_errors(tmp_path: Path, rows: list, words: str) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "img" / "0.png")
    with pytest.raises(DataError, match=words) as info:
        load_dataset(f"vqa:{_write(tmp_path / 'qa.jsonl', rows)}")
    assert "\n" not in str(info.value)


def test_vqa_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"vqa:{tmp_path}/none.jsonl")
    with pytest.raises(ConfigError, match="unknown data spec"):
        load_dataset("vqa-digits:extra")
