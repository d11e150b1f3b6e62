"""Tiny but real ONNX graphs with exactly the inputs and outputs a manifest declares.

Fixtures and fakes need ONNX files that a loader can check against the manifest (names, element
types, ranks, a dynamic batch axis) without a model behind them. Each output here is computed from
the first input: its per-row mean, broadcast to the output's shape and cast to its type, so ONNX
Runtime can run the graph too. ``metadata`` lands in the model's ``metadata_props`` (the TensorRT
fakes read their scripted behaviour from there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import onnx
from onnx import TensorProto, helper

from runtimes.bundle import TensorSpec

__all__ = ["write_stub_onnx", "ONNX_TYPES"]

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
              "int32": TensorProto.INT32, "bool": TensorProto.BOOL}


def _value_info(t: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], list(t.shape))


def write_stub_onnx(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                    metadata: dict[str, Any] | None = None, opset: int = 17) -> Path:
    first = inputs[0]
    nodes = [helper.make_node("Cast", [first.name], ["x_f"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["x_f"], ["x_2d"], axis=1),
             helper.make_node("ReduceMean", ["x_2d"], ["row_mean"], keepdims=1),  # (B, 1)
             helper.make_node("Shape", [first.name], ["in_shape"]),
             helper.make_node("Slice", ["in_shape", "zero", "one"], ["batch_dim"])]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    for i, t in enumerate(outputs):
        rest = [int(d) for d in t.shape[1:]]
        flat = f"flat_{i}"
        inits.append(helper.make_tensor(f"rest_{i}", TensorProto.INT64, [len(rest)], rest))
        nodes.append(helper.make_node("Concat", ["batch_dim", f"rest_{i}"], [f"shape_{i}"], axis=0))
        if rest:
            nodes.append(helper.make_node("Reshape", ["row_mean", f"ones_shape_{i}"], [flat]))
            inits.append(helper.make_tensor(f"ones_shape_{i}", TensorProto.INT64, [len(rest) + 1],
                                            [-1] + [1] * len(rest)))
        else:
            nodes.append(helper.make_node("Flatten", ["row_mean"], [f"col_{i}"], axis=0))
            nodes.append(helper.make_node("Reshape", [f"col_{i}", "minus_one"], [flat]))
        nodes.append(helper.make_node("Expand", [flat, f"shape_{i}"], [f"wide_{i}"]))
        nodes.append(helper.make_node("Cast", [f"wide_{i}"], [t.name], to=ONNX_TYPES[t.dtype]))
    inits.append(helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]))
    graph = helper.make_graph(nodes, Path(path).stem, [_value_info(t) for t in inputs],
                              [_value_info(t) for t in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="freedeploy-tests")
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return Path(path)
