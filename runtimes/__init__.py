"""The embeddable part of freedeploy: load a bundle, run the early-exit chain or decode text. numpy and
one backend package (onnxruntime or TensorRT); never torch.

``Runtime.load(path)`` gives a ``Classifier`` for a classifier bundle and a ``Generator`` for a
generative one."""

from runtimes.bundle import Bundle, load_bundle
from runtimes.classifier import Classifier
from runtimes.confidence import CONFIDENCE
from runtimes.errors import (BackendUnavailableError, BundleError, CalibrationError, ConfigError, DataError,
                             ExportError, FreedeployError, InputError, ModelError, ValidationError)
from runtimes.genconfig import GenerationConfig, KVRule, Mode
from runtimes.generator import Generator
from runtimes.monitor import Monitor
from runtimes.result import Generation, Prediction, Result
from runtimes.runtime import Runtime
from runtimes.thresholds import NEVER

__all__ = [
    "Runtime", "Classifier", "Generator", "GenerationConfig", "Mode", "KVRule", "Result", "Prediction",
    "Generation", "Bundle", "load_bundle", "CONFIDENCE", "Monitor", "NEVER",
    "FreedeployError", "ConfigError", "DataError", "ModelError", "BundleError", "BackendUnavailableError",
    "ExportError", "ValidationError", "CalibrationError", "InputError",
]
