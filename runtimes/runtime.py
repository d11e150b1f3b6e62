"""``Runtime``: load a bundle, feed inputs, get a label at the first confident exit.

    from runtimes import Runtime
    rt = Runtime.load("bundles/digits")              # backend="auto": TensorRT if built, else ONNX Runtime
    result = rt.infer(["frame.png"])                 # paths, PIL images, HWC uint8 arrays, or text
    result = rt.infer("digit.png", question="is it even?")   # vision-language bundles
    result[0].label, result[0].confidence, result[0].block   # the block whose exit (or the final head) answered

Needs numpy and one backend package; never torch. Inputs larger than the bundle's max batch are
split into several calls. ``rt.thresholds`` can be overridden (None disables an exit).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from runtimes.backends import Backend, get_backend
from runtimes.bundle import Bundle, load_bundle
from runtimes.chain import POLICIES, ChainOutput, RecordOutput, record_chain, run_chain, run_full
from runtimes.errors import BackendUnavailableError, ConfigError, InputError
from runtimes.preprocess import ImageTextSpec, make_encoder

__all__ = ["Runtime", "Result", "Prediction"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str
    class_index: int
    confidence: float
    exit_index: int  # position in the bundle's exits; len(exits) means the final head
    block: int  # 1-based block whose output decided: how exits are named (the model's depth for the final head)

    @property
    def exit(self) -> int:
        """The same as ``exit_index`` (the name before exits were named by block everywhere)."""
        return self.exit_index


@dataclass
class Result:
    classes: np.ndarray
    confidences: np.ndarray
    exits: np.ndarray
    labels: tuple[str, ...]
    blocks: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)  # graph key -> seconds in this call
    flagged: np.ndarray | None = None  # rows whose inputs held NaN or Inf (nonfinite="flag"); answers unreliable

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> Prediction:
        c = int(self.classes[i])
        return Prediction(self.labels[c], c, float(self.confidences[i]), int(self.exits[i]), int(self.blocks[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Runtime:
    def __init__(self, bundle: Bundle, backend: Backend, policy: str = "per_sample", nonfinite: str = "error") -> None:
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if nonfinite not in ("error", "flag"):
            raise ConfigError(f"nonfinite must be 'error' or 'flag', got {nonfinite!r}")
        self.bundle, self.backend, self.policy, self.nonfinite = bundle, backend, policy, nonfinite
        own = (bundle.calibration or {}).get(self.calibration_key)
        if bundle.calibration and own is None:
            log.warning("bundle %s was calibrated for %s, not for %s: its default thresholds may not hold here; "
                        "run freedeploy calibrate with this backend", bundle.name, ", ".join(bundle.calibration),
                        self.calibration_key)
        self._thresholds = list(own.thresholds) if own else list(bundle.thresholds)
        self._encode = make_encoder(bundle.preprocess, bundle.root)
        self._exit_blocks = np.array([e.block for e in bundle.exits] + [bundle.num_blocks], dtype=np.int64)
        # (name, dtype, shape after the batch axis) per input, resolved once: the per-call checks do no parsing
        self._inputs = [(s.name, np.dtype(s.dtype), tuple(s.shape[1:])) for s in bundle.inputs]

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", device: str | None = None,
             precision: str | None = None, policy: str = "per_sample", verify: bool = True,
             nonfinite: str = "error", **options: Any) -> "Runtime":
        """Load a bundle. ``backend``: auto (TensorRT when an engine set for this GPU exists and
        loads, else ONNX Runtime), onnxruntime or tensorrt; ``device`` defaults to cuda for TensorRT
        and cpu otherwise; extra options go to the backend."""
        bundle = load_bundle(path, verify=verify)
        if backend == "auto":
            has_engines = bundle.root is not None and (bundle.root / "engines").is_dir()
            if has_engines and (device is None or device.startswith("cuda")):
                # each candidate gets the options it takes: an ONNX Runtime setting (threads=...)
                # must not turn TensorRT away, nor a TensorRT one reach ONNX Runtime
                trt, ort = get_backend("tensorrt").takes or (), get_backend("onnxruntime").takes or ()
                unknown = set(options) - set(trt) - set(ort)
                if unknown:
                    raise ConfigError(f"no backend takes {', '.join(sorted(unknown))}")
                try:
                    return cls(bundle, _make("tensorrt", bundle, precision, device or "cuda",
                                             {k: v for k, v in options.items() if k in trt}), policy, nonfinite)
                except (BackendUnavailableError, ConfigError) as exc:
                    log.info("TensorRT not used (%s); falling back to ONNX Runtime", exc)
                options = {k: v for k, v in options.items() if k not in trt}
            backend = "onnxruntime"
        default_device = "cuda" if backend == "tensorrt" else "cpu"
        return cls(bundle, _make(backend, bundle, precision, device or default_device, options), policy, nonfinite)

    @property
    def calibration_key(self) -> str:
        """Which calibration applies here: confidences move with backend, precision and engine set."""
        d = self.backend.describe()
        return "-".join(str(x) for x in (d["backend"], d["precision"], d.get("engine_key")) if x)

    # thresholds ------------------------------------------------------------------------------------------
    @property
    def thresholds(self) -> list[float | None]:
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values: Sequence[float | None]) -> None:
        self._thresholds = self._checked(values)

    def _checked(self, values: Sequence[float | None]) -> list[float | None]:
        values = list(values)
        if len(values) != len(self.bundle.exits):
            raise ConfigError(f"{len(values)} thresholds given; this bundle has {len(self.bundle.exits)} exits")
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"thresholds must be finite numbers or None, got {v!r}")
        return [None if v is None else float(v) for v in values]

    # inputs -----------------------------------------------------------------------------------------------
    def encode(self, items: Any, question: str | Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Raw inputs -> model input arrays; a dict of arrays passes through after checks.

        Vision-language bundles take ``(image, question)`` pairs, or images and ``question`` (one
        question for every image, or one per image)."""
        pairs = isinstance(self.bundle.preprocess, ImageTextSpec)
        if question is not None and not pairs:
            raise InputError("question= applies to vision-language bundles only; this one takes "
                             f"{self.bundle.preprocess.kind} inputs")
        if isinstance(items, dict):
            if question is not None:
                raise InputError("question= cannot be combined with already-encoded arrays")
            return self._check(items)
        single = isinstance(items, (str, bytes, os.PathLike)) or (hasattr(items, "mode") and hasattr(items, "size")) \
            or (isinstance(items, np.ndarray) and items.ndim in (2, 3))  # a path, a PIL image or one array
        if single or (pairs and question is None and isinstance(items, tuple) and len(items) == 2
                      and isinstance(items[1], str)):
            items = [items]
        items = list(items)
        if not items:
            raise InputError("empty batch: give at least one input")
        if question is not None:
            questions = [question] * len(items) if isinstance(question, (str, bytes)) else list(question)
            if len(questions) != len(items):
                raise InputError(f"{len(questions)} questions for {len(items)} images: give one, or one per image")
            items = list(zip(items, questions))
        return self._encode(items)

    def _check(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, dtype, want in self._inputs:
            if name not in arrays:
                raise InputError(f"input {name!r} is missing; the model takes {[n for n, _, _ in self._inputs]}")
            a = np.asarray(arrays[name])
            if a.dtype != dtype:
                raise InputError(f"input {name!r} must be {dtype.name}, got {a.dtype}")
            if a.shape[1:] != want or a.ndim != len(want) + 1:
                raise InputError(f"input {name!r} must have shape (batch, {', '.join(map(str, want))}), got {a.shape}")
            out[name] = a if a.flags.c_contiguous else np.ascontiguousarray(a)
        sizes = {len(a) for a in out.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise InputError(f"inputs need one common, non-zero batch size, got {sorted(sizes)}")
        return out

    def _chunks(self, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n, step = len(next(iter(arrays.values()))), self.bundle.batch.max
        if n <= step:
            return [arrays]
        return [{k: v[i:i + step] for k, v in arrays.items()} for i in range(0, n, step)]

    # inference --------------------------------------------------------------------------------------------
    def infer(self, inputs: Any, policy: str | None = None, thresholds: Sequence[float | None] | None = None,
              question: str | Sequence[str] | None = None) -> Result:
        """Early-exit inference; batches larger than the bundle's max are split. ``thresholds``
        overrides ``rt.thresholds`` for this call only; ``question`` goes with image inputs to a
        vision-language bundle (see ``encode``)."""
        th = self._thresholds if thresholds is None else self._checked(thresholds)
        arrays = self.encode(inputs, question)
        flagged = self._nonfinite(arrays)
        parts = [run_chain(self.backend, self.bundle, c, th, policy or self.policy) for c in self._chunks(arrays)]
        result = self._result(parts)
        result.flagged = flagged
        return result

    def _nonfinite(self, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
        """Rows holding NaN or Inf: an InputError by default, flagged in the result with nonfinite='flag'."""
        bad = None
        for a in arrays.values():
            # min and max are finite exactly when every element is (NaN propagates through both); the
            # per-row pass runs only when they are not
            if a.dtype.kind == "f" and a.size and not (math.isfinite(a.min()) and math.isfinite(a.max())):
                rows = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
                bad = rows if bad is None else bad | rows
        if bad is None:
            return None if self.nonfinite == "error" else np.zeros(len(next(iter(arrays.values()))), dtype=bool)
        if self.nonfinite == "error":
            rows = np.flatnonzero(bad)
            raise InputError(f"{len(rows)} input row(s) contain NaN or Inf (rows {rows[:8].tolist()}); fix the input "
                             "or load the runtime with nonfinite='flag' to run them and flag the results")
        return bad

    def infer_full(self, inputs: Any) -> Result:
        """The monolithic graph (no early exit): the baseline."""
        return self._result([run_full(self.backend, self.bundle, c) for c in self._chunks(self.encode(inputs))])

    def record(self, inputs: Any) -> RecordOutput:
        """Every exit's and the final head's confidence and prediction for every row."""
        parts = [record_chain(self.backend, self.bundle, c) for c in self._chunks(self.encode(inputs))]
        return RecordOutput(np.concatenate([p.confidences for p in parts]),
                            np.concatenate([p.predictions for p in parts]))

    def _result(self, parts: list[ChainOutput]) -> Result:
        if len(parts) == 1:  # one chunk: no copies
            p = parts[0]
            classes, confidences, exits, timings = p.classes, p.confidences, p.exits, dict(p.timings)
        else:
            timings = {}
            for p in parts:
                for k, v in p.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
            classes, confidences, exits = (np.concatenate([getattr(p, f) for p in parts])
                                           for f in ("classes", "confidences", "exits"))
        blocks = self._exit_blocks[exits]  # the monolithic graph reports exit -1: the last entry, the full depth
        return Result(classes, confidences, exits, self.bundle.labels, blocks, timings)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make(name: str, bundle: Bundle, precision: str | None, device: str, options: dict[str, Any]) -> Backend:
    chosen = precision or ("fp16" if name == "tensorrt" and "fp16" in bundle.precisions else "fp32")
    return get_backend(name)(bundle, precision=chosen, device=device, **options)
