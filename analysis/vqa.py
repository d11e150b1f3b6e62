"""Visual question answering data: an image, a question about it, and an answer from a fixed set.

Specs (see ``analysis.data``)::

    vqa-digits      scikit-learn's 1,797 real 8x8 digit images (the ``digits`` source), each with
                    QUESTIONS_PER_IMAGE templated questions: which digit is this, is it even / odd,
                    is it larger / smaller than n, is it a n; answers "0".."9", "yes", "no"
    vqa:PATH        a JSONL file, one object per line: {"image": ..., "question": ..., "answer": ...};
                    image paths are relative to the JSONL file's folder

Items are ``(image, question)`` pairs (a uint8 array or an image path, and a string). Every row
records the image it asks about in ``Dataset.groups``, so the splits keep all questions about one
image in one split: a model is never tested on an image it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analysis.dataset import Dataset, digit_images
from analysis.jsonl import jsonl_objects
from runtimes.errors import DataError

__all__ = ["DIGIT_ANSWERS", "QUESTIONS_PER_IMAGE", "digit_questions", "load_vqa_digits", "load_vqa_jsonl"]

DIGIT_ANSWERS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "yes", "no")
QUESTIONS_PER_IMAGE = 4  # the first asks which digit it is; the others are drawn yes/no questions
_SEED = 20240  # the questions are part of the data set: one fixed draw


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def digit_questions(digit: int, rng: np.random.Generator, n: int = QUESTIONS_PER_IMAGE) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs about an image of ``digit``; the yes/no kinds are drawn so
    that yes and no are about equally likely."""
    out = [("which digit is this?", str(digit))]
    kinds = rng.choice(5, size=n - 1, replace=n - 1 > 5)
    for kind in kinds:
        if kind == 0:
            out.append(("is this digit even?", _yes_no(digit % 2 == 0)))
        elif kind == 1:
            out.append(("is this digit odd?", _yes_no(digit % 2 == 1)))
        elif kind == 2:
            k = int(rng.integers(0, 9))  # 0..8: "larger than 9" would always be no
            out.append((f"is it larger than {k}?", _yes_no(digit > k)))
        elif kind == 3:
            k = int(rng.integers(1, 10))
            out.append((f"is it smaller than {k}?", _yes_no(digit < k)))
        else:
            k = digit if rng.random() < 0.5 else int((digit + rng.integers(1, 10)) % 10)
            out.append((f"is this a {k}?", _yes_no(k == digit)))
    return out


def _build(spec: str, items: list[Any], answers: list[str], groups: list[int], names: tuple[str, ...]) -> Dataset:
    if not items:
        raise DataError(f"data set {spec!r} is empty")
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[a] for a in answers], dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise DataError(f"data set {spec!r} has 1 distinct answer; answering needs at least 2")
    return Dataset(spec, "image-text", items, labels, names, groups=np.asarray(groups, dtype=np.int64))


def load_vqa_digits(spec: str) -> Dataset:
    images, digits = digit_images("vqa-digits")
    rng = np.random.default_rng(_SEED)
    items, answers, groups = [], [], []
    for i, (image, digit) in enumerate(zip(images, digits)):
        for question, answer in digit_questions(int(digit), rng):
            items.append((image, question))
            answers.append(answer)
            groups.append(i)
    return _build(spec, items, answers, groups, DIGIT_ANSWERS)


def load_vqa_jsonl(spec: str, path: Path) -> Dataset:
    """Rows of ``{"image", "question", "answer"}``; answers become the classes, sorted."""
    if not path.is_file():
        raise DataError(f"VQA file {path} does not exist")
    rows = []
    for n, row in jsonl_objects(path, "image, question, answer"):
        missing = [k for k in ("image", "question", "answer") if row.get(k) in (None, "")]
        if missing:
            raise DataError(f"{path} line {n} has no {', '.join(repr(k) for k in missing)} field "
                            "(each line needs image, question and answer)")
        rows.append((n, row))
    if not rows:
        raise DataError(f"data set {spec!r} is empty")
    base, image_ids, items, answers, groups = path.parent, {}, [], [], []
    for n, row in rows:
        image = (base / str(row["image"])).resolve()
        if not image.is_file():
            raise DataError(f"{path} line {n}: image {row['image']} not found (paths are relative to {base})")
        items.append((str(image), str(row["question"])))
        answers.append(str(row["answer"]).strip())
        groups.append(image_ids.setdefault(str(image), len(image_ids)))
    names = sorted(set(answers))
    if all(a.lstrip("-").isdigit() for a in names):
        names.sort(key=int)
    return _build(spec, items, answers, groups, tuple(names))
