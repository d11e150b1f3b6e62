"""Confidence functions: logits -> a score in [0, 1], higher = more sure.

One dict, used by evaluation, calibration and tests alike; the exported exit graphs compute the
same functions in fp32 (``exporters.graphs``), and a test keeps the two in step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["CONFIDENCE", "softmax"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """The largest class probability (FREE's rule)."""
    return softmax(logits).max(axis=-1)


def margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability."""
    p = np.sort(softmax(logits), axis=-1)
    return p[..., -1] - p[..., -2]


def entropy(logits: np.ndarray) -> np.ndarray:
    """1 - H(p) / log(C): 1 for a one-hot distribution, 0 for a uniform one."""
    p = softmax(logits)
    h = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=-1)
    return 1.0 - h / np.log(p.shape[-1])


CONFIDENCE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_softmax": max_softmax,
    "margin": margin,
    "entropy": entropy,
}
