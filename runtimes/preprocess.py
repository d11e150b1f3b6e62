"""Turn raw inputs (images, text, or an image with a question) into the arrays a model's first
segment takes.

Training, export validation, calibration and the runtime all call these functions, so a model
sees exactly the same numbers in every stage of its life. Only numpy, Pillow and (for text) the
``tokenizers`` library are used: no torch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtimes.errors import ConfigError, InputError

__all__ = ["ImageSpec", "TextSpec", "ImageTextSpec", "Spec", "spec_from_dict", "encode_images", "TextEncoder",
           "ImageTextEncoder", "make_encoder"]

_RESAMPLE = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes ``pixel_values``: resize, scale to [0, 1], normalise, NCHW float32.

    Images are read as 8-bit: 16-bit gray is scaled by its full range (value / 257), float images
    (Pillow mode F) must lie in [0, 1], alpha is dropped; see ``_pil_to_array``."""

    size: tuple[int, int]  # (height, width) in pixels, the model's input size
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per channel, applied after scaling to [0, 1]
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    channels: int = 3  # grayscale inputs are repeated, alpha is dropped
    resample: str = "bilinear"  # Pillow filter used for resizing
    input_name: str = "pixel_values"
    kind: str = field(default="image", init=False)

    def __post_init__(self) -> None:
        if self.resample not in _RESAMPLE:
            raise ConfigError(f"image resample must be one of {_RESAMPLE}, got {self.resample!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"image mean/std need {self.channels} values each")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TextSpec:
    """How text becomes ``input_ids`` and ``attention_mask``: the model's own tokenizer, padded."""

    tokenizer_file: str  # tokenizer.json (Hugging Face `tokenizers` format), relative to its dir
    max_length: int  # every sequence is truncated and padded to this many tokens
    pad_id: int = 0
    input_names: tuple[str, str] = ("input_ids", "attention_mask")
    kind: str = field(default="text", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageTextSpec:
    """An image and a question about it (vision-language models): each encoded by its own spec,
    the arrays of both go to the model. Raw inputs are ``(image, question)`` pairs."""

    image: ImageSpec
    text: TextSpec
    kind: str = field(default="image-text", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "image": self.image.to_dict(), "text": self.text.to_dict()}


Spec = ImageSpec | TextSpec | ImageTextSpec


def spec_from_dict(data: dict[str, Any]) -> Spec:
    """Rebuild a preprocessing spec from its ``to_dict()`` form."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind == "image-text":
        image, text = spec_from_dict(data["image"]), spec_from_dict(data["text"])
        if not isinstance(image, ImageSpec) or not isinstance(text, TextSpec):
            raise ConfigError("an image-text spec needs an 'image' and a 'text' part")
        return ImageTextSpec(image, text)
    if kind == "image":
        return ImageSpec(
            size=tuple(data["size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            channels=int(data["channels"]),
            resample=data["resample"],
            input_name=data["input_name"],
        )
    if kind == "text":
        return TextSpec(
            tokenizer_file=data["tokenizer_file"],
            max_length=int(data["max_length"]),
            pad_id=int(data["pad_id"]),
            input_names=tuple(data["input_names"]),
        )
    raise ConfigError(f"unknown preprocessing kind {kind!r}: expected 'image', 'text' or 'image-text'")


# Pillow modes read as they are; every other mode is converted by what its numbers mean (below)
_PLAIN_MODES = ("L", "RGB", "RGBA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _pil_to_array(img: Any) -> np.ndarray:
    """A PIL image -> an HW or HWC uint8 array, faithful to its mode: never clipped, never blackened.

    16-bit gray (I;16, and I holding 0..65535) is scaled by its full range (value / 257, rounded);
    32-bit float (F) must lie in [0, 1] and is scaled by 255; alpha (LA, PA, P with transparency)
    is dropped, as for RGBA (P with transparency keeps its palette colours); "1" reads as 0 / 255;
    CMYK, YCbCr and the rest go through Pillow's RGB conversion; a mode it cannot convert is an
    InputError."""
    mode = img.mode
    if mode in _PLAIN_MODES:
        return np.asarray(img)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        a = np.asarray(img)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise InputError(f"a 32-bit integer image (mode I) is read as 16-bit (0..65535); this one holds "
                             f"{lo}..{hi}: scale it to 8 bits (uint8) yourself")
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # value / 257, rounded: 65535 -> 255
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            found = "NaN or Inf" if not np.isfinite(a).all() else f"{a.min():g}..{a.max():g}"
            raise InputError(f"a 32-bit float image (mode F) must hold values in [0, 1]; this one holds {found}: "
                             "scale it to [0, 1] or to 8 bits (uint8) yourself")
        return np.round(a * 255.0).astype(np.uint8)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode in ("LA", "La"):  # gray with alpha: the gray, unpremultiplied (La), alpha dropped
        return np.asarray(img.convert("LA") if mode == "La" else img)[:, :, 0]
    has_alpha = mode in ("PA", "RGBa") or (mode == "P" and "transparency" in img.info)
    try:
        return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except ValueError as exc:  # a mode Pillow cannot convert to RGB
        raise InputError(f"images of mode {mode} are not supported ({exc}); convert it to RGB first") from None


def _to_uint8_hwc(item: Any) -> np.ndarray:
    """Accept a path, an encoded image file's bytes (PNG, JPEG, ...), a PIL image or an HW / HWC
    uint8 array; return an HWC uint8 array."""
    if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
        import io

        from PIL import Image

        encoded = not isinstance(item, (str, os.PathLike))
        try:
            with Image.open(io.BytesIO(bytes(item)) if encoded else item) as img:
                img.load()
                item = _pil_to_array(img)
        except InputError:
            raise
        except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error, and
            # DecompressionBombError (or its warning, when warnings are errors): each means this file cannot be used
            reason = " ".join(str(exc).split()) or type(exc).__name__
            what = f"{len(item)} bytes of image data" if encoded else os.fspath(item)
            reason = reason.split(" <_io.")[0]  # Pillow names the in-memory file by its repr
            raise InputError(f"cannot read image from {what}: {reason}" if encoded
                             else f"cannot read image {what}: {reason}") from exc
    if hasattr(item, "mode") and hasattr(item, "size"):  # a PIL image
        item = _pil_to_array(item)
    if not isinstance(item, np.ndarray):
        raise InputError(f"expected an image path, encoded image bytes, a PIL image or a uint8 array, got "
                         f"{type(item).__name__}")
    if item.dtype != np.uint8:
        raise InputError(
            f"image arrays must be uint8 (HW or HWC), got {item.dtype}; pass already-normalised "
            "float tensors as a dict of model inputs instead"
        )
    if item.ndim == 2:
        item = item[:, :, None]
    if item.ndim != 3 or item.shape[2] not in (1, 3, 4) or min(item.shape[:2]) < 1:
        raise InputError(f"image arrays must be HW or HWC with 1, 3 or 4 channels, got shape {item.shape}")
    return item


def _resize(img: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    if img.shape[:2] == tuple(size):
        return img
    from PIL import Image

    filt = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC}[resample]
    channels = [np.asarray(Image.fromarray(img[:, :, c]).resize(size[::-1], filt)) for c in range(img.shape[2])]
    return np.stack(channels, axis=2)


def encode_images(spec: ImageSpec, items: Sequence[Any]) -> dict[str, np.ndarray]:
    """Images -> ``{spec.input_name: float32 (B, C, H, W)}``."""
    out = np.empty((len(items), spec.channels, *spec.size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    for i, item in enumerate(items):
        img = _to_uint8_hwc(item)
        if img.shape[2] == 4:
            img = img[:, :, :3]
        if img.shape[2] != spec.channels:
            img = np.repeat(img[:, :, :1], spec.channels, axis=2) if img.shape[2] == 1 else img.mean(
                axis=2, keepdims=True).round().astype(np.uint8)
        img = _resize(img, spec.size, spec.resample)
        out[i] = (img.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
    return {spec.input_name: out}


def _as_text(item: str | bytes, index: int) -> str:
    if isinstance(item, (bytes, bytearray)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"text input {index} is not valid UTF-8 ({exc.reason} at byte {exc.start}); decode it "
                             "with its real encoding first") from None
    if not isinstance(item, str):
        raise InputError(f"text inputs must be str (or UTF-8 bytes), got {type(item).__name__}")
    return item


class TextEncoder:
    """Tokenise text with the tokenizer file a run dir or bundle carries."""

    def __init__(self, spec: TextSpec, base_dir: str | os.PathLike) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("text models need the 'tokenizers' package: pip install 'freedeploy[text]'") from exc
        path = Path(base_dir) / spec.tokenizer_file
        if not path.is_file():
            raise ConfigError(f"tokenizer file {path} is missing")
        self.spec = spec
        self._tok = Tokenizer.from_file(str(path))
        self._tok.enable_truncation(max_length=spec.max_length)
        self._tok.enable_padding(length=spec.max_length, pad_id=spec.pad_id)

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts before truncation or padding (used to pick ``max_length``)."""
        self._tok.no_truncation()
        self._tok.no_padding()
        try:
            return np.array([len(e.ids) for e in self._tok.encode_batch(list(texts))], dtype=np.int64)
        finally:
            self._tok.enable_truncation(max_length=self.spec.max_length)
            self._tok.enable_padding(length=self.spec.max_length, pad_id=self.spec.pad_id)

    def __call__(self, texts: Sequence[str | bytes]) -> dict[str, np.ndarray]:
        texts = [_as_text(t, i) for i, t in enumerate(texts)]
        enc = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(texts), self.spec.max_length)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(ids.shape)
        return {self.spec.input_names[0]: ids, self.spec.input_names[1]: mask}


class ImageTextEncoder:
    """``(image, question)`` pairs -> the image spec's and the text spec's arrays together."""

    def __init__(self, spec: ImageTextSpec, base_dir: str | os.PathLike) -> None:
        self.spec = spec
        self._text = TextEncoder(spec.text, base_dir)

    def __call__(self, pairs: Sequence[Any]) -> dict[str, np.ndarray]:
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], (str, bytes))):
                raise InputError(f"input {i}: this model answers questions about images; give (image, question) "
                                 f"pairs, got {type(pair).__name__}")
        return {**encode_images(self.spec.image, [p[0] for p in pairs]), **self._text([p[1] for p in pairs])}


def make_encoder(spec: Spec, base_dir: str | os.PathLike | None) -> Callable[[Sequence[Any]], dict[str, np.ndarray]]:
    """The function from a list of raw inputs to model input arrays; ``base_dir`` holds tokenizer files."""
    if isinstance(spec, ImageSpec):
        return lambda items: encode_images(spec, items)
    if base_dir is None:
        raise ConfigError("text preprocessing needs the directory that holds its tokenizer file")
    return TextEncoder(spec, base_dir) if isinstance(spec, TextSpec) else ImageTextEncoder(spec, base_dir)
