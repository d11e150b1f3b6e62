"""A fake ``cuda.bindings.runtime``, per bindings version, and the fake GPU it shares with the TensorRT fake.

Every call returns ``(cudaError_t, *values)`` like the real bindings and lands in ``FakeGpu.calls``.
Three flavours, told apart by the bindings version (``make_fake_cudart(gpu, version)``), behave as
the real packages did when their calls were executed without a driver (cuda-python 12.6.2.post1,
cuda-bindings 12.9.0, 12.9.4 and 13.0.3 on a machine with no libcuda):

- ``12.6.2.post1`` (cuda-python, the bindings JetPack 6 can use): the runtime is reimplemented on the
  driver API, so with no driver every call that needs one raises ``RuntimeError("Failed to dlopen
  libcuda.so.1")``; ``cudaRuntimeGetVersion`` reports 12060 (its own build); no ``cuda.bindings.utils``.
- ``12.9.0`` (cuda-bindings, CUDA runtime linked in): with no driver ``cudaGetDeviceCount`` returns
  ``(cudaErrorInsufficientDriver, None)`` and ``cudaDriverGetVersion`` ``(cudaSuccess, 0)``; outputs of a
  failed call are None.
- ``12.9.1`` and later, ``13.x``: as 12.9.0, plus ``cuda.bindings.utils.get_cuda_native_handle``;
  ``int(handle)`` is deprecated there, so it is noted in ``FakeGpu.deprecated``.

Bindings built for a newer CUDA major than the driver get ``cudaErrorInsufficientDriver`` too.
``getLocalRuntimeVersion`` reports the libcudart installed (``FakeGpu.local_runtime_version``) or
raises when there is none. ``handle.getPtr()`` is, as in the real bindings, the address of the
handle's storage, never the handle.

Stream capture is as strict as trtexec assumes (samples/common/sampleInference.cpp): a capture begun
while the stream still has unsynchronised work makes TensorRT's enqueue fail (the warm-up's deferred
work must not land in a graph); an engine in ``FakeGpu.uncapturable`` invalidates the capture and
leaves ``cudaErrorStreamCaptureUnsupported`` pending, and a pending error makes the next plain
enqueue fail until ``cudaGetLastError`` clears it. Synchronising or allocating while a stream
captures is refused, as CUDA does in thread-local capture mode.

Two opt-ins make the fake stricter where the default is convenient: ``FakeGpu(deferred=True)`` runs a
stream's operations only when something waits for them (``cudaStreamSynchronize``, or
``cudaEventSynchronize`` on an event recorded after them), as a GPU does, so a host buffer changed
before its copy ran, or a result read before a wait, shows; ``FakeGpu(malloc_fill=0xFF)`` fills new
device allocations with that byte (0xFF: NaN in every float32) instead of zeros, as ``cudaMalloc``
promises nothing. ``cudaMemcpy2DAsync`` and ``cudaMemsetAsync`` exist as in the bindings.
"""

from __future__ import annotations

import ctypes
import types
from typing import Any, Callable

import numpy as np

__all__ = ["FakeGpu", "make_fake_cudart", "bindings_module", "CUDA_FLAVOURS", "DEVICE_BASE"]

DEVICE_BASE = 1 << 48
CUDA_FLAVOURS = ("12.6.2.post1", "12.9.0", "13.0.3")  # cuda-python (JetPack 6), cuda-bindings 12 and 13
_NEEDS_NO_DRIVER = {"cudaRuntimeGetVersion", "getLocalRuntimeVersion", "cudaGetErrorString", "cudaGetLastError",
                    "cudaPeekAtLastError"}


def _version(text: str) -> tuple[int, int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


class FakeGpu:
    """What the fakes share: the call log, deprecation notes, device and pinned memory, streams and capture."""

    def __init__(self, *, gpu_name: str = "NVIDIA H200", compute_capability: tuple[int, int] = (9, 0),
                 devices: int = 1, driver_version: int = 12080, local_runtime_version: int | None = 12060,
                 deferred: bool = False, malloc_fill: int | None = None) -> None:
        self.gpu_name, self.compute_capability, self.devices = gpu_name, compute_capability, devices
        self.driver_version = driver_version  # the CUDA the driver supports; 0: no driver is installed
        self.local_runtime_version = local_runtime_version  # the libcudart on the library path; None: none
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.deprecated: list[str] = []
        self.device: dict[int, bytearray] = {}
        self.pinned: dict[int, Any] = {}  # address -> ctypes buffer kept alive until cudaFreeHost
        self.capturing: dict[int, list[Callable[[], None]]] = {}  # stream handle -> operations captured
        self.capture_invalid: set[int] = set()  # captures an illegal operation invalidated
        self.capture_dirty: set[int] = set()  # captures begun while the stream still had work in flight
        self.pending: dict[int, int] = {}  # stream handle -> operations issued since it was last synchronised
        self.uncapturable: set[str] = set()  # engines (graph keys) whose enqueue cannot be captured
        self.last_error: Any = None  # what cudaGetLastError returns next (None: cudaSuccess)
        self.current_device = 0
        self.deferred, self.malloc_fill = deferred, malloc_fill
        self.queued: dict[int, list[Callable[[], None]]] = {}  # deferred: stream -> operations not run yet
        self.issued: dict[int, int] = {}  # stream -> operations issued on it so far (ran or queued)
        self._next = DEVICE_BASE
        self.trt: types.ModuleType | None = None
        self.cudart: types.ModuleType | None = None

    def record(self, call: str, /, **args: Any) -> None:
        self.calls.append((call, args))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [args for n, args in self.calls if n == name]

    def malloc(self, size: int) -> int:
        address = self._next
        self._next += (size + 255) // 256 * 256 + 256  # a gap, so an overrun never lands in a neighbour
        self.device[address] = bytearray(size) if self.malloc_fill is None else bytearray([self.malloc_fill]) * size
        return address

    def _span(self, address: int, size: int) -> tuple[bytearray, int]:
        for base, mem in self.device.items():
            if base <= address < base + max(len(mem), 1):
                if address + size > base + len(mem):
                    raise AssertionError(f"device access {address:#x}+{size} overruns the {len(mem)}-byte buffer at {base:#x}")
                return mem, address - base
        raise AssertionError(f"{address:#x} is not inside any live device allocation")

    def _check_pinned(self, address: int, size: int) -> None:
        for base, buf in self.pinned.items():
            if base <= address and address + size <= base + ctypes.sizeof(buf):
                return
        raise AssertionError(f"host pointer {address:#x} (+{size}) is not pinned memory from cudaMallocHost/cudaHostAlloc")

    def read(self, address: int, size: int) -> bytes:
        if address >= DEVICE_BASE:
            mem, off = self._span(address, size)
            return bytes(mem[off:off + size])
        self._check_pinned(address, size)
        return ctypes.string_at(address, size)

    def write(self, address: int, data: bytes) -> None:
        if address >= DEVICE_BASE:
            mem, off = self._span(address, len(data))
            mem[off:off + len(data)] = data
        else:
            self._check_pinned(address, len(data))
            ctypes.memmove(address, data, len(data))

    def array(self, address: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """What device memory at ``address`` holds, as numpy (for assertions)."""
        dtype = np.dtype(dtype)
        return np.frombuffer(self.read(address, int(np.prod(shape)) * dtype.itemsize), dtype=dtype).reshape(shape)

    def issue(self, stream: int, op: Callable[[], None]) -> None:
        """Run ``op`` now (``deferred``: when the stream is waited for), or record it into the stream's
        capture; either way the stream has work in flight."""
        if stream in self.capturing:
            self.capturing[stream].append(op)
            return
        if self.deferred:
            self.queued.setdefault(stream, []).append(op)
        else:
            op()
        self.issued[stream] = self.issued.get(stream, 0) + 1
        self.pending[stream] = self.pending.get(stream, 0) + 1

    def flush(self, stream: int, upto: int | None = None) -> None:
        """Deferred: run the stream's queued operations, those issued before the ``upto``-th or all."""
        queue = self.queued.get(stream, [])
        count = len(queue) if upto is None else max(0, len(queue) - (self.issued.get(stream, 0) - upto))
        ops, self.queued[stream] = queue[:count], queue[count:]
        for op in ops:
            op()


class _Member(int):
    """A pybind11 / Cython enum member: compares as an int, has ``.name``."""

    def __new__(cls, enum: str, name: str, value: int) -> "_Member":
        obj = super().__new__(cls, value)
        obj.name, obj.enum = name, enum
        return obj

    @property
    def value(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"<{self.enum}.{self.name}: {int(self)}>"

    __str__ = __repr__


class _Enum:
    """An enum type: members as attributes; a removed name raises, a deprecated one is noted."""

    def __init__(self, gpu: FakeGpu, name: str, members: dict[str, int], deprecated: set[str] = frozenset()) -> None:
        self._gpu, self._name, self._deprecated = gpu, name, set(deprecated)
        self._members = {k: _Member(name, k, v) for k, v in members.items()}

    def __getattr__(self, item: str) -> _Member:
        if not item.startswith("_") and item in self._members:
            if item in self._deprecated:
                self._gpu.deprecated.append(f"{self._name}.{item}")
            return self._members[item]
        raise AttributeError(f"type object '{self._name}' has no attribute '{item}'")

    @property
    def __members__(self) -> dict[str, _Member]:
        return dict(self._members)


class _Handle:
    """A cuda-bindings handle type (cudaStream_t, ...): ``int(handle)`` is the raw pointer (deprecated from 12.9.1)."""

    _deprecated_int: FakeGpu | None = None  # set per flavour: where to note int() as deprecated

    def __init__(self, value: int = 0) -> None:
        self._value = int(value)

    def __int__(self) -> int:
        if self._deprecated_int is not None:
            self._deprecated_int.deprecated.append(f"int({type(self).__name__}) (use get_cuda_native_handle)")
        return self._value

    def getPtr(self) -> int:  # noqa: N802 - the real name: the address of the storage, not the handle
        return id(self)


def _raw(handle: Any) -> int:
    """The pointer behind a handle or int, for the fake's own bookkeeping (never noted as deprecated)."""
    return handle._value if isinstance(handle, _Handle) else int(handle)


def bindings_module(runtime: types.ModuleType, version: str) -> tuple[types.ModuleType, dict[str, types.ModuleType]]:
    """``cuda.bindings`` for ``runtime`` (with ``utils`` from 12.9.1 on), and every module to put in sys.modules."""
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, bindings.__path__, bindings.__version__ = runtime, [], version
    modules = {"cuda.bindings": bindings, "cuda.bindings.runtime": runtime}
    if _version(version) >= (12, 9, 1):
        utils = types.ModuleType("cuda.bindings.utils")

        def get_cuda_native_handle(obj: Any) -> int:
            if not isinstance(obj, _Handle):
                raise TypeError(f"Unknown type: {type(obj)}")
            return obj._value

        utils.get_cuda_native_handle = get_cuda_native_handle
        bindings.utils = utils
        modules["cuda.bindings.utils"] = utils
    return bindings, modules


def make_fake_cudart(gpu: FakeGpu | None = None, version: str = "12.9.0") -> types.ModuleType:
    """``cuda.bindings.runtime`` as the bindings of ``version`` behave (see the module docstring)."""
    gpu = gpu or FakeGpu()
    flavour = _version(version)
    reimplemented = flavour < (12, 8, 0)  # cuda-python <= 12.6.2: the runtime rebuilt on the driver API
    built_for = flavour[0] * 1000 + flavour[1] * 10
    rt = types.ModuleType("cuda.bindings.runtime")
    err = _Enum(gpu, "cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1, "cudaErrorMemoryAllocation": 2,
                                     "cudaErrorInvalidPitchValue": 12, "cudaErrorInsufficientDriver": 35,
                                     "cudaErrorNoDevice": 100,
                                     "cudaErrorInvalidDevice": 101, "cudaErrorInvalidResourceHandle": 400,
                                     "cudaErrorStreamCaptureUnsupported": 900,
                                     "cudaErrorStreamCaptureInvalidated": 901})
    kind = _Enum(gpu, "cudaMemcpyKind", {"cudaMemcpyHostToHost": 0, "cudaMemcpyHostToDevice": 1,
                                         "cudaMemcpyDeviceToHost": 2, "cudaMemcpyDeviceToDevice": 3, "cudaMemcpyDefault": 4})
    rt.cudaError_t, rt.cudaMemcpyKind = err, kind
    rt.cudaStreamCaptureMode = _Enum(gpu, "cudaStreamCaptureMode", {"cudaStreamCaptureModeGlobal": 0,
                                                                    "cudaStreamCaptureModeThreadLocal": 1,
                                                                    "cudaStreamCaptureModeRelaxed": 2})
    rt.cudaHostAllocDefault, rt.cudaHostAllocMapped = 0, 2
    ok = err.cudaSuccess
    deprecated_int = gpu if flavour >= (12, 9, 1) else None
    for name in ("cudaStream_t", "cudaEvent_t", "cudaGraph_t", "cudaGraphExec_t"):
        setattr(rt, name, type(name, (_Handle,), {"_deprecated_int": deprecated_int}))
    counter = iter(range(1, 1 << 30))
    graphs: dict[int, list[Callable[[], None]]] = {}
    events: dict[int, int] = {}  # event -> the stream it was last recorded on
    recorded: dict[int, int] = {}  # event -> how many operations its stream had been given when it was recorded
    failed = None if not reimplemented else 0  # what a failed call returns in place of its outputs

    class cudaDeviceProp:  # noqa: N801 - the real name
        def __init__(self) -> None:
            self.name = gpu.gpu_name.encode() + b"\x00" * 4
            self.major, self.minor = gpu.compute_capability
            self.totalGlobalMem = 141 << 30

    def driver_problem(name: str) -> tuple | None:
        """What a call returns (or raises) when the driver is missing or older than these bindings need."""
        if name in _NEEDS_NO_DRIVER or (gpu.driver_version and gpu.driver_version // 1000 >= flavour[0]):
            return None
        if not gpu.driver_version and reimplemented:
            raise RuntimeError("Failed to dlopen libcuda.so.1")
        if name == "cudaDriverGetVersion":
            return ok, gpu.driver_version
        return err.cudaErrorInsufficientDriver, failed

    def fn(f: Callable[..., tuple]) -> Callable[..., tuple]:
        def call(*args: Any) -> tuple:
            gpu.record(f.__name__, args=args)
            problem = driver_problem(f.__name__)
            return problem if problem is not None else f(*args)
        call.__name__ = f.__name__
        setattr(rt, f.__name__, call)
        return call

    def refused_during_capture() -> _Member | None:
        """CUDA refuses allocations and synchronisation while a stream captures, and invalidates the capture."""
        if not gpu.capturing:
            return None
        gpu.capture_invalid.update(gpu.capturing)
        gpu.last_error = err.cudaErrorStreamCaptureUnsupported
        return err.cudaErrorStreamCaptureUnsupported

    @fn
    def cudaGetDeviceCount() -> tuple:  # noqa: N802
        return (ok, gpu.devices) if gpu.devices else (err.cudaErrorNoDevice, failed)

    @fn
    def cudaGetDevice() -> tuple:  # noqa: N802
        return ok, gpu.current_device

    @fn
    def cudaSetDevice(device: int) -> tuple:  # noqa: N802
        if not 0 <= device < gpu.devices:
            return (err.cudaErrorInvalidDevice,)
        gpu.current_device = device
        return (ok,)

    @fn
    def cudaGetDeviceProperties(device: int) -> tuple:  # noqa: N802
        return (ok, cudaDeviceProp()) if 0 <= device < gpu.devices else (err.cudaErrorInvalidDevice, failed)

    @fn
    def cudaDriverGetVersion() -> tuple:  # noqa: N802
        return ok, gpu.driver_version

    @fn
    def cudaRuntimeGetVersion() -> tuple:  # noqa: N802 - the CUDA these bindings were built for
        return ok, built_for

    @fn
    def getLocalRuntimeVersion() -> tuple:  # noqa: N802 - the libcudart found on the library path
        if gpu.local_runtime_version is None:
            raise RuntimeError(f"Failed to dlopen libcudart.so.{flavour[0]}")
        return ok, gpu.local_runtime_version

    @fn
    def cudaGetErrorString(error: _Member) -> tuple:  # noqa: N802
        return ok, error.name.encode()

    @fn
    def cudaGetLastError() -> tuple:  # noqa: N802
        error, gpu.last_error = gpu.last_error or ok, None
        return (error,)

    @fn
    def cudaPeekAtLastError() -> tuple:  # noqa: N802
        return (gpu.last_error or ok,)

    @fn
    def cudaMalloc(size: int) -> tuple:  # noqa: N802
        refused = refused_during_capture()
        return (refused, failed) if refused is not None else (ok, gpu.malloc(size))

    @fn
    def cudaFree(devPtr: int) -> tuple:  # noqa: N802, N803
        return (ok,) if gpu.device.pop(int(devPtr), None) is not None else (err.cudaErrorInvalidValue,)

    def _host(size: int) -> tuple:
        refused = refused_during_capture()
        if refused is not None:
            return refused, failed
        buf = ctypes.create_string_buffer(size)
        gpu.pinned[ctypes.addressof(buf)] = buf
        return ok, ctypes.addressof(buf)

    @fn
    def cudaMallocHost(size: int) -> tuple:  # noqa: N802
        return _host(size)

    @fn
    def cudaHostAlloc(size: int, flags: int) -> tuple:  # noqa: N802
        return _host(size)

    @fn
    def cudaFreeHost(ptr: int) -> tuple:  # noqa: N802
        return (ok,) if gpu.pinned.pop(int(ptr), None) is not None else (err.cudaErrorInvalidValue,)

    @fn
    def cudaMemcpyAsync(dst: int, src: int, count: int, kind_: _Member, stream: Any) -> tuple:  # noqa: N802
        dst, src, handle = int(dst), int(src), _raw(stream)
        expect = {"cudaMemcpyHostToDevice": (True, False), "cudaMemcpyDeviceToHost": (False, True),
                  "cudaMemcpyDeviceToDevice": (True, True)}.get(kind_.name)
        if expect is None or expect != (dst >= DEVICE_BASE, src >= DEVICE_BASE):
            return (err.cudaErrorInvalidValue,)
        gpu.issue(handle, lambda: gpu.write(dst, gpu.read(src, count)))
        return (ok,)

    @fn
    def cudaMemcpy2DAsync(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int,  # noqa: N802
                          kind_: _Member, stream: Any) -> tuple:
        dst, src, handle = int(dst), int(src), _raw(stream)
        expect = {"cudaMemcpyHostToDevice": (True, False), "cudaMemcpyDeviceToHost": (False, True),
                  "cudaMemcpyDeviceToDevice": (True, True)}.get(kind_.name)
        if expect is None or expect != (dst >= DEVICE_BASE, src >= DEVICE_BASE):
            return (err.cudaErrorInvalidValue,)
        if width > dpitch or width > spitch:
            return (err.cudaErrorInvalidPitchValue,)

        def rows() -> None:
            for row in range(height):
                gpu.write(dst + row * dpitch, gpu.read(src + row * spitch, width))
        gpu.issue(handle, rows)
        return (ok,)

    @fn
    def cudaMemsetAsync(devPtr: int, value: int, count: int, stream: Any) -> tuple:  # noqa: N802, N803
        ptr = int(devPtr)
        if ptr < DEVICE_BASE:
            return (err.cudaErrorInvalidValue,)
        gpu.issue(_raw(stream), lambda: gpu.write(ptr, bytes([int(value) & 0xFF]) * count))
        return (ok,)

    @fn
    def cudaStreamCreate() -> tuple:  # noqa: N802
        return ok, rt.cudaStream_t(next(counter))

    @fn
    def cudaStreamDestroy(stream: Any) -> tuple:  # noqa: N802
        return (ok,)

    @fn
    def cudaStreamSynchronize(stream: Any) -> tuple:  # noqa: N802
        if _raw(stream) in gpu.capturing:
            return (refused_during_capture(),)
        gpu.flush(_raw(stream))
        gpu.pending.pop(_raw(stream), None)  # every operation has run now
        return (ok,)

    @fn
    def cudaEventCreate() -> tuple:  # noqa: N802
        return ok, rt.cudaEvent_t(next(counter))

    @fn
    def cudaEventRecord(event: Any, stream: Any = 0) -> tuple:  # noqa: N802
        events[_raw(event)] = _raw(stream)
        recorded[_raw(event)] = gpu.issued.get(_raw(stream), 0)  # the work the event waits for
        return (ok,)

    @fn
    def cudaEventSynchronize(event: Any) -> tuple:  # noqa: N802
        if gpu.capturing:
            return (refused_during_capture(),)
        stream = events.get(_raw(event), -1)
        gpu.flush(stream, recorded.get(_raw(event)))
        if not gpu.queued.get(stream):
            gpu.pending.pop(stream, None)
        return (ok,)

    @fn
    def cudaEventDestroy(event: Any) -> tuple:  # noqa: N802
        return (ok,)

    @fn
    def cudaStreamBeginCapture(stream: Any, mode: _Member) -> tuple:  # noqa: N802
        handle = _raw(stream)
        if handle == 0:  # the legacy default stream cannot be captured
            return (err.cudaErrorStreamCaptureUnsupported,)
        gpu.capturing[handle] = []
        if gpu.pending.get(handle):
            gpu.capture_dirty.add(handle)
        return (ok,)

    @fn
    def cudaStreamEndCapture(stream: Any) -> tuple:  # noqa: N802
        handle = _raw(stream)
        ops = gpu.capturing.pop(handle)
        gpu.capture_dirty.discard(handle)
        if handle in gpu.capture_invalid:
            gpu.capture_invalid.discard(handle)
            return err.cudaErrorStreamCaptureInvalidated, (failed if failed is None else rt.cudaGraph_t(0))
        graph = rt.cudaGraph_t(next(counter))
        graphs[graph._value] = ops
        return ok, graph

    @fn
    def cudaGraphInstantiate(graph: Any, flags: int) -> tuple:  # noqa: N802 - cuda-bindings 12.x/13: (graph, flags)
        graph_exec = rt.cudaGraphExec_t(next(counter))
        graphs[graph_exec._value] = list(graphs[_raw(graph)])
        return ok, graph_exec

    @fn
    def cudaGraphLaunch(graphExec: Any, stream: Any) -> tuple:  # noqa: N802, N803
        ops = list(graphs[_raw(graphExec)])

        def replay() -> None:
            for op in ops:
                op()
        gpu.issue(_raw(stream), replay)
        return (ok,)

    @fn
    def cudaGraphDestroy(graph: Any) -> tuple:  # noqa: N802
        return (ok,) if graphs.pop(_raw(graph), None) is not None else (err.cudaErrorInvalidResourceHandle,)

    @fn
    def cudaGraphExecDestroy(graphExec: Any) -> tuple:  # noqa: N802, N803
        return (ok,) if graphs.pop(_raw(graphExec), None) is not None else (err.cudaErrorInvalidResourceHandle,)

    rt.cudaDeviceProp = cudaDeviceProp
    gpu.cudart = rt
    return rt
