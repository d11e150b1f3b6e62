"""Serving bundles through NVIDIA Triton Inference Server.

- ``runtimes.serve.protocol``: the tensors a served bundle takes and answers (numpy only).
- ``runtimes.serve.server``: ``freedeploy serve``, the runtime as a Triton model through PyTriton
  (the ``serve`` extra).
- ``runtimes.serve.repository``: a Triton model repository for a plain ``tritonserver``.
- ``runtimes.serve.client``: a dependency-free HTTP client for one server or a fleet.
"""
