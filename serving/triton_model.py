"""A freedeploy bundle as a model of Triton's Python backend: the ``model.py`` that
``serving.repository`` writes into a model repository (this file, copied).

The model's config.pbtxt ``parameters`` say what to serve; paths are relative to the model's
directory:

- ``mode``: ``raw`` (encoded images, texts) or ``tensors`` (the bundle's model inputs);
- ``bundle``: the bundle directory; ``runtimes``: the directory holding the vendored ``runtimes``
  package and ``serving/protocol.py``, put first on ``sys.path`` so the server runs the runtime and
  protocol the repository was written with;
- ``backend``: auto, onnxruntime or tensorrt, ``device`` and ``precision`` (empty: the runtime's
  defaults); ``early_exit``: true or false (false: the monolithic
  graph, the baseline); ``thresholds``: a JSON list (null turns an exit off), empty for the bundle's own.

Each ``execute`` answers all requests of Triton's dynamic batch in one runtime call, so early exit
compacts rows across clients; a bad row gets its own ``error`` output, a malformed request its own
error response, and only a failure of the whole call fails every request.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class TritonPythonModel:
    """What Triton's Python-backend stub instantiates: initialize, execute per batch, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        # the stub's module, imported here so that this file also imports as part of the package
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: str(v.get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}
        home = args["model_repository"]  # the model's directory

        def place(key: str, default: str) -> str:
            return os.path.normpath(os.path.join(home, params.get(key) or default))

        vendored = place("runtimes", args.get("model_version") or "1")
        if os.path.isdir(os.path.join(vendored, "runtimes")) and vendored not in sys.path[:1]:
            sys.path.insert(0, vendored)
        from runtimes import Runtime
        from runtimes.errors import ConfigError
        from serving.protocol import OUTPUTS, answer_requests, inputs_for

        self._answer, self._outputs = answer_requests, OUTPUTS
        self._mode = params.get("mode") or "raw"
        early = (params.get("early_exit") or "true").strip().lower()
        if early not in ("true", "false"):
            raise ConfigError(f"parameter early_exit must be true or false, got {early!r}")
        self._early_exit = early == "true"
        self._runtime = Runtime.load(place("bundle", os.path.join(args.get("model_version") or "1", "bundle")),
                                     backend=params.get("backend") or "auto", device=params.get("device") or None,
                                     precision=params.get("precision") or None)
        try:
            self._ports = inputs_for(self._runtime.bundle, self._mode)
            if (params.get("thresholds") or "").strip():
                try:
                    self._runtime.thresholds = json.loads(params["thresholds"])
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"parameter thresholds must be a JSON list: {_one_line(exc)}") from None
        except BaseException:
            self._runtime.close()
            raise

    def _read(self, request: Any) -> dict[str, np.ndarray]:
        """One request's inputs, each with its batch axis; ValueError names what is wrong."""
        arrays = {}
        for port in self._ports:
            tensor = self._pb.get_input_tensor_by_name(request, port.name)
            if tensor is None:
                raise ValueError(f"missing input {port.name!r}; this model takes "
                                 f"{', '.join(p.name for p in self._ports)}")
            arrays[port.name] = tensor.as_numpy()
        sizes = {len(a) if a.ndim else -1 for a in arrays.values()}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError(f"inputs {', '.join(arrays)} need one common batch axis")
        return arrays

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self._pb
        responses: list[Any] = [None] * len(requests)
        good, batch = [], []
        for i, request in enumerate(requests):
            try:
                batch.append(self._read(request))
                good.append(i)
            except ValueError as exc:
                responses[i] = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(_one_line(exc)))
        if good:
            try:
                answers = self._answer(self._runtime, self._mode, batch, self._early_exit)
            except Exception as exc:  # the whole call failed: every request says why
                message = f"freedeploy: {_one_line(exc)}"
                for i in good:
                    responses[i] = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message))
            else:
                for i, out in zip(good, answers):
                    tensors = [pb.Tensor(p.name, np.ascontiguousarray(out[p.name], dtype=p.numpy_dtype))
                               for p in self._outputs]
                    responses[i] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        runtime = getattr(self, "_runtime", None)
        if runtime is not None:
            runtime.close()
