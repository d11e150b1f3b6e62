"""Numpy-only analysis and data readers for bundles: evaluation, benchmarks, plots, data sets.

May import ``calibration`` and ``runtimes``; never torch, transformers, onnx, ``exporters`` or
``freedeploy``, so every bundle command that reports numbers runs on a box without torch.
"""
