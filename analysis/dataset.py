"""The ``Dataset`` every loader returns, and the digit images the built-in digit data sets share.

Loaders (``analysis.data`` for the classic specs, ``analysis.vqa``, ``analysis.captions``) build on
this module; ``analysis.data.load_dataset`` dispatches a spec to them. numpy only (scikit-learn for
the digits, imported when they are asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from runtimes.errors import DataError

__all__ = ["Dataset", "digit_images"]


@dataclass(frozen=True)
class Dataset:
    spec: str
    modality: str  # "image", "text", "image-text" or "image-to-text"
    items: list[Any]  # uint8 HW/HWC arrays, image paths, strings, or (image, question / prompt) pairs
    labels: np.ndarray  # int64 (N,), indices into label_names
    label_names: tuple[str, ...]
    groups: np.ndarray | None = None  # int64 (N,): rows of one group (an image) stay in one split
    targets: tuple[str, ...] | None = None  # image-to-text: the text to generate, one per row

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> "Dataset":
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(self.spec, self.modality, [self.items[i] for i in idx], self.labels[idx], self.label_names,
                       None if self.groups is None else self.groups[idx],
                       None if self.targets is None else tuple(self.targets[i] for i in idx))


def digit_images(name: str = "digits") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits as (N, 8, 8) uint8 images and their digits;
    ``name`` is the data set asking, for the error message."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(f"the {name!r} data set needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    return np.rint(d.images * (255.0 / 16.0)).astype(np.uint8), d.target  # values 0..16 -> 0..255
