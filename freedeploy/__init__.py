"""freedeploy: train FREE early exits on transformers, export them as chained ONNX / TensorRT
segments, calibrate certified thresholds and run them on GPUs, Jetsons and CPUs.

Heavy modules (torch, transformers) are imported lazily: ``import freedeploy`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
