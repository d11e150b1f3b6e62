"""Image-to-text data: an image, an optional prompt, and a target text a decoder writes word by word.

Specs (see ``analysis.data``)::

    captions-digits   scikit-learn's 1,797 real 8x8 digit images (the ``digits`` source), each with
                      CAPTIONS_PER_IMAGE samples from one fixed draw: a caption with an empty prompt
                      ("a handwritten four . it is even .") and two prompted answers
                      ("is it larger than 6 ?" -> "no , four is smaller than six ."); targets run
                      from 4 to 14 words, labels are the digits "0".."9"
    captions:PATH     a JSONL file, one object per line: {"image": ..., "text": ..., "prompt": ...}
                      ("prompt" optional); image paths are relative to the JSONL file's folder;
                      labels are all 0 with the one label name "text"

Items are ``(image, prompt)`` pairs (a uint8 array or an image path, and a string, "" when there is
no prompt); ``Dataset.targets`` holds each row's target text. Texts are lowercase words separated by
single spaces, punctuation a word of its own. A decoder consumes a row as the prompt's tokens (none
when the prompt is empty), then the target's tokens, then end-of-sequence: it is conditioned on the
image and the prompt and trained to write the target and stop. ``caption_texts`` gives the words of
each row (prompt, then target) to learn a tokenizer from the training rows.

In ``captions-digits`` some target words are fixed by the image (which digit, even or odd, larger or
smaller than n) and the rest by the template (grammar), so an early-exit decoder meets easy tokens
and hard ones. Every row records its image in ``Dataset.groups``, so the splits keep all samples of
one image in one split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analysis.dataset import Dataset, digit_images
from analysis.jsonl import jsonl_objects
from runtimes.errors import ConfigError, DataError

__all__ = ["CAPTIONS_PER_IMAGE", "NUMBER_WORDS", "digit_captions", "load_captions_digits", "load_captions_jsonl",
           "caption_texts"]

CAPTIONS_PER_IMAGE = 3  # one caption with an empty prompt, then two prompted answers
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_NAMES = tuple(str(d) for d in range(10))
_SEED = 20241  # the texts are part of the data set: one fixed draw

# {w} the digit's word, {a} its article ("a" / "an"), {p} even / odd, {c} larger / smaller, {n} another digit's word
CAPTIONS = (
    "a handwritten {w} .",
    "a handwritten {w} . it is {p} .",
    "the digit {w} , an {p} number {c} than {n} .",
    "this image shows the digit {w} , written by hand .",
    "a small image of a handwritten {w} , which is an {p} number .",
    "a tiny picture of the number {w} , {p} and {c} than {n} .",
)
WHICH_ANSWERS = ("it is {a} {w} .", "the digit is {w} .", "this is a handwritten {w} .")
DESCRIBE_ANSWERS = ("it is the number {w} , an {p} number .", "{a} {w} , which is {p} and {c} than {n} .")
QUESTION_KINDS = 7  # which, even, odd, larger, smaller, is-this-a, describe


def _article(word: str) -> str:
    return "an" if word in ("eight", "8") else "a"  # "an eight", "an 8"; "a one"


def _other(digit: int, rng: np.random.Generator) -> int:
    return int((digit + rng.integers(1, 10)) % 10)  # any digit but this one, uniformly


def _fill(template: str, digit: int, other: int) -> str:
    w = NUMBER_WORDS[digit]
    return template.format(w=w, a=_article(w), p="even" if digit % 2 == 0 else "odd",
                           c="larger" if digit > other else "smaller", n=NUMBER_WORDS[other])


def digit_captions(digit: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """CAPTIONS_PER_IMAGE (prompt, target) pairs about an image of ``digit``: a caption with an
    empty prompt, then two questions of different kinds with their answers in words."""
    w = NUMBER_WORDS[digit]
    out = [("", _fill(CAPTIONS[int(rng.integers(len(CAPTIONS)))], digit, _other(digit, rng)))]
    for kind in rng.choice(QUESTION_KINDS, size=CAPTIONS_PER_IMAGE - 1, replace=False):
        k = _other(digit, rng)
        if kind == 0:
            out.append(("what digit is this ?", _fill(WHICH_ANSWERS[int(rng.integers(len(WHICH_ANSWERS)))], digit, k)))
        elif kind in (1, 2):
            asked = "even" if kind == 1 else "odd"
            holds = (digit % 2 == 0) == (asked == "even")
            out.append((f"is it {asked} ?", _fill(("yes" if holds else "no") + " , {w} is {p} .", digit, k)))
        elif kind in (3, 4):
            asked = "larger" if kind == 3 else "smaller"
            # never "larger than 9" or "smaller than 0": the prompt alone would give the answer away
            k = int(rng.choice([x for x in (range(9) if kind == 3 else range(1, 10)) if x != digit]))
            holds = (digit > k) == (asked == "larger")
            out.append((f"is it {asked} than {k} ?", _fill(("yes" if holds else "no") + " , {w} is {c} than {n} .",
                                                           digit, k)))
        elif kind == 5:
            k = digit if rng.random() < 0.5 else k  # yes and no about equally likely
            if k == digit:
                target = f"yes , it is {_article(w)} {w} ."
            else:
                target = f"no , it is not {_article(NUMBER_WORDS[k])} {NUMBER_WORDS[k]} , it is {_article(w)} {w} ."
            out.append((f"is this {_article(str(k))} {k} ?", target))
        else:
            out.append(("describe the digit .", _fill(DESCRIBE_ANSWERS[int(rng.integers(len(DESCRIBE_ANSWERS)))],
                                                      digit, k)))
    return out


def _build(spec: str, items: list[Any], targets: list[str], labels: list[int], names: tuple[str, ...],
           groups: list[int]) -> Dataset:
    if not items:
        raise DataError(f"data set {spec!r} is empty")
    return Dataset(spec, "image-to-text", items, np.asarray(labels, dtype=np.int64), names,
                   groups=np.asarray(groups, dtype=np.int64), targets=tuple(targets))


def load_captions_digits(spec: str) -> Dataset:
    images, digits = digit_images("captions-digits")
    rng = np.random.default_rng(_SEED)
    items, targets, labels, groups = [], [], [], []
    for i, (image, digit) in enumerate(zip(images, digits)):
        for prompt, target in digit_captions(int(digit), rng):
            items.append((image, prompt))
            targets.append(target)
            labels.append(int(digit))
            groups.append(i)
    return _build(spec, items, targets, labels, DIGIT_NAMES, groups)


def _field(path: Path, n: int, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{path} line {n} has no {key!r} field (each line needs image and text; prompt is optional)")
    if not isinstance(value, str):
        raise DataError(f"{path} line {n}: {key!r} must be a string, got {type(value).__name__}")
    return value.strip()


def load_captions_jsonl(spec: str, path: Path) -> Dataset:
    """Rows of ``{"image", "text"}`` with an optional ``"prompt"``; one label, ``"text"``."""
    if not path.is_file():
        raise DataError(f"captions file {path} does not exist or is not a file")
    rows = []
    for n, row in jsonl_objects(path, "image, text and an optional prompt"):
        image, text = _field(path, n, row, "image"), _field(path, n, row, "text")
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{path} line {n}: 'prompt' must be a string, got {type(prompt).__name__}")
        rows.append((n, image, " ".join(text.split()), " ".join((prompt or "").split())))
    if not rows:
        raise DataError(f"data set {spec!r} is empty")
    base, image_ids, items, targets, groups = path.parent, {}, [], [], []
    for n, image, text, prompt in rows:
        resolved = (base / image).resolve()
        if not resolved.is_file():
            raise DataError(f"{path} line {n}: image {image} not found (paths are relative to {base})")
        items.append((str(resolved), prompt))
        targets.append(text)
        groups.append(image_ids.setdefault(str(resolved), len(image_ids)))
    return _build(spec, items, targets, [0] * len(items), ("text",), groups)


def caption_texts(ds: Dataset) -> list[str]:
    """Each row's words, prompt then target, one string a row (for learning a tokenizer)."""
    if ds.targets is None:
        raise ConfigError(f"data set {ds.spec!r} holds {ds.modality} data without target texts; "
                          "use an image-to-text set such as 'captions-digits' or 'captions:PATH'")
    return [f"{prompt} {target}".strip() for (_, prompt), target in zip(ds.items, ds.targets)]
