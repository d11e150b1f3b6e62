from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtimes.errors import InputError
from runtimes.preprocess import ImageSpec, TextSpec, encode_images, spec_from_dict


def test_paths_pil_and_arrays_encode_identically(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    spec = ImageSpec(size=(16, 16))
    a = encode_images(spec, [img])["pixel_values"]
    b = encode_images(spec, [Image.open(path)])["pixel_values"]
    c = encode_images(spec, [str(path)])["pixel_values"]
    assert a.shape == (1, 3, 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert -1.0 <= a.min() and a.max() <= 1.0


def test_grayscale_is_repeated_and_normalised() -> None:
    gray = np.full((8, 8), 255, dtype=np.uint8)
    out = encode_images(ImageSpec(size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3), [gray])["pixel_values"]
    assert np.allclose(out, 2.0)


@pytest.mark.parametrize("bad, words", [
    (np.zeros((4, 4), dtype=np.float32), "must be uint8"),
    (np.zeros((4, 4, 2), dtype=np.uint8), "1, 3 or 4 channels"),
    (np.zeros((2, 4, 4, 3), dtype=np.uint8), "HW or HWC"),
    (42, "expected an image"),
])
def test_bad_images(bad, words: str) -> None:
    with pytest.raises(InputError, match=words):
        encode_images(ImageSpec(size=(8, 8)), [bad])


def test_corrupt_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="cannot read image"):
        encode_images(ImageSpec(size=(8, 8)), [str(p)])


def test_spec_round_trip() -> None:
    for spec in (ImageSpec(size=(32, 24), mean=(0.1, 0.2, 0.3)), TextSpec("tokenizer.json", max_length=40, pad_id=1)):
        assert spec_from_dict(spec.to_dict()) == spec
