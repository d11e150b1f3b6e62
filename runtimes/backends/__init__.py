"""Backends run bundle graphs. One module each; looked up by name and imported lazily, so a
missing package only matters when its backend is asked for."""

from __future__ import annotations

import importlib

from runtimes.backends.base import Backend
from runtimes.errors import BackendUnavailableError, ConfigError

__all__ = ["Backend", "get_backend", "BACKENDS"]

# name -> "module:class"
BACKENDS = {
    "onnxruntime": "runtimes.backends.onnxruntime:OrtBackend",
    "tensorrt": "runtimes.backends.tensorrt:TensorRTBackend",
    "fake": "runtimes.backends.fake:FakeBackend",
}


def get_backend(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}")
    module, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:  # the backend module itself reports what to install
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {exc}") from exc
