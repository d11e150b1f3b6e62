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


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A real 1x1 PNG whose header (CRC fixed) claims ``width`` x ``height`` pixels."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 12  # 8-byte signature, 4-byte length, then b"IHDR"
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))


def test_decompression_bombs_are_input_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    spec = ImageSpec(size=(8, 8))
    _png_claiming(tmp_path / "bomb.png", 100_000, 100_000)  # past twice Pillow's limit: DecompressionBombError
    with pytest.raises(InputError, match="cannot read image .*bomb.png.*decompression bomb"):
        encode_images(spec, [str(tmp_path / "bomb.png")])
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: past the limit, under twice it: a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(InputError, match="cannot read image .*big.png"):
            encode_images(spec, [str(tmp_path / "big.png")])


def _modes() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Mode -> (a real Pillow image of that mode, the HW or HWC uint8 pixels it must read as)."""
    sixteen = np.array([[0, 128, 129, 257], [1000, 32768, 65407, 65535]], np.uint16)
    want16 = np.array([[0, 0, 1, 1], [4, 128, 255, 255]], np.uint8)  # value / 257, rounded; never clipped at 255
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 transparent: its colour is kept, the alpha dropped
    gray_alpha = Image.merge("LA", (Image.fromarray(np.array([[0, 90], [200, 255]], np.uint8)),
                                    Image.fromarray(np.array([[0, 0], [255, 7]], np.uint8))))
    bits = Image.new("1", (3, 1))
    bits.putpixel((1, 0), 1)
    return {
        "I;16": (Image.fromarray(sixteen), want16),
        "I": (Image.fromarray(sixteen.astype(np.int32)), want16),
        "F": (Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)), np.array([[0, 64, 128, 255]], np.uint8)),
        "P": (palette, np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], np.uint8)),
        "LA": (gray_alpha, np.array([[0, 90], [200, 255]], np.uint8)),
        # (255 - C) * (255 - K) / 255 per channel
        "CMYK": (Image.new("CMYK", (1, 1), (51, 102, 0, 128)), np.array([[[102, 76, 127]]], np.uint8)),
        "1": (bits, np.array([[0, 255, 0]], np.uint8)),
    }


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "LA", "CMYK", "1"])
def test_pixel_formats_read_faithfully(tmp_path: Path, mode: str) -> None:
    from runtimes.preprocess import _to_uint8_hwc

    img, want = _modes()[mode]
    assert img.mode == mode
    want = want[:, :, None] if want.ndim == 2 else want
    assert np.array_equal(_to_uint8_hwc(img), want)
    path = tmp_path / ("x.tif" if mode in ("F", "I", "CMYK") else "x.png")  # a format that stores the mode as is
    img.save(path)
    assert np.array_equal(_to_uint8_hwc(str(path)), want)
    spec = ImageSpec(size=want.shape[:2], mean=(0.0,) * 3, std=(1.0,) * 3, resample="nearest")
    rgb = np.repeat(want, 3, axis=2) if want.shape[2] == 1 else want[:, :, :3]  # alpha dropped, gray repeated
    assert np.array_equal(encode_images(spec, [path])["pixel_values"][0], rgb.transpose(2, 0, 1) / np.float32(255))


@pytest.mark.parametrize("values, words", [
    (np.array([[0.0, 255.0]], np.float32), r"mode F\) must hold values in \[0, 1\]; this one holds 0..255"),
    (np.array([[0.0, np.nan]], np.float32), "NaN or Inf"),
    (np.array([[-1, 70000]], np.int32), r"mode I\) is read as 16-bit .* holds -1..70000"),
])
def test_pixel_formats_that_cannot_be_read_faithfully_are_refused(values: np.ndarray, words: str) -> None:
    with pytest.raises(InputError, match=words):
        encode_images(ImageSpec(size=(8, 8)), [Image.fromarray(values)])
