"""A scripted backend for testing the early-exit loop without any model, and a bundle to match.

Row ids travel through the chain in the tensors themselves, so every exit can answer with the
scripted confidence and class of the original sample whatever compaction did; every call is
logged with the batch it ran on.

    bundle = fake_bundle(num_exits=3)
    backend = FakeBackend(bundle, confidences=conf, predictions=pred)   # (N, K + 1) each
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from runtimes.backends.base import Backend
from runtimes.bundle import BatchSpec, Bundle, ExitSpec, GraphSpec, StageSpec, TensorSpec
from runtimes.preprocess import ImageSpec

__all__ = ["FakeBackend", "fake_bundle"]


def fake_bundle(num_exits: int = 3, max_batch: int = 64, thresholds: Sequence[float | None] | None = None) -> Bundle:
    """An in-memory bundle (no files) whose model input is ``x`` (B, 1): the row id."""
    thresholds = list(thresholds) if thresholds is not None else [None] * num_exits

    def graph(key: str, inputs: list[str], outputs: list[str]) -> GraphSpec:
        return GraphSpec({"fp32": f"onnx/{key}.onnx"}, tuple(TensorSpec(n, "float32", ("batch", 1)) for n in inputs),
                         tuple(TensorSpec(n, "float32", ("batch", 1)) for n in outputs))

    stages, src = [], "x"
    for k in range(num_exits + 1):
        if k == num_exits:
            stages.append(StageSpec(k, (k, k + 1), graph(f"segment_{k}", [src], ["logits", "confidence", "prediction"]), None))
            break
        out = f"hidden_{k + 1}"
        exit_graph = graph(f"exit_{k}", [out], [f"logits_{k}", f"confidence_{k}", f"prediction_{k}"])
        stages.append(StageSpec(k, (k, k + 1), graph(f"segment_{k}", [src], [out]),
                                ExitSpec(k + 1, exit_graph, "max_softmax", thresholds[k])))
        src = out
    return Bundle(name="fake", labels=tuple(f"class{i}" for i in range(10)), preprocess=ImageSpec(size=(1, 1)),
                  inputs=(TensorSpec("x", "float32", ("batch", 1)),), batch=BatchSpec(1, 1, max_batch),
                  stages=tuple(stages), full=graph("full", ["x"], ["logits", "confidence", "prediction"]),
                  num_blocks=num_exits + 1, files={})


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "cpu",
                 confidences: np.ndarray | None = None, predictions: np.ndarray | None = None, **options: Any) -> None:
        super().__init__(bundle, precision, device, **options)
        k = len(bundle.exits) + 1
        self.confidences = np.zeros((0, k), np.float32) if confidences is None else np.asarray(confidences, np.float32)
        self.predictions = np.zeros((0, k), np.int64) if predictions is None else np.asarray(predictions, np.int64)
        self.calls: list[tuple[str, int]] = []  # (graph key, rows it ran on)
        self.fetched: list[str] = []

    def start(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in inputs.items()}

    def run(self, graph: str, state: dict[str, np.ndarray]) -> None:
        spec = self.bundle.graph(graph)
        ids = state[spec.inputs[0].name][:, 0].astype(np.int64)
        self.calls.append((graph, len(ids)))
        kind, _, index = graph.partition("_")
        names = [t.name for t in spec.outputs]
        if kind == "segment" and len(names) == 1:
            state[names[0]] = state[spec.inputs[0].name]
            return
        col = int(index) if kind == "exit" else -1
        conf, pred = self.confidences[ids, col], self.predictions[ids, col]
        state.update(zip(names, (np.eye(10, dtype=np.float32)[pred], conf, pred)))

    def fetch(self, state: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        self.fetched.extend(names)
        return {n: state[n] for n in names}

    def compact(self, state: dict[str, np.ndarray], keep: np.ndarray) -> None:
        for k in list(state):
            state[k] = state[k][keep]
