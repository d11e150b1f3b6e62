"""``Runtime``: a loaded bundle on a backend; ``Runtime.load`` gives the runtime for its task.

    from runtimes import Runtime
    rt = Runtime.load("bundles/digits")              # a Classifier (runtimes.classifier)
    result = rt.infer(["frame.png"])                 # paths, PIL images, HWC uint8 arrays, or text
    gen = Runtime.load("bundles/captions")           # a Generator (runtimes.generator)
    gen.generate("digit.png", prompt="a photo of").text

What both share lives here: the bundle, the backend, the certificate for this backend and precision,
the thresholds (one rule: ``runtimes.thresholds``), input encoding and ``close``. The bundle's head
says which runtime it gets (``Classifier`` for a ``ClassifierHead``, ``Generator`` for a
``DecoderHead``); ``Classifier.load`` and ``Generator.load`` also check that the bundle is of their kind.

Needs numpy and one backend package; never torch.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, Sequence

import numpy as np

from runtimes.backends import Backend, get_backend
from runtimes.backends.base import device_form
from runtimes.bundle import INT8_HEADS, Bundle, load_bundle
from runtimes.errors import BackendUnavailableError, ConfigError, InputError
from runtimes.preprocess import ImageTextSpec, make_encoder
from runtimes.records import Certificate
from runtimes.thresholds import parse_thresholds

__all__ = ["Runtime", "default_precision"]

log = logging.getLogger(__name__)


class Runtime:
    """A bundle loaded on a backend. Each subclass names the task it runs (``class Classifier(Runtime,
    task="classify")``); ``Runtime.load`` and ``Runtime(bundle, backend, ...)`` give the one for the
    bundle's head."""

    task: ClassVar[str | None] = None
    options: ClassVar[tuple[str, ...]] = ()  # the keyword arguments of load() the runtime itself takes
    _kinds: ClassVar[dict[str, type["Runtime"]]] = {}

    def __init_subclass__(cls, task: str | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if task is not None:
            cls.task = task
            Runtime._kinds[task] = cls

    def __new__(cls, bundle: Bundle, *args: Any, **kwargs: Any) -> "Runtime":
        return super().__new__(cls._kind(bundle))

    @classmethod
    def _kind(cls, bundle: Bundle) -> type["Runtime"]:
        """The runtime class for ``bundle``'s head; a ConfigError when ``cls`` asks for another kind."""
        kind = Runtime._kinds.get(bundle.head.task)
        if kind is None:
            raise ConfigError(f"bundle {bundle.name!r} has task {bundle.head.task!r}, which no runtime runs")
        if not issubclass(kind, cls):
            raise ConfigError(f"bundle {bundle.name!r} is a {bundle.head.task} bundle: load it with "
                              f"Runtime.load or {kind.__name__}.load, not {cls.__name__}.load")
        return kind

    def __init__(self, bundle: Bundle, backend: Backend) -> None:
        self.bundle, self.backend = bundle, backend
        own = self.certificate
        if bundle.calibration and own is None:
            log.warning("bundle %s was calibrated for %s, not for %s: its default thresholds may not hold here; "
                        "run freedeploy calibrate with this backend", bundle.name, ", ".join(bundle.calibration),
                        self.calibration_key)
        self._thresholds = list(own.thresholds) if own else list(bundle.thresholds)
        self._encode = make_encoder(bundle.preprocess, bundle.root)
        # (name, dtype, shape after the batch axis) per input, resolved once: the per-call checks do no parsing
        self._inputs = [(s.name, np.dtype(s.dtype), tuple(s.shape[1:])) for s in bundle.inputs]
        self._closed = False

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", device: str | None = None,
             precision: str | None = None, *, verify: bool = True, **options: Any) -> Any:
        """Load a bundle and give the runtime for its task (a ``Classifier`` or a ``Generator``).

        ``backend``: auto (TensorRT when an engine set for this GPU exists and loads, else ONNX Runtime),
        onnxruntime or tensorrt; ``device``: "cpu", "cuda" or "cuda:N" among those the backend takes
        (``Backend.devices``), by default cuda for TensorRT and cpu otherwise. Options the runtime takes
        (a classifier's ``policy``, ``nonfinite`` and ``monitor``) go to it, the others to the backend
        (ONNX Runtime's ``threads`` and ``head_threads``: integers from 1 to 4 per CPU); anything else
        is a ConfigError."""
        if device is not None and device_form(device) is None:
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N' (N: a GPU index), got {device!r}")
        bundle = load_bundle(path, verify=verify)
        kind = cls._kind(bundle)
        mine = {k: options.pop(k) for k in kind.options if k in options}
        kind.check_options(bundle, **mine)
        opened = _open_backend(bundle, backend, device, precision, options)
        try:
            return kind(bundle, opened, **mine)
        except BaseException:
            opened.close()
            raise

    @classmethod
    def check_options(cls, bundle: Bundle, **options: Any) -> None:
        """Refuse bad runtime options before a backend is opened."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise ConfigError(f"{cls.__name__} takes no option {', '.join(unknown)}")

    @property
    def calibration_key(self) -> str:
        """Which calibration applies here: confidences move with backend, precision and engine set."""
        d = self.backend.describe()
        return "-".join(str(x) for x in (d["backend"], d["precision"], d.get("engine_key")) if x)

    @property
    def certificate(self) -> Certificate | None:
        """The bundle's certificate for this backend and precision, if it was calibrated here."""
        return (self.bundle.calibration or {}).get(self.calibration_key)

    # thresholds ------------------------------------------------------------------------------------------
    @property
    def thresholds(self) -> list[float | None]:
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values: Sequence[float | None]) -> None:
        self._thresholds = self._checked(values)

    def _checked(self, values: Sequence[float | None]) -> list[float | None]:
        """One per exit, each in [0, 1], None (off) or NEVER (asked, never fires): ``runtimes.thresholds``."""
        return parse_thresholds(values, len(self.bundle.exits))

    # inputs -----------------------------------------------------------------------------------------------
    def encode(self, items: Any, question: str | Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Raw inputs -> model input arrays; a dict of arrays passes through after checks.

        Vision-language bundles take ``(image, question)`` pairs, or images and ``question`` (one
        question for every image, or one per image)."""
        self._open()
        items = self._items(items, question)
        return self._check(items) if isinstance(items, dict) else self._encode(items)

    def _open(self) -> None:
        if self._closed:
            raise ConfigError("this runtime is closed: load the bundle again (Runtime.load) to run it")

    def _items(self, items: Any, question: str | Sequence[str] | None) -> dict[str, np.ndarray] | list[Any]:
        """A dict of arrays as it is, else the list of raw inputs the encoder takes (pairs when asked)."""
        pairs = isinstance(self.bundle.preprocess, ImageTextSpec)
        if question is not None and not pairs:
            raise InputError("question= applies to vision-language bundles only; this one takes "
                             f"{self.bundle.preprocess.kind} inputs")
        if isinstance(items, dict):
            if question is not None:
                raise InputError("question= cannot be combined with already-encoded arrays")
            return items
        single = isinstance(items, (str, bytes, os.PathLike)) or (hasattr(items, "mode") and hasattr(items, "size")) \
            or (isinstance(items, np.ndarray) and items.ndim in (2, 3))  # a path, a PIL image or one array
        if single or (pairs and question is None and isinstance(items, tuple) and len(items) == 2
                      and isinstance(items[1], str)):
            items = [items]
        if not isinstance(items, (list, tuple)) and not (isinstance(items, np.ndarray) and items.ndim):
            raise InputError(f"inputs must be a path, an image, an array, a str or bytes, a dict of arrays, or a "
                             f"non-empty list of those; got {type(items).__name__}")
        items = list(items)
        if not items:
            raise InputError("empty batch: give at least one input")
        if question is not None:
            if isinstance(question, (str, bytes)):
                questions = [question] * len(items)
            elif isinstance(question, (list, tuple)) and all(isinstance(q, (str, bytes)) for q in question):
                questions = list(question)
            else:
                raise InputError(f"question= must be a str or a list of str, got {type(question).__name__}")
            if len(questions) != len(items):
                raise InputError(f"{len(questions)} questions for {len(items)} images: give one, or one per image")
            items = list(zip(items, questions))
        return items

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

    def close(self) -> None:
        """Release the backend's sessions, engines and buffers; closing twice is harmless. Any later
        call is a ConfigError."""
        if not self._closed:
            self._closed = True
            self.backend.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_precision(backend: str, bundle: Bundle) -> str:
    """What runs when no precision is asked for: fp16 engines on TensorRT; on ONNX Runtime the int8-weight
    heads when the bundle was exported with them (``--head-weights int8`` asked for them); else fp32."""
    preferred = {"tensorrt": "fp16", "onnxruntime": INT8_HEADS}.get(backend)
    return preferred if preferred in bundle.precisions else "fp32"


def _open_backend(bundle: Bundle, backend: str, device: str | None, precision: str | None,
                  options: dict[str, Any]) -> Backend:
    """The backend asked for; ``auto``: TensorRT where engines exist and load, else ONNX Runtime."""
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
                return _make("tensorrt", bundle, precision, device or "cuda",
                             {k: v for k, v in options.items() if k in trt})
            except (BackendUnavailableError, ConfigError) as exc:  # engines exist, so saying why is worth a warning
                log.warning("TensorRT not used, falling back to ONNX Runtime: %s", " ".join(str(exc).split()))
            options = {k: v for k, v in options.items() if k not in trt}
        backend = "onnxruntime"
    default_device = "cuda" if backend == "tensorrt" else "cpu"
    return _make(backend, bundle, precision, device or default_device, options)


def _make(name: str, bundle: Bundle, precision: str | None, device: str, options: dict[str, Any]) -> Backend:
    chosen = precision or default_precision(name, bundle)
    return get_backend(name)(bundle, precision=chosen, device=device, **options)
