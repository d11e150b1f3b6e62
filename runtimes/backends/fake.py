"""A scripted backend for testing the early-exit loop without any model, and a bundle to match.

Row ids travel through the chain in the tensors themselves, so every exit can answer with the
scripted confidence and class of the original sample whatever compaction did; every call is
logged with the batch it ran on.

    bundle = fake_bundle(num_exits=3)
    backend = FakeBackend(bundle, confidences=conf, predictions=pred)   # (N, K + 1) each
    FakeBackend(bundle, ..., delays={"segment": 0.002, "exit_0": 0.0005})  # seconds per call, waited out

``delays`` gives a graph call a duration, by graph key or by kind (``segment``, ``exit``: the key's
first word), so deadline logic can be tested against controlled stage times.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from runtimes.backends.base import Backend
from runtimes.bundle import BatchSpec, Bundle, TensorSpec, decision_field
from runtimes.plan import classifier_bundle, classifier_layout
from runtimes.preprocess import ImageSpec

__all__ = ["FakeBackend", "fake_bundle"]


def fake_bundle(num_exits: int = 3, max_batch: int = 64, thresholds: Sequence[float | None] | None = None) -> Bundle:
    """An in-memory bundle (no files) whose model input is ``x`` (B, 1, 1, 1): the row id. Laid out
    and assembled by the same builder as an exported bundle."""
    classes = 10
    layout = classifier_layout(("x",), tuple(range(1, num_exits + 1)), num_blocks=num_exits + 1)
    shapes = {"model_input": ("batch", 1, 1, 1), "hidden": ("batch", 1)}
    io = {g.key: tuple(tuple(_tensor(n, role, classes, shapes) for n, role in side) for side in (g.inputs, g.outputs))
          for g in layout}
    return classifier_bundle(layout, io, name="fake", labels=tuple(f"class{i}" for i in range(classes)),
                             preprocess=ImageSpec(size=(1, 1), mean=(0.0,), std=(1.0,), channels=1, input_name="x"),
                             num_blocks=num_exits + 1, batch=BatchSpec(1, 1, max_batch), thresholds=thresholds)


def _tensor(name: str, role: str, classes: int, shapes: dict[str, tuple]) -> TensorSpec:
    kind = decision_field(role)
    if kind == "logits":
        return TensorSpec(name, "float32", ("batch", classes))
    if kind in ("confidence", "prediction"):
        return TensorSpec(name, "float32" if kind == "confidence" else "int64", ("batch",))
    return TensorSpec(name, "float32", shapes[role])


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "cpu",
                 confidences: np.ndarray | None = None, predictions: np.ndarray | None = None,
                 delays: Mapping[str, float] | None = None, **options: Any) -> None:
        super().__init__(bundle, precision, device, **options)
        k = len(bundle.exits) + 1
        self.confidences = np.zeros((0, k), np.float32) if confidences is None else np.asarray(confidences, np.float32)
        self.predictions = np.zeros((0, k), np.int64) if predictions is None else np.asarray(predictions, np.int64)
        self.calls: list[tuple[str, int]] = []  # (graph key, rows it ran on)
        # which column of the script answers each head: exit k's, or the final head's (-1)
        self._column = {s.exit.graph.key: s.index for s in bundle.stages if s.exit is not None}
        self.fetched: list[str] = []
        delays = dict(delays or {})
        self._delay = {g.key: float(delays.get(g.key, delays.get(g.key.split("_")[0], 0.0))) for g in bundle.graphs}

    def start(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in inputs.items()}

    def run(self, graph: str, state: dict[str, np.ndarray]) -> None:
        spec = self.bundle.graph(graph)
        ids = state[spec.inputs[0].name].reshape(len(state[spec.inputs[0].name]), -1)[:, 0].astype(np.int64)
        self.calls.append((graph, len(ids)))
        delay = self._delay.get(graph, 0.0)
        if delay:
            end = time.perf_counter() + delay
            while time.perf_counter() < end:  # a busy wait: sleeping overshoots by a scheduler tick
                pass
        names = [t.name for t in spec.outputs]
        if spec.outputs[0].role == "hidden":
            state[names[0]] = state[spec.inputs[0].name].reshape(len(ids), 1)
            return
        col = self._column.get(graph, -1)
        conf, pred = self.confidences[ids, col], self.predictions[ids, col]
        state.update(zip(names, (np.eye(10, dtype=np.float32)[pred], conf, pred)))

    def fetch(self, state: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        self.fetched.extend(names)
        return {n: state[n] for n in names}

    def compact(self, state: dict[str, np.ndarray], keep: np.ndarray) -> None:
        for k in list(state):
            state[k] = state[k][keep]
