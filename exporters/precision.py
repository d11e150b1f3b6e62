"""Precision goes into the ONNX before any TensorRT build (TensorRT 11 builds only strongly typed
networks and has no fp16/int8 builder flags or INT8 calibrators left):

- ``onnx2fp16``: mixed precision with onnxconverter-common; graph inputs and outputs, Softmax, the
  LayerNorms and the in-graph confidence (softmax -> max / top-k / log) stay fp32;
- ``onnx2int8``: explicit Q/DQ with ONNX Runtime's static quantization (symmetric int8
  activations and per-channel weights on MatMul / Gemm / Conv), calibrated on real samples;
- ``onnx2int8_weights``: int8 weights, per output channel, with ONNX Runtime's dynamic
  quantization (``DynamicQuantizeLinear`` + ``MatMulInteger``: activations are quantized per call,
  so no calibration data). Used for exit heads (precision ``int8-heads``): a head serves one token,
  so at batch 1 its time is the reading of its weights, and int8 reads a quarter of the bytes.
  TensorRT does not parse these ops: ONNX Runtime only.

Both results run in ONNX Runtime on a CPU, which is how export validates them.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from runtimes.errors import ExportError

__all__ = ["onnx2fp16", "onnx2int8", "onnx2int8_weights", "FP32_OPS"]

log = logging.getLogger(__name__)

# ops kept in fp32 in the fp16 graphs: numerically touchy reductions and the confidence computation
FP32_OPS = ("Softmax", "LayerNormalization", "ReduceMax", "ReduceSum", "ArgMax", "TopK", "Log")
# ops whose inputs int8 quantizes: the matrix products carry almost all of the compute
INT8_OPS = ["MatMul", "Gemm", "Conv"]


def _restore_fp32_outputs(model: Any) -> None:
    """Graph outputs must stay fp32: the converter sometimes casts a blocked op's output back to fp16."""
    import onnx

    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(out.name)
        to = next((a for a in node.attribute if a.name == "to"), None) if node is not None and node.op_type == "Cast" else None
        if to is not None:
            to.i = onnx.TensorProto.FLOAT  # the cast's input is fp32 already: no round trip through fp16
        else:
            inner = out.name + "_fp16"
            for n in model.graph.node:
                n.output[:] = [inner if o == out.name else o for o in n.output]
            model.graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], to=onnx.TensorProto.FLOAT))
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def onnx2fp16(src: Path, dst: Path) -> Path:
    """Write a mixed-precision copy of ``src`` with fp32 I/O; returns ``dst``."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per clamped constant
        converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _restore_fp32_outputs(converted)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(dst))
    return dst


def onnx2int8(src: Path, dst: Path, reader: Any) -> Path:
    """Write an explicit Q/DQ int8 copy of ``src`` calibrated on ``reader``'s feeds; returns ``dst``.

    ``reader`` has ``get_next() -> dict | None`` (ONNX Runtime's calibration-reader protocol).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            with contextlib.redirect_stdout(None), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
                # CPU execution provider for calibration: the most robust, and the Q/DQ model builds on
                # every TensorRT version, so calibration happens once rather than per device
                quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                                op_types_to_quantize=INT8_OPS, calibrate_method=CalibrationMethod.MinMax,
                                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        except Exception as exc:  # the quantizer raises many types; report which file failed
            raise ExportError(f"int8 quantization of {src.name} failed: {str(exc).splitlines()[0]}") from exc
    return dst


def onnx2int8_weights(src: Path, dst: Path) -> Path:
    """Write a copy of ``src`` whose MatMul weights are int8 per output channel; returns ``dst``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    nodes = _weight_matmuls(model)
    if not nodes:
        raise ExportError(f"{src.name} has no MatMul with a weight matrix to quantize")
    try:
        with contextlib.redirect_stdout(None), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes)
    except Exception as exc:  # the quantizer raises many types; report which file failed
        raise ExportError(f"int8 weight quantization of {src.name} failed: {str(exc).splitlines()[0]}") from exc
    return dst


def _weight_matmuls(model: Any) -> list[str]:
    """MatMul nodes whose second input is a 2-D weight initializer (x @ W): the only ones whose per-channel
    int8 form ONNX Runtime runs (activation @ activation products, e.g. attention, stay fp32)."""
    weights = {i.name for i in model.graph.initializer if len(i.dims) == 2 and min(i.dims) > 1}
    nameless = [n for n in model.graph.node if not n.name]
    for i, n in enumerate(nameless):  # the quantizer selects nodes by name
        n.name = f"matmul_{i}"
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
