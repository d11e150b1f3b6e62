"""Numpy-only analysis and data readers for bundles: evaluation, benchmarks, plots, data sets.

May import ``calibration`` and ``runtimes``; never torch, transformers, onnx, ``serving``, ``exporters``
or ``freedeploy``, so every bundle command that reports numbers runs on a box without torch.
"""

# Benchmark settings the CLI shows without importing the (scipy-heavy) analysis modules.
# Consecutive batch-1 calls per variant in each interleaved round: a frame loop runs one model call
# after call, so its weights stay in the caches; measured both ways in docs/results.md (bench --burst).
BURST = 10
