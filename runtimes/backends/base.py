"""The small interface every backend implements, and nothing more.

The early-exit loop (``runtimes.chain``) drives a backend through five calls::

    state = backend.start(inputs)          # model inputs (host arrays) -> a state the backend owns
    backend.run("segment_0", state)        # read the graph's inputs from the state, add its outputs
    backend.run("exit_0", state)
    small = backend.fetch(state, ["confidence_0", "prediction_0"])   # host copies of a few numbers
    backend.compact(state, keep)           # drop the rows that exited, for every batched tensor

Tensors stay where the backend keeps them (host arrays for ONNX Runtime on the CPU, device
buffers for TensorRT); only what the loop decides on crosses to the host. Graph keys are
``segment_<k>``, ``exit_<k>`` and ``full``; tensor names are the bundle's. A state belongs to one
``infer`` call, so calls from several threads never share one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import numpy as np

from runtimes.bundle import Bundle
from runtimes.errors import ConfigError

__all__ = ["Backend"]


class Backend(ABC):
    name: ClassVar[str]
    # which device strings the backend accepts, e.g. ("cpu", "cuda", "cuda:0")
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    # the keyword options the backend takes, or None for any (kept in ``self.options``)
    takes: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "cpu", **options: Any) -> None:
        if precision not in bundle.precisions:
            raise ConfigError(f"bundle {bundle.name!r} has no {precision} graphs; it has {', '.join(bundle.precisions)}")
        self.bundle, self.precision, self.device, self.options = bundle, precision, device, options

    @abstractmethod
    def start(self, inputs: dict[str, np.ndarray]) -> Any:
        """Take model inputs (host arrays, batch <= bundle.batch.max) into a new state."""

    @abstractmethod
    def run(self, graph: str, state: Any) -> None:
        """Run one graph on the rows in ``state``, adding its outputs to the state."""

    @abstractmethod
    def fetch(self, state: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Host copies of the named tensors (small ones: confidences, predictions, logits)."""

    @abstractmethod
    def compact(self, state: Any, keep: np.ndarray) -> None:
        """Keep only rows ``keep`` (sorted int64 indices) of every batched tensor in the state."""

    def close(self) -> None:
        """Release sessions, engines and buffers."""

    def describe(self) -> dict[str, Any]:
        """What runs where, for reports: backend, precision, device and backend-specific settings."""
        return {"backend": self.name, "precision": self.precision, "device": self.device}
