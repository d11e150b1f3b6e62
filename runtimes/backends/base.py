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

import re
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from runtimes.bundle import Bundle
from runtimes.errors import ConfigError

__all__ = ["Backend", "HostMemory", "device_form"]


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def device_form(device: object) -> str | None:
    """Which form a device string has: "cpu", "cuda" or "cuda:N"; None when it has none of them."""
    m = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    return None if m is None else "cuda:N" if m[1] else m[0]


class Backend(ABC):
    name: ClassVar[str]
    # the forms of device string the backend accepts: "cpu", "cuda", "cuda:N" (N: a GPU index)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    # the keyword options the backend takes, or None for any (kept in ``self.options``)
    takes: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "cpu", **options: Any) -> None:
        self.check_device(device)
        if precision not in bundle.precisions:
            raise ConfigError(f"bundle {bundle.name!r} has no {precision} graphs; it has {', '.join(bundle.precisions)}")
        self.bundle, self.precision, self.device, self.options = bundle, precision, device, options

    @classmethod
    def check_device(cls, device: object) -> None:
        """A ConfigError naming the forms in ``devices`` unless ``device`` has one of them. Whether
        that device exists is the backend's to say (BackendUnavailableError, or ConfigError for cuda:N)."""
        if device_form(device) not in cls.devices:
            forms = [repr(d) for d in cls.devices]
            named = forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"
            gpu = " (N: a GPU index)" if "cuda:N" in cls.devices else ""
            raise ConfigError(f"the {cls.name} backend runs on {named}{gpu}, not {device!r}")

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

    def bind(self, graph: str, arrays: Mapping[str, np.ndarray]) -> Callable[[], None]:
        """A call of ``graph`` that reads its inputs from ``arrays`` and writes its outputs into them, in
        place: the batch-1 decoding loop keeps its buffers (the preallocated KV cache among them) and
        calls graphs on them token after token. Shapes are fixed until the caller binds again.

        This default runs the graph through ``start``/``run``/``fetch`` and copies the outputs into
        the caller's arrays; a backend that can read and write the arrays where they are overrides it
        (ONNX Runtime on the CPU binds them, no copy)."""
        spec = self.bundle.graph(graph)
        inputs, outputs = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        missing = [n for n in (*inputs, *outputs) if n not in arrays]
        if missing:
            raise ConfigError(f"binding {graph}: no array for {', '.join(missing)}")

        def call() -> None:
            state = self.start({n: arrays[n] for n in inputs})
            self.run(graph, state)
            got = self.fetch(state, outputs)
            for n in outputs:
                arrays[n][...] = got[n]
        return call

    def decode_memory(self) -> "HostMemory":
        """Where one decoding session (``runtimes.decoding``) keeps its buffers, and how its graphs are
        bound to them: host numpy arrays and ``bind`` by default (ONNX Runtime, and any backend that
        runs graphs on host arrays). A backend that keeps tensors on a device returns its own memory
        with the same five calls (``alloc``, ``copy``, ``write``, ``read``, ``bind``); TensorRT does."""
        return HostMemory(self)

    def close(self) -> None:
        """Release sessions, engines and buffers."""

    def describe(self) -> dict[str, Any]:
        """What runs where, for reports: backend, precision, device and backend-specific settings."""
        return {"backend": self.name, "precision": self.precision, "device": self.device}


class HostMemory:
    """The decoding loop's buffers in host memory: a region is a numpy array, and a view of one is
    numpy's own (``keys[layer, :, :bucket]``, ``masks[:, 0, at:at + n]``), made without a copy.

    The loop moves data only through these calls, so the same loop runs on device memory too:

    - ``alloc(shape, dtype)``: a new region, zero-filled (C order; views of it keep numpy's indexing);
    - ``copy(dst, src)``: region to region, same shape (a commit of new keys and values into the cache);
    - ``write(dst, values)``: host values into a region, broadcast to its shape (tokens, mask rows);
    - ``read(*srcs)``: the regions as host arrays, here the arrays themselves: valid until a graph
      call or a write changes them, so read what you need at once (a decision: a token, a confidence);
    - ``bind(graph, regions)``: a call of the graph on regions, its outputs written in place
      (``Backend.bind``)."""

    device = False

    def __init__(self, backend: Backend) -> None:
        self.bind = backend.bind

    @staticmethod
    def alloc(shape: Sequence[int], dtype: Any) -> np.ndarray:
        return np.zeros(tuple(shape), dtype)

    @staticmethod
    def copy(dst: np.ndarray, src: np.ndarray) -> None:
        dst[...] = src

    @staticmethod
    def write(dst: np.ndarray, values: Any) -> None:
        dst[...] = values

    @staticmethod
    def read(*srcs: np.ndarray) -> tuple[np.ndarray, ...]:
        return srcs
