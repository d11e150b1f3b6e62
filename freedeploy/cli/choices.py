"""The values the runtime commands offer, each read from the registry that defines it, so adding a
backend, a precision or a confidence function touches its own module and that registry only."""

from __future__ import annotations

from exporters.config import TARGETS
from runtimes.backends import BACKENDS
from runtimes.bundle import PRECISIONS
from runtimes.confidence import CONFIDENCE

__all__ = ["INTERNAL_BACKENDS", "BACKEND_CHOICES", "PRECISION_CHOICES", "CONFIDENCE_CHOICES", "TRT_TARGETS"]

INTERNAL_BACKENDS = ("fake",)  # scripted results for tests: registered, never offered to users
# auto: Runtime.load picks TensorRT where an engine set for this GPU exists, else ONNX Runtime
BACKEND_CHOICES = ("auto", *(name for name in BACKENDS if name not in INTERNAL_BACKENDS))
PRECISION_CHOICES = PRECISIONS
CONFIDENCE_CHOICES = tuple(CONFIDENCE)
# `freedeploy build` targets: one engine set per bundle precision
TRT_TARGETS = tuple(t for t in TARGETS if t.startswith("trt-"))
