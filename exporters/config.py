"""Export and build settings, defined once and importable without torch (the CLI reads its
defaults and choices from here, also on a device that only builds engines)."""

from __future__ import annotations

from dataclasses import dataclass

from runtimes.records import ENGINE_PRECISIONS

__all__ = ["TARGETS", "HEAD_WEIGHTS", "DEFAULT_OPSET", "ExportConfig", "BuildDefaults"]

# --target -> the precision that goes into the ONNX (and later into the engines)
TARGETS = {"onnx": "fp32", **{f"trt-{p}": p for p in ENGINE_PRECISIONS}}
# --head-weights: fp32, or int8 weights in the exit heads (an extra ONNX Runtime precision, int8-heads)
HEAD_WEIGHTS = ("fp32", "int8")

# Opset 23+ turns attention into the native ONNX Attention op, which TensorRT 10.x cannot parse;
# 18-20 exports plain MatMul/Softmax that every TensorRT version fuses itself.
DEFAULT_OPSET = 20


@dataclass(frozen=True)
class ExportConfig:
    target: str = "onnx"
    max_batch: int = 64  # the runtime splits larger inputs
    opt_batch: int = 1  # TensorRT tunes for this batch: 1 is the camera case
    opset: int = DEFAULT_OPSET
    calib_samples: int = 256  # training rows that calibrate int8 activations
    confidence: str = "max_softmax"
    head_weights: str = "fp32"  # int8: also write exit heads with int8 weights (precision int8-heads, ONNX Runtime)
    exit_head: str = "auto"  # cls-query where the model pools token 0 (same function, a fraction of the work)
    validate: bool = True
    tolerance: float = 1e-4  # fp32 ONNX vs torch, max abs diff per output
    max_accuracy_drop: float = 0.02  # fp16 / int8 vs fp32 on the test split, before the export fails
    overwrite: bool = False


@dataclass(frozen=True)
class BuildDefaults:
    """``freedeploy build`` / ``build_engines`` settings."""

    workspace_gb: float = 2.0  # TensorRT's tactic workspace
    optimization_level: int = 3  # the builder's 0..5 (lower builds faster, e.g. on Jetson)
