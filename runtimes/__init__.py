"""The embeddable part of freedeploy: load a bundle, run the early-exit chain. numpy and one
backend package (onnxruntime or TensorRT); never torch."""

from runtimes.bundle import Bundle, load_bundle
from runtimes.confidence import CONFIDENCE
from runtimes.errors import (BackendUnavailableError, BundleError, CalibrationError, ConfigError, DataError,
                             ExportError, FreedeployError, InputError, ModelError, ValidationError)
from runtimes.monitor import Monitor
from runtimes.runtime import Prediction, Result, Runtime

__all__ = [
    "Runtime", "Result", "Prediction", "Bundle", "load_bundle", "CONFIDENCE", "Monitor",
    "FreedeployError", "ConfigError", "DataError", "ModelError", "BundleError", "BackendUnavailableError",
    "ExportError", "ValidationError", "CalibrationError", "InputError",
]
