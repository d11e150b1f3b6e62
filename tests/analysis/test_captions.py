"""Image-to-text data: captions-digits (templated captions and answers on real digit images) and captions:PATH."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.captions import CAPTIONS_PER_IMAGE, NUMBER_WORDS, caption_texts
from analysis.data import load_dataset, make_splits
from runtimes.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def caps():
    return load_dataset("captions-digits")


def test_captions_digits_describes_the_real_digit_images(caps) -> None:
    digits = load_dataset("digits")
    assert caps.modality == "image-to-text" and caps.label_names == tuple(str(d) for d in range(10))
    assert len(caps) == CAPTIONS_PER_IMAGE * len(digits) == 1797 * 3
    assert caps.targets is not None and len(caps.targets) == len(caps)
    for row in range(0, len(caps), 53):
        image, _ = caps.items[row]
        g = int(caps.groups[row])
        assert np.array_equal(image, digits.items[g])  # the same pixels as the digits set
        assert caps.labels[row] == int(digits.label_names[digits.labels[g]])
    assert caps.groups.tolist() == np.repeat(np.arange(len(digits)), CAPTIONS_PER_IMAGE).tolist()


def test_captions_digits_is_deterministic(caps) -> None:
    again = load_dataset("captions-digits")
    assert [p for _, p in again.items] == [p for _, p in caps.items]
    assert again.targets == caps.targets
    assert np.array_equal(again.labels, caps.labels) and np.array_equal(again.groups, caps.groups)


def test_every_target_tells_the_truth_about_its_digit(caps) -> None:
    for (_, prompt), target, label in zip(caps.items, caps.targets, caps.labels):
        digit, words = int(label), target.split()
        assert NUMBER_WORDS[digit] in words, target  # every template names the digit
        assert target == target.lower() and target.endswith(" .") and "  " not in target
        parity = "even" if digit % 2 == 0 else "odd"
        assert ({"even", "odd"} & set(words)) <= {parity}, target
        for cmp, other in re.findall(r"(larger|smaller) than (\w+)", target):
            k = NUMBER_WORDS.index(other)
            assert k != digit and (digit > k) == (cmp == "larger"), target
        if prompt.startswith("is "):
            asked = re.fullmatch(r"is (?:it|this) (?:an? )?(even|odd|larger than \d|smaller than \d|\d) \?", prompt)
            assert asked, prompt
            q = asked.group(1)
            truth = (q == parity if q in ("even", "odd") else
                     digit > int(q[-1]) if q.startswith("larger") else
                     digit < int(q[-1]) if q.startswith("smaller") else digit == int(q))
            assert words[0] == ("yes" if truth else "no"), (prompt, target)
        elif prompt == "what digit is this ?":
            assert words[-2] == NUMBER_WORDS[digit]


def test_targets_vary_in_length_and_prompts_are_mixed(caps) -> None:
    lengths = [len(t.split()) for t in caps.targets]
    assert len(set(lengths)) >= 5 and min(lengths) >= 4 and max(lengths) <= 14
    prompts = [p for _, p in caps.items]
    assert prompts[::CAPTIONS_PER_IMAGE] == [""] * 1797  # the first sample of each image is a caption
    assert all(p for i, p in enumerate(prompts) if i % CAPTIONS_PER_IMAGE)
    assert len(set(prompts)) > 10
    yes = sum(t.startswith("yes ") for t in caps.targets)
    no = sum(t.startswith("no ") for t in caps.targets)
    assert yes > 0 and no > 0 and abs(yes - no) < 0.25 * (yes + no)


def test_splits_keep_every_image_in_one_split(caps) -> None:
    split = make_splits(caps.labels, seed=0, groups=caps.groups)
    assert all(len(split[s]) for s in split)
    images = {k: set(caps.groups[v].tolist()) for k, v in split.items()}
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(len(caps)))
    assert all(len(v) % CAPTIONS_PER_IMAGE == 0 for v in split.values())  # whole images only


def test_limit_and_subset_keep_the_targets(caps) -> None:
    limited = load_dataset("captions-digits?limit=300")
    assert len(limited) == 300 and len(limited.targets) == 300 and limited.groups is not None
    assert len(np.unique(limited.labels)) == 10  # still stratified by digit
    rows = {(int(g), p): i for i, (g, (_, p)) in enumerate(zip(caps.groups, caps.items))}  # prompts differ per image
    for g, (image, prompt), target in zip(limited.groups, limited.items, limited.targets):
        row = rows[int(g), prompt]
        assert np.array_equal(caps.items[row][0], image) and caps.targets[row] == target
    sub = caps.subset([5, 0, 7])
    assert sub.targets == (caps.targets[5], caps.targets[0], caps.targets[7])
    assert [p for _, p in sub.items] == [caps.items[i][1] for i in (5, 0, 7)]


def test_caption_texts_is_prompt_then_target(caps) -> None:
    texts = caption_texts(caps.subset([0, 1]))
    assert texts[0] == caps.targets[0]  # empty prompt: the target alone
    assert texts[1] == f"{caps.items[1][1]} {caps.targets[1]}"
    with pytest.raises(ConfigError, match="without target texts"):
        caption_texts(load_dataset("digits?limit=20"))


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _images(root: Path, n: int) -> None:
    (root / "img").mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8), 80 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")


def test_captions_jsonl_reads_images_relative_to_the_file(tmp_path: Path) -> None:
    _images(tmp_path, 3)
    rows = [{"image": "img/0.png", "text": "a black square ."},
            {"image": "img/0.png", "text": "it is black .", "prompt": "what colour is it ?"},
            "",
            {"image": "img/1.png", "text": "a  grey square .", "prompt": ""},
            {"image": "img/2.png", "text": "a light grey square .", "prompt": None},
            {"image": "img/2.png", "text": "yes .", "prompt": "is it light ?"}]
    ds = load_dataset(f"captions:{_write(tmp_path / 'caps.jsonl', rows)}")
    assert ds.modality == "image-to-text" and len(ds) == 5
    assert ds.label_names == ("text",) and ds.labels.tolist() == [0] * 5
    assert Path(ds.items[0][0]) == (tmp_path / "img" / "0.png").resolve()
    assert [p for _, p in ds.items] == ["", "what colour is it ?", "", "", "is it light ?"]
    assert ds.targets == ("a black square .", "it is black .", "a grey square .", "a light grey square .", "yes .")
    assert ds.groups.tolist() == [0, 0, 1, 2, 2]
    split = make_splits(ds.labels, groups=ds.groups)  # one label: still three splits, whole images
    assert all(len(split[s]) for s in split)
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(5))
    assert split_images_disjoint(ds.groups, split)
    assert caption_texts(ds)[1] == "what colour is it ? it is black ."
    assert len(load_dataset(f"captions:{tmp_path / 'caps.jsonl'}?limit=2")) == 2


def split_images_disjoint(groups: np.ndarray, split: dict) -> bool:
    seen = [set(groups[v].tolist()) for v in split.values()]
    return all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])


GOOD = {"image": "img/0.png", "text": "a dark square ."}


@pytest.mark.parametrize("rows, words", [
    ([], "is empty"),
    (["", "  "], "is empty"),
    ([GOOD, "{not json"], "line 2 is not valid JSON"),
    ([GOOD, GOOD, [1, 2]], "line 3: expected an object"),
    ([GOOD, {"text": "a square ."}], "line 2 has no 'image' field"),
    ([{"image": "", "text": "a square ."}], "line 1 has no 'image' field"),
    ([GOOD, "", {"image": "img/0.png"}], "line 3 has no 'text' field"),
    ([{"image": "img/0.png", "text": "  "}], "line 1 has no 'text' field"),
    ([{"image": "img/0.png", "text": 7}], "line 1: 'text' must be a string"),
    ([GOOD, {**GOOD, "prompt": 3}], "line 2: 'prompt' must be a string"),
    ([GOOD, {**GOOD, "prompt": ["q"]}], "line 2: 'prompt' must be a string"),
    ([GOOD, {"image": "img/missing.png", "text": "a square ."}], "line 2: image img/missing.png not found"),
])
def test_captions_jsonl_errors_are_one_line_data_errors(tmp_path: Path, rows: list, words: str) -> None:
    _images(tmp_path, 1)
    path = _write(tmp_path / "caps.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(words)) as info:
        load_dataset(f"captions:{path}")
    assert "\n" not in str(info.value)
    if "line" in words:
        assert str(path) in str(info.value)


def test_captions_jsonl_bad_encoding_names_the_line(tmp_path: Path) -> None:
    _images(tmp_path, 1)
    path = tmp_path / "caps.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"image": "img/0.png", "text": "\xff"}\n')
    with pytest.raises(DataError, match="line 2 is not valid utf-8"):
        load_dataset(f"captions:{path}")


def test_captions_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist or is not a file"):
        load_dataset(f"captions:{tmp_path}/none.jsonl")
    with pytest.raises(DataError, match="is not a file"):
        load_dataset(f"captions:{tmp_path}")  # a folder
    with pytest.raises(ConfigError, match="unknown data spec .*'captions-digits'"):
        load_dataset("captions-digits:extra")
    with pytest.raises(ConfigError, match="unknown data spec"):
        load_dataset("captions")
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset("captions-digits?text=x")
