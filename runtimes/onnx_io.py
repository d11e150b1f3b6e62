"""The graph inputs and outputs of an ONNX file, read without the ``onnx`` package.

The runtime checks a bundle's manifest against every ONNX file it loads, on machines that have
numpy and a backend but not ``onnx``. This module reads just enough of the protobuf wire format
to do that, and seeks past everything else (nodes, weights), so a file of hundreds of MB costs a
few reads::

    ModelProto      7 graph
    GraphProto      11 input, 12 output (ValueInfoProto); 5 initializer, 15 sparse_initializer
    ValueInfoProto  1 name, 2 type
    TypeProto       1 tensor_type: 1 elem_type, 2 shape: 1 dim: 1 dim_value | 2 dim_param

Repeated occurrences of a message field merge as protobuf merges them, and a field with an
unexpected wire type is skipped as an unknown field, as protobuf does. Only the messages above
are entered, so nesting is bounded by this layout and never by the file. Anything malformed
raises :class:`BundleError` naming the file; nothing else escapes, whatever the bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from runtimes.errors import BundleError

__all__ = ["ONNX_DTYPES", "OnnxTensor", "read_graph_io"]

# TensorProto.DataType -> numpy dtype name. STRING (8) and the float8/4-bit types have no plain
# numpy name and map to None.
ONNX_DTYPES: dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64",
    15: "complex128", 16: "bfloat16",
}

_CHUNK = 1 << 16          # bytes read at a time around the position being parsed
_MAX_STRING = 1 << 20     # a longer tensor or dimension name is taken for corruption
_MAX_ITEMS = 1 << 20      # more inputs + outputs + initializers + dimensions: the same
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class OnnxTensor:
    """One graph input or output: its name, ONNX element type, numpy dtype name and shape.

    ``shape`` is None when the rank is unknown; a dimension is an int (``dim_value``), a str
    (``dim_param``) or ``"?"`` when it has neither.
    """

    name: str
    elem_type: int
    dtype: str | None
    shape: tuple[int | str, ...] | None


class _Reader:
    """A cursor over a seekable binary file, buffered in chunks; positions are absolute."""

    def __init__(self, f: BinaryIO, where: str) -> None:
        self.f, self.where, self.items = f, where, 0
        try:
            self.pos = self.buf_at = f.tell()
            f.seek(0, os.SEEK_END)
            self.size = f.tell()
        except (OSError, ValueError, AttributeError) as e:
            raise BundleError(f"{where}: cannot seek in the file ({e})") from e
        self.buf = b""

    def fail(self, what: str) -> BundleError:
        return BundleError(f"{self.where}: not a valid ONNX model: {what} at byte {self.pos}; "
                           f"re-export the model or rebuild the bundle")

    def _read_at(self, pos: int, n: int) -> bytes:
        try:
            self.f.seek(pos)
            return self.f.read(n) or b""
        except (OSError, ValueError) as e:
            raise BundleError(f"{self.where}: cannot read the file ({e})") from e

    def byte(self, end: int) -> int:
        if self.pos >= end:
            raise self.fail("message ends inside a varint")
        i = self.pos - self.buf_at
        if not 0 <= i < len(self.buf):
            self.buf, self.buf_at, i = self._read_at(self.pos, _CHUNK), self.pos, 0
            if not self.buf:
                raise self.fail("file ends early")
        self.pos += 1
        return self.buf[i]

    def varint(self, end: int) -> int:
        value = 0
        for shift in range(0, 70, 7):
            b = self.byte(end)
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value & _U64
        raise self.fail("varint longer than 10 bytes")

    def length(self, end: int) -> int:
        """A length prefix; returns the end of the payload it announces."""
        n = self.varint(end)
        if n > end - self.pos:
            raise self.fail(f"length {n} runs past the end of its message")
        return self.pos + n

    def string(self, end: int) -> str:
        stop = self.length(end)
        n, i = stop - self.pos, self.pos - self.buf_at
        if n > _MAX_STRING:
            raise self.fail(f"name of {n} bytes")
        data = self.buf[i:i + n] if 0 <= i and i + n <= len(self.buf) else self._read_at(self.pos, n)
        if len(data) != n:
            raise self.fail("file ends early")
        self.pos = stop
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("name is not UTF-8") from None

    def count(self) -> None:
        """Counts one more value kept in memory, so that no file can make the lists unbounded."""
        self.items += 1
        if self.items > _MAX_ITEMS:
            raise self.fail(f"more than {_MAX_ITEMS} inputs, outputs, initializers and dimensions")

    def skip(self, wire: int, end: int) -> None:
        if wire == _VARINT:
            self.varint(end)
        elif wire == _LEN:
            self.pos = self.length(end)
        elif wire in (_I64, _I32):
            n = 8 if wire == _I64 else 4
            if n > end - self.pos:
                raise self.fail("fixed-width field runs past the end of its message")
            self.pos += n
        else:  # 3/4 are groups, 6/7 do not exist
            raise self.fail(f"unsupported wire type {wire}")


def _fields(r: _Reader, end: int, known: dict[int, int]) -> Iterator[int]:
    """The field numbers of one message in [r.pos, end) that ``known`` lists with the wire type
    they arrive in; the caller reads each one's payload. Every other field is skipped."""
    while r.pos < end:
        key = r.varint(end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise r.fail("field number 0")
        if known.get(number) == wire:
            yield number
        else:
            r.skip(wire, end)


def _signed(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _dim(r: _Reader, end: int) -> int | str:
    value: int | str = "?"
    for n in _fields(r, end, {1: _VARINT, 2: _LEN}):
        value = _signed(r.varint(end), 64) if n == 1 else r.string(end)
    return value


def _tensor_type(r: _Reader, end: int, t: dict) -> None:
    for n in _fields(r, end, {1: _VARINT, 2: _LEN}):
        if n == 1:
            t["elem"] = _signed(r.varint(end), 32)
        else:
            stop = r.length(end)
            shape = t["shape"] if t["shape"] is not None else []
            for _ in _fields(r, stop, {1: _LEN}):
                r.count()
                shape.append(_dim(r, r.length(stop)))
            t["shape"] = shape


def _type(r: _Reader, end: int, t: dict) -> None:
    # the oneof ``value``: tensor_type 1, sequence 4, map 5, sparse_tensor 8, optional 9
    for n in _fields(r, end, {1: _LEN, 4: _LEN, 5: _LEN, 8: _LEN, 9: _LEN}):
        stop = r.length(end)
        if n == 1:
            if not t["tensor"]:
                t.update(tensor=True, elem=0, shape=None)
            _tensor_type(r, stop, t)
        else:
            t.update(tensor=False, elem=0, shape=None)
            r.pos = stop


def _value_info(r: _Reader, end: int) -> OnnxTensor:
    name = ""
    t: dict = {"tensor": False, "elem": 0, "shape": None}
    for n in _fields(r, end, {1: _LEN, 2: _LEN}):
        if n == 1:
            name = r.string(end)
        else:
            _type(r, r.length(end), t)
    shape = tuple(t["shape"]) if t["shape"] is not None else None
    return OnnxTensor(name, t["elem"], ONNX_DTYPES.get(t["elem"]), shape)


def _tensor_name(r: _Reader, end: int) -> str:
    """The name (field 8) of a TensorProto; its data fields are skipped by seeking."""
    name = ""
    for _ in _fields(r, end, {8: _LEN}):
        name = r.string(end)
    return name


def _sparse_name(r: _Reader, end: int) -> str:
    """The name of a SparseTensorProto: that of its ``values`` (field 1), merged as protobuf does."""
    name = ""
    for _ in _fields(r, end, {1: _LEN}):
        stop = r.length(end)
        for _ in _fields(r, stop, {8: _LEN}):
            name = r.string(stop)
    return name


def _graph(r: _Reader, end: int, ins: list, outs: list, inits: set) -> None:
    readers: dict[int, Callable[[_Reader, int], object]] = {
        11: _value_info, 12: _value_info, 5: _tensor_name, 15: _sparse_name}
    for n in _fields(r, end, {5: _LEN, 11: _LEN, 12: _LEN, 15: _LEN}):
        got = readers[n](r, r.length(end))
        r.count()
        if n == 11:
            ins.append(got)
        elif n == 12:
            outs.append(got)
        else:
            inits.add(got)


def _read(f: BinaryIO, where: str) -> tuple[tuple[OnnxTensor, ...], tuple[OnnxTensor, ...]]:
    r = _Reader(f, where)
    ins: list[OnnxTensor] = []
    outs: list[OnnxTensor] = []
    inits: set[str] = set()
    seen = False
    for _ in _fields(r, r.size, {7: _LEN}):
        seen = True
        _graph(r, r.length(r.size), ins, outs, inits)
    if not seen:
        raise BundleError(f"{where}: not an ONNX model: it has no graph; re-export the model")
    return tuple(t for t in ins if t.name not in inits), tuple(outs)


def read_graph_io(path: str | os.PathLike | BinaryIO) -> tuple[tuple[OnnxTensor, ...], tuple[OnnxTensor, ...]]:
    """(inputs, outputs) of the graph in an ONNX file, inputs that are initializers left out.

    ``path`` may also be an open, seekable binary file; it is read from its current position.
    Raises :class:`BundleError` naming the file when it is missing or not a valid ONNX model.
    """
    if hasattr(path, "read"):
        return _read(path, str(getattr(path, "name", "<ONNX file>")))  # type: ignore[arg-type]
    where = os.fspath(path)
    try:
        f = open(where, "rb", buffering=0)
    except OSError as e:
        raise BundleError(f"{where}: cannot open the ONNX file ({e.strerror or e})") from e
    with f:
        return _read(f, where)
