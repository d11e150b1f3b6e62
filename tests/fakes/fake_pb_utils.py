"""A stand-in for ``triton_python_backend_utils``, the module Triton's Python-backend stub gives a
``model.py``: only what a model's ``execute`` touches, as strict as the real one where a model could
get it wrong. Install it with ``sys.modules["triton_python_backend_utils"] = fake_pb_utils``.

- ``Tensor(name, array)`` takes numpy arrays of Triton's types only: a BYTES tensor is an object
  array whose elements are bytes, and the array must be C-contiguous (the stub copies it as is).
- ``InferenceResponse(output_tensors, error=None)`` takes a list of Tensors, or an error with none.
- ``InferenceRequest(inputs)`` is the request Triton hands ``execute`` (not the BLS constructor),
  read with ``get_input_tensor_by_name``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["Tensor", "InferenceRequest", "InferenceResponse", "TritonError", "get_input_tensor_by_name",
           "get_output_tensor_by_name"]

_TYPES = {np.dtype(t) for t in ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                                "float16", "float32", "float64", "object")}


class TritonError:
    def __init__(self, message: str) -> None:
        if not isinstance(message, str):
            raise TypeError(f"TritonError takes a str message, got {type(message).__name__}")
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray) or array.dtype not in _TYPES:
            raise TypeError(f"tensor {name}: a numpy array of a Triton type is needed, got "
                            f"{getattr(array, 'dtype', type(array).__name__)}")
        if not array.flags.c_contiguous:
            raise ValueError(f"tensor {name}: the array must be C-contiguous")
        if array.dtype == object and not all(isinstance(v, bytes) for v in array.reshape(-1)):
            raise TypeError(f"tensor {name}: BYTES elements must be bytes")
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceRequest:
    def __init__(self, inputs: Sequence[Tensor], request_id: str = "") -> None:
        self._inputs, self._id = list(inputs), request_id

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def request_id(self) -> str:
        return self._id


class InferenceResponse:
    def __init__(self, output_tensors: Sequence[Tensor] | None = None, error: TritonError | None = None) -> None:
        tensors = list(output_tensors or [])
        if not all(isinstance(t, Tensor) for t in tensors):
            raise TypeError("output_tensors must be a list of Tensor")
        if error is not None and not isinstance(error, TritonError):
            raise TypeError("error must be a TritonError")
        self._tensors, self._error = tensors, error

    def output_tensors(self) -> list[Tensor]:
        return list(self._tensors)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)
