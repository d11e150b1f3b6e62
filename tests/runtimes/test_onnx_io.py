"""runtimes.onnx_io against what the onnx package itself reports, and fuzzed: whatever the bytes,
reading either succeeds or raises BundleError."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from runtimes.errors import BundleError
from runtimes.onnx_io import ONNX_DTYPES, OnnxTensor, read_graph_io


def oracle(model: onnx.ModelProto) -> tuple[tuple[OnnxTensor, ...], tuple[OnnxTensor, ...]]:
    """What read_graph_io must return, computed from the onnx package's own parse."""
    g = model.graph
    inits = {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}

    def conv(vi: onnx.ValueInfoProto) -> OnnxTensor:
        t = vi.type
        if t.WhichOneof("value") != "tensor_type":
            return OnnxTensor(vi.name, 0, None, None)
        tt = t.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else "?"
                          for d in tt.shape.dim)
        return OnnxTensor(vi.name, tt.elem_type, ONNX_DTYPES.get(tt.elem_type), shape)

    return tuple(conv(v) for v in g.input if v.name not in inits), tuple(conv(v) for v in g.output)


def _model(n_weights: int = 12) -> onnx.ModelProto:
    """A graph with every construct the reader handles."""
    w = numpy_helper.from_array(np.arange(n_weights, dtype=np.float32).reshape(4, -1), "W")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "S"),
                                       numpy_helper.from_array(np.array([0, 3], np.int64), "S_idx"), [4])
    inputs = [
        helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 4]),
        helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, n_weights // 4]),  # an initializer too
        helper.make_tensor_value_info("S", TensorProto.FLOAT, [4]),  # a sparse initializer too
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, None, -1]),
        helper.make_tensor_value_info("half", TensorProto.FLOAT16, []),
        helper.make_tensor_value_info("brain", TensorProto.BFLOAT16, [2]),
        helper.make_tensor_value_info("odd", TensorProto.FLOAT8E4M3FN, [2]),
        helper.make_tensor_sequence_value_info("seq_in", TensorProto.FLOAT, None),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_weights // 4]),
        helper.make_tensor_value_info("unknown_rank", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("prediction", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("doubles", TensorProto.DOUBLE, [3, "n"]),
    ]
    nodes = [helper.make_node("MatMul", ["pixel_values", "W"], ["logits"], name="mm"),
             helper.make_node("Identity", ["logits"], ["unknown_rank"])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w], sparse_initializer=[sparse])
    return helper.make_model(graph, producer_name="test")


MODEL = _model()
MODEL_BYTES = MODEL.SerializeToString()


def test_reads_what_onnx_reads(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(MODEL, str(path))
    ins, outs = read_graph_io(path)
    assert (ins, outs) == oracle(onnx.load(str(path)))
    assert read_graph_io(str(path)) == (ins, outs)
    by_name = {t.name: t for t in ins + outs}
    assert "W" not in by_name and "S" not in by_name
    assert by_name["pixel_values"] == OnnxTensor("pixel_values", 1, "float32", ("batch", 4))
    assert by_name["input_ids"] == OnnxTensor("input_ids", 7, "int64", ("batch", "seq"))
    assert by_name["mask"] == OnnxTensor("mask", 9, "bool", (1, "?", -1))
    assert by_name["half"] == OnnxTensor("half", 10, "float16", ())
    assert by_name["brain"].dtype == "bfloat16" and by_name["doubles"].dtype == "float64"
    assert by_name["odd"].dtype is None and by_name["odd"].shape == (2,)
    assert by_name["seq_in"] == OnnxTensor("seq_in", 0, None, None)
    assert by_name["unknown_rank"].shape is None
    assert [t.name for t in outs] == ["logits", "unknown_rank", "prediction", "doubles"]


def test_open_file_is_read_from_its_position() -> None:
    f = io.BytesIO(b"\xff" * 7 + MODEL_BYTES)
    f.seek(7)
    assert read_graph_io(f) == oracle(MODEL)


def test_repeated_graph_fields_merge_like_protobuf() -> None:
    other = helper.make_model(helper.make_graph(
        [], "h", [helper.make_tensor_value_info("extra", TensorProto.INT32, [5])],
        [helper.make_tensor_value_info("out2", TensorProto.UINT8, ["b"])]))
    data = MODEL_BYTES + other.SerializeToString()
    merged = onnx.ModelProto()
    merged.ParseFromString(data)
    assert read_graph_io(io.BytesIO(data)) == oracle(merged)
    assert read_graph_io(io.BytesIO(data))[0][-1] == OnnxTensor("extra", 6, "int32", (5,))


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_export_with_dynamic_batch(tmp_path: Path, dynamo: bool) -> None:
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    path = tmp_path / "t.onnx"
    if dynamo:  # the weights become initializers only
        dynamic = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
    else:  # the weights are listed as graph inputs too, as older exporters did
        dynamic = {"dynamic_axes": {"x": {0: "batch"}, "logits": {0: "batch"}}, "keep_initializers_as_inputs": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 6),), str(path), input_names=["x"], output_names=["logits"],
                          dynamo=dynamo, **dynamic)
    model = onnx.load(str(path))
    assert len(model.graph.initializer) >= 4
    assert dynamo or len(model.graph.input) > 1
    ins, outs = read_graph_io(path)
    assert (ins, outs) == oracle(model)
    assert ins == (OnnxTensor("x", 1, "float32", ("batch", 6)),)
    assert outs == (OnnxTensor("logits", 1, "float32", ("batch", 3)),)


class CountingFile(io.RawIOBase):
    """A binary file that counts the bytes handed out by read()."""

    def __init__(self, f: io.BufferedReader) -> None:
        self.f, self.bytes_read = f, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bytes_read += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()


def test_large_initializer_is_skipped_not_read(tmp_path: Path) -> None:
    n = 50 * 2**20 // 4
    model = _model(n)
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())
    assert path.stat().st_size > 50 * 2**20
    t0 = time.perf_counter()
    with open(path, "rb") as raw:
        f = CountingFile(raw)
        ins, outs = read_graph_io(f)
    assert time.perf_counter() - t0 < 1.0
    assert f.bytes_read < 2**20
    assert (ins, outs) == oracle(onnx.load(str(path), load_external_data=False))


@pytest.mark.parametrize("data, what", [
    (b"", "no graph"),
    (b"\x08\x01", "no graph"),                          # a varint field, no graph
    (b"\x3a\x05\x00", "past the end"),                  # graph length beyond the file
    (b"\x3a", "ends"),                                  # truncated length
    (b"\x3a\x80", "ends"),                              # truncated varint
    (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10"),
    (b"\x3b", "wire type 3"),                           # a group
    (b"\x3c", "wire type 4"),
    (b"\x3e", "wire type 6"),
    (b"\x00", "field number 0"),
    (b"\x3a\x04\x5a\x05\x0a\x00\x00\x00\x00", "past the end"),  # input longer than its graph
    (b"\x3a\x04\x5a\x02\x0a\x02", "past the end"),              # name longer than its input
    (b"\x3a\x05\x5a\x03\x0a\x01\xff", "UTF-8"),
    (b"\x3a\x03\x5a\x01\x0d", "past the end"),                  # 32-bit field cut short
])
def test_malformed_bytes_raise_bundle_error(data: bytes, what: str) -> None:
    with pytest.raises(BundleError, match=what) as e:
        read_graph_io(io.BytesIO(data))
    assert "<ONNX file>" in str(e.value)


def test_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(MODEL_BYTES[:-3])
    with pytest.raises(BundleError, match="bad.onnx"):
        read_graph_io(bad)
    with pytest.raises(BundleError, match="missing.onnx"):
        read_graph_io(tmp_path / "missing.onnx")
    with pytest.raises(BundleError, match="cannot open"):
        read_graph_io(tmp_path)


def test_memory_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    long_name = helper.make_model(helper.make_graph(
        [], "g", [helper.make_tensor_value_info("x" * (2**20 + 1), TensorProto.FLOAT, [1])], []))
    with pytest.raises(BundleError, match="name of 1048577 bytes"):
        read_graph_io(io.BytesIO(long_name.SerializeToString()))
    monkeypatch.setattr("runtimes.onnx_io._MAX_ITEMS", 5)
    with pytest.raises(BundleError, match="more than 5 inputs"):
        read_graph_io(io.BytesIO(MODEL_BYTES))


def test_wire_type_mismatch_is_skipped_like_protobuf() -> None:
    data = b"\x38\x05" + MODEL_BYTES  # field 7 (graph) sent as a varint: an unknown field to protobuf
    parsed = onnx.ModelProto()
    parsed.ParseFromString(data)
    assert read_graph_io(io.BytesIO(data)) == oracle(parsed)


def _check(data: bytes) -> None:
    """Only BundleError may escape; where protobuf parses the bytes too, the answers agree."""
    try:
        got = read_graph_io(io.BytesIO(data))
    except BundleError:
        return
    parsed = onnx.ModelProto()
    try:
        parsed.ParseFromString(data)
    except Exception:  # protobuf also checks the fields this reader skips
        return
    assert got == oracle(parsed)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.integers(0, len(MODEL_BYTES)), st.lists(st.tuples(st.integers(0, len(MODEL_BYTES) - 1),
                                                             st.integers(0, 7)), max_size=4))
def test_fuzz_truncated_and_flipped_model(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(MODEL_BYTES)
    for i, bit in flips:
        data[i] ^= 1 << bit
    _check(bytes(data[:cut]))
    _check(bytes(data))


@FUZZ
@given(st.lists(st.sampled_from([b"\x3a", b"\x5a", b"\x62", b"\x2a", b"\x0a", b"\x12", b"\x08", b"\x10", b"\x42",
                                 b"\x80", b"\xff", b"\x00", b"\x01", b"\x05", b"\x7f", b"\x0d", b"\x09"]),
                max_size=60))
def test_fuzz_structured_tokens(tokens: list[bytes]) -> None:
    _check(b"".join(tokens))
