"""What a served bundle takes and answers, as Triton tensors; and one batch of requests, answered.

The same functions back ``freedeploy serve`` (PyTriton), the model repository's Python-backend
model (``serving.repository``) and the client (``serving.client``), so the three
cannot drift apart. Needs numpy only (and the runtime's own packages to answer).

Two models per bundle:

- ``NAME``: raw inputs, one per row. Image bundles take ``image`` (the bytes of an encoded image
  file: PNG, JPEG, ...); text bundles take ``text`` (UTF-8); image-plus-question bundles take
  ``image`` and ``question``. The server decodes and preprocesses exactly as ``Runtime.infer``.
- ``NAME_tensors``: the bundle's own model inputs, already preprocessed (``pixel_values`` float32
  (3, H, W), or ``input_ids`` and ``attention_mask``): what a DeepStream or GStreamer pipeline
  that preprocesses on its own sends.

Every row answers ``label`` (BYTES), ``class`` (INT64), ``confidence`` (FP32), ``exit_index``
(INT64: the exit's position, the number of exits for the final head, -1 for the monolithic graph),
``block`` (INT64: the block whose output decided) and ``error`` (BYTES: empty, or why this row could
not run, in which case class is -1, confidence NaN and block 0). A bad row never fails the other
rows of its batch, which may hold other clients' requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtimes.bundle import ClassifierHead
from runtimes.errors import ConfigError, InputError

__all__ = ["Port", "OUTPUTS", "DATATYPES", "MODES", "DEFAULT_QUEUE_DELAY_US", "TENSORS_SUFFIX", "inputs_for", "model_name",
           "check_model_name", "model_names", "answer", "answer_requests", "rows_of"]

MODES = ("raw", "tensors")
# How long Triton's dynamic batcher holds the first request of a batch for others to join, in
# microseconds (measured: see docs/serving.md).
DEFAULT_QUEUE_DELAY_US = 0
TENSORS_SUFFIX = "_tensors"

# numpy dtype -> KServe v2 datatype name (the config.pbtxt name is "TYPE_" + it, BYTES -> TYPE_STRING)
DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
              "int8": "INT8", "uint8": "UINT8", "bool": "BOOL", "object": "BYTES", "bytes": "BYTES"}


@dataclass(frozen=True)
class Port:
    """One tensor of a served model; ``shape`` is per row (after the batch axis)."""

    name: str
    dtype: str  # numpy dtype name; "bytes" for Triton BYTES (numpy object arrays of bytes)
    shape: tuple[int, ...]

    @property
    def datatype(self) -> str:
        """The KServe v2 name (FP32, INT64, BYTES, ...)."""
        return DATATYPES[self.dtype]

    @property
    def config_type(self) -> str:
        """The config.pbtxt name (TYPE_FP32, TYPE_STRING, ...)."""
        return "TYPE_STRING" if self.datatype == "BYTES" else "TYPE_" + self.datatype

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == "bytes" else np.dtype(self.dtype)


OUTPUTS = (Port("label", "bytes", (1,)), Port("class", "int64", (1,)), Port("confidence", "float32", (1,)),
           Port("exit_index", "int64", (1,)), Port("block", "int64", (1,)), Port("error", "bytes", (1,)))


def _raw_names(kind: str) -> tuple[str, ...]:
    return {"image": ("image",), "text": ("text",), "image-text": ("image", "question")}[kind]


def inputs_for(bundle: Any, mode: str) -> tuple[Port, ...]:
    """The input tensors of ``bundle`` served in ``mode`` (raw or tensors)."""
    bundle.expect(ClassifierHead, "serving (for now; a generative bundle runs with freedeploy run or "
                                  "Generator.generate)")
    if mode == "raw":
        return tuple(Port(n, "bytes", (1,)) for n in _raw_names(bundle.preprocess.kind))
    if mode == "tensors":
        return tuple(Port(s.name, np.dtype(s.dtype).name, tuple(int(d) for d in s.shape[1:])) for s in bundle.inputs)
    raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}$")  # leaves room for the _tensors model's suffix


def model_name(bundle_name: str) -> str:
    """The default model name: the bundle's, with what Triton does not take replaced by '_'."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", bundle_name).lstrip("-")[:100].strip("_-")
    return name or "model"


def check_model_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"model name {name!r} is not one Triton takes: use 1 to 100 letters, digits, '_' and '-', "
                          "not starting with '-'")


def model_names(name: str) -> dict[str, str]:
    """mode -> the Triton model name serving it."""
    return {"raw": name, "tensors": name + TENSORS_SUFFIX}


def _item(value: Any) -> Any:
    """One BYTES element as Triton hands it over (bytes, or a numpy bytes / str scalar)."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size == 1 else value
    if isinstance(value, (np.bytes_, bytearray, memoryview)):
        return bytes(value)
    return value


def rows_of(bundle: Any, mode: str, inputs: dict[str, np.ndarray]) -> Any:
    """The batch as ``Runtime.infer`` takes it: a list of raw items (pairs for image plus
    question), or the dict of model arrays."""
    ports = inputs_for(bundle, mode)
    missing = [p.name for p in ports if p.name not in inputs]
    if missing:
        raise InputError(f"missing input(s) {', '.join(missing)}; this model takes {', '.join(p.name for p in ports)}")
    if mode == "tensors":
        return {p.name: np.ascontiguousarray(inputs[p.name]) for p in ports}
    columns = [np.asarray(inputs[p.name], dtype=object).reshape(len(inputs[p.name]), -1) for p in ports]
    if len({len(c) for c in columns}) != 1:
        raise InputError(f"inputs {', '.join(p.name for p in ports)} need one common batch size")
    for p, c in zip(ports, columns):
        if c.shape[1] != 1:
            raise InputError(f"input {p.name!r} takes one element per row, got {c.shape[1]}")
    if len(columns) == 1:
        return [_item(v) for v in columns[0][:, 0]]
    return [(_item(a), _item(q)) for a, q in zip(columns[0][:, 0], columns[1][:, 0])]


def answer(runtime: Any, mode: str, inputs: dict[str, np.ndarray], early_exit: bool = True) -> dict[str, np.ndarray]:
    """One batch (possibly many clients' requests, concatenated) -> the output tensors, (B, 1) each.

    Early exit compacts per row inside the batch (``policy="per_sample"``); ``early_exit=False`` runs
    the monolithic graph, the baseline."""
    bundle = runtime.bundle
    run = runtime.infer if early_exit else runtime.infer_full
    try:
        result = run(rows_of(bundle, mode, inputs), errors="keep")
    except InputError as exc:  # the whole batch is malformed (a missing input, arrays of the wrong shape)
        n = max((len(v) for v in inputs.values()), default=0)
        return _outputs(bundle, np.full(n, -1), np.full(n, np.nan), np.full(n, -1), np.zeros(n, np.int64),
                        {i: exc for i in range(n)})
    return _outputs(bundle, result.classes, result.confidences, result.exits, result.blocks, result.errors)


def _outputs(bundle: Any, classes: np.ndarray, confidences: np.ndarray, exits: np.ndarray, blocks: np.ndarray,
             errors: dict[int, Exception]) -> dict[str, np.ndarray]:
    n = len(classes)
    labels = np.array([bundle.head.labels[int(c)].encode() if c >= 0 else b"" for c in classes], dtype=object)
    error = np.array([b""] * n, dtype=object)
    for i, exc in errors.items():
        error[i] = str(exc).encode()
    return {"label": labels.reshape(n, 1), "class": np.asarray(classes, np.int64).reshape(n, 1),
            "confidence": np.asarray(confidences, np.float32).reshape(n, 1),
            "exit_index": np.asarray(exits, np.int64).reshape(n, 1), "block": np.asarray(blocks, np.int64).reshape(n, 1),
            "error": error.reshape(n, 1)}


def answer_requests(runtime: Any, mode: str, requests: list[dict[str, np.ndarray]],
                    early_exit: bool = True) -> list[dict[str, np.ndarray]]:
    """The requests of one dynamic batch (each with its own batch axis) answered in ONE runtime call,
    so that early exit compacts per row across clients; the outputs split back per request."""
    sizes = [max((len(v) for v in r.values()), default=0) for r in requests]
    names = sorted(set().union(*(r.keys() for r in requests))) if requests else []
    try:
        joined = {n: np.concatenate([np.asarray(r[n]) for r in requests]) for n in names}
    except (KeyError, ValueError) as exc:  # requests that do not stack: answer each on its own
        if len(requests) == 1:
            raise InputError(f"malformed request: {exc}") from None
        return [answer_requests(runtime, mode, [r], early_exit)[0] for r in requests]
    out = answer(runtime, mode, joined, early_exit)
    bounds = np.cumsum([0] + sizes)
    return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:])]
