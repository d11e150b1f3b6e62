"""Serving bundles through NVIDIA Triton Inference Server. Beside ``analysis``, above ``runtimes``:
it imports ``runtimes`` and nothing else of the project, and ``runtimes`` never imports it.

- ``serving.protocol``: the tensors a served bundle takes and answers (numpy only).
- ``serving.server``: ``freedeploy serve``, the runtime as a Triton model through PyTriton
  (the ``serve`` extra).
- ``serving.repository``: a Triton model repository for a plain ``tritonserver``; its models vendor
  ``runtimes`` and ``serving.protocol`` only.
- ``serving.triton_model``: the ``model.py`` of those models (Triton's Python backend).
- ``serving.client``: a dependency-free HTTP client for one server or a fleet.
- ``serving.bench``: a server as a child process and a load test, for benchmarks and tests.
"""
