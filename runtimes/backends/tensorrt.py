"""TensorRT backend: the bundle's engine set for this GPU, chained on the device.

Written against the TensorRT 10.x and 11.x Python APIs (checked with the 10.3 API docs, the
version JetPack 6 ships, and the 11.0-11.4 migration guides) and cuda-bindings 12.x
(``from cuda.bindings import runtime as cudart``). Only the name-based tensor API is used:
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``; no binding indices, no
``execute_v2`` (both removed in 10.0). Every cudart call returns ``(error, *values)``;
``cuda_check`` turns a failure into one clear error.

Memory: each tensor name has one device buffer, allocated once at the bundle's maximum batch.
``hidden_<e>`` written by segment k is read by exit k and segment k+1 from that same buffer: the
next engine's input address *is* the previous engine's output address, so nothing is copied
between stages. Model inputs go host -> pinned staging -> device; only the tensors the loop
fetches (confidences, predictions: a few bytes per row) come back, into pinned host buffers,
followed by an event synchronize.

Compaction is done with device-to-device ``cudaMemcpyAsync`` copies, one per contiguous run of
kept rows, into a second (ping-pong) buffer of the same size that then becomes the tensor's
buffer. No custom kernel.

CUDA graphs (``cuda_graphs=True``) are used at batch 1 only. The first batch-1 run of a graph
executes normally, which is the warm-up TensorRT needs after a shape change, and is then captured
on the backend's own (non-default) stream. Later batch-1 runs replay it with ``cudaGraphLaunch``.
A graph freezes shapes and addresses, so it is keyed by graph key and buffer addresses, and it
replays only while the context still holds batch-1 shapes. Everything else runs plainly.

Threads: execution contexts are not thread-safe, so every call takes the backend's lock. Each
state borrows its own buffer set from a pool and returns it when the state is garbage-collected.
Calls from several threads therefore get correct answers, but they run one at a time on one
stream. For parallel throughput use one Runtime per thread, or a pool of Runtimes: each has its
own contexts, stream and buffers.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtimes.backends.base import Backend
from runtimes.bundle import ENGINE_PRECISIONS, Bundle, decision_field
from runtimes.backends.tensorrt_device import (BUILD_FILE, BUILD_SCHEMA, ENGINES_DIR, DeviceInfo, cuda_check,
                                               detect_device, find_engine_dir, import_cudart, import_tensorrt,
                                               install_hint, read_build, target_key)
from runtimes.errors import BackendUnavailableError, BundleError, ConfigError, InputError

__all__ = ["TensorRTBackend", "DeviceInfo", "detect_device", "target_key", "read_build", "find_engine_dir",
           "import_tensorrt", "import_cudart", "cuda_check", "install_hint", "BUILD_FILE", "BUILD_SCHEMA", "ENGINES_DIR"]

log = logging.getLogger(__name__)



# -- the backend ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    dtype: np.dtype
    row_shape: tuple[int, ...]  # the dims after the batch axis (every dim when not batched)
    batched: bool  # "batch" is the first dim

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


class _Buffers:
    """The device and pinned host memory one in-flight state uses; pooled between states."""

    def __init__(self) -> None:
        self.device: dict[str, list[int]] = {}  # name -> [buffer, ping-pong buffer (0 until a compaction needs it)]
        self.pinned: dict[str, int] = {}  # name -> pinned host buffer: staging for inputs, landing for fetches


class _State:
    """One infer call: how many rows are live and which ping-pong buffer holds each tensor."""

    def __init__(self, owner: "TensorRTBackend", buffers: _Buffers, batch: int) -> None:
        self.owner, self.buffers, self.batch = owner, buffers, batch
        self.side: dict[str, int] = {}  # name -> 0 or 1; absent means 0
        self.present: set[str] = set()  # tensors written so far

    def address(self, name: str) -> int:
        return self.buffers.device[name][self.side.get(name, 0)]


class TensorRTBackend(Backend):
    name = "tensorrt"
    devices = ("cuda", "cuda:N")
    takes = ("engine_dir", "cuda_graphs")

    def __init__(self, bundle: Bundle, precision: str = "fp16", device: str = "cuda", engine_dir: str | None = None,
                 cuda_graphs: bool = False, **options: Any) -> None:
        if options:  # never guess what an option meant
            raise ConfigError(f"the tensorrt backend takes {' and '.join(self.takes)}, not {', '.join(sorted(options))}")
        if precision not in ENGINE_PRECISIONS:
            raise ConfigError(f"precision {precision} runs on ONNX Runtime only (TensorRT does not parse its integer "
                              f"MatMul); TensorRT runs {', '.join(ENGINE_PRECISIONS)}")
        super().__init__(bundle, precision, device)
        self.device_index = _device_index(device)
        self.cuda_graphs = bool(cuda_graphs)
        self._lock = threading.Lock()
        self._closed = False
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        self._shapes: dict[str, int] = {}  # graph key -> batch its context's input shapes were last set to
        self._graphs: dict[tuple, Any] = {}  # (graph key, addresses) -> instantiated CUDA graph (batch 1)
        self._uncapturable: set[str] = set()
        self._sets: list[_Buffers] = []
        self._free: list[_Buffers] = []
        self._stream = self._event = self._runtime = None
        self._trt, self._cudart = import_tensorrt(), import_cudart()
        try:
            self._setup(engine_dir)
        except BaseException:
            self.close()
            raise

    def _setup(self, engine_dir: str | None) -> None:
        trt, cudart = self._trt, self._cudart
        self.info = detect_device(self.device_index)  # first: it says when cuda:N does not exist
        self._activate()
        self.engine_dir = self._engine_dir(engine_dir)
        self.build = read_build(self.engine_dir)
        self.max_batch = self.bundle.batch.max
        self._tensors = _layouts(self.bundle)
        # the decisions (logits, confidences, predictions): what fetch reads, so they get pinned landing buffers
        self._results = sorted({t.name for g in self.bundle.graphs for t in g.outputs
                                if decision_field(t.role)})
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        for graph in self.bundle.graphs:
            self._load(graph.key)
        self._stream = self._cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = int(self._stream)  # execute_async_v3 takes the raw handle
        self._event = self._cuda(cudart.cudaEventCreate(), "cudaEventCreate")
        self._free.append(self._new_buffers())  # allocate up front: out-of-memory shows at load, not mid-call

    @property
    def _rebuild(self) -> str:
        return f"`freedeploy build {self.bundle.root} --target trt-{self.precision}`"

    def _engine_dir(self, engine_dir: str | None) -> Path:
        if engine_dir is None:
            return find_engine_dir(self.bundle, self.precision, self.info)
        path = Path(engine_dir)
        if not path.is_absolute() and self.bundle.root is not None:
            path = self.bundle.root / path
        build, want = read_build(path), target_key(self.info, self.precision)
        if build.precision != self.precision:
            raise ConfigError(f"engine set {path} holds {build.precision} engines, but precision {self.precision} "
                              "was asked for")
        if build.key != want:
            raise BackendUnavailableError(f"engine set {path} was built for {build.key}, this device needs {want}: "
                                          f"run {self._rebuild} here")
        return path

    def _load(self, key: str) -> None:
        entry = self.build.graphs.get(key)
        if entry is None:
            raise BundleError(f"{self.engine_dir / BUILD_FILE} lists no plan file for {key}; rebuild with {self._rebuild}")
        path = self.engine_dir / entry.plan
        if not path.is_file():
            raise BundleError(f"engine plan {path} is missing; rebuild with {self._rebuild}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.plan_sha256:
            raise BundleError(f"{path}: checksum mismatch with {BUILD_FILE}: the plan was changed or corrupted; "
                              f"rebuild with {self._rebuild} --overwrite")
        onnx = self.bundle.graph(key).files[self.precision]
        if entry.onnx_sha256 != self.bundle.files.get(onnx):
            raise BundleError(f"{path.name} was built from another {onnx} than the bundle holds now; "
                              f"rebuild with {self._rebuild} --overwrite")
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(f"TensorRT {self._trt.__version__} cannot load {path} (built with TensorRT "
                              f"{self.build.tensorrt_version}); see the TensorRT log and rebuild with {self._rebuild}")
        self._check_engine(key, engine)
        context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailableError(f"TensorRT could not create an execution context for {key} (GPU memory?)")
        self._engines[key], self._contexts[key] = engine, context

    def _check_engine(self, key: str, engine: Any) -> None:
        """The engine's I/O must be what the bundle says, or chaining by name would bind the wrong memory."""
        mode = self._trt.TensorIOMode
        spec = self.bundle.graph(key)
        want = {**{t.name: mode.INPUT for t in spec.inputs}, **{t.name: mode.OUTPUT for t in spec.outputs}}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(want):
            raise BundleError(f"{key}: the engine's tensors {sorted(names)} differ from the bundle's {sorted(want)}; "
                              f"rebuild with {self._rebuild} --overwrite")
        for name in names:
            t = self._tensors[name]
            dtype = np.dtype(self._trt.nptype(engine.get_tensor_dtype(name)))
            if engine.get_tensor_mode(name) != want[name] or dtype != t.dtype:
                raise BundleError(f"{key}: tensor {name} is a {dtype} {engine.get_tensor_mode(name)} in the engine, "
                                  f"the bundle says {t.dtype} {want[name]}")
            if want[name] == mode.INPUT and t.batched:
                top = int(engine.get_tensor_profile_shape(name, 0)[2][0])
                if top < self.max_batch:
                    raise BundleError(f"{key}: the engine takes at most batch {top}, the bundle promises "
                                      f"{self.max_batch}; rebuild with {self._rebuild} --overwrite")

    # memory --------------------------------------------------------------------------------------------------
    def _cuda(self, result: Any, call: str) -> Any:
        return cuda_check(self._cudart, result, call)

    def _activate(self) -> None:
        if self.device_index:  # the current device is per thread; device 0 is every thread's default
            self._cuda(self._cudart.cudaSetDevice(self.device_index), "cudaSetDevice")

    def _nbytes(self, t: _Tensor) -> int:
        return t.row_bytes * (self.max_batch if t.batched else 1)

    def _malloc(self, nbytes: int) -> int:
        return int(self._cuda(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def _malloc_host(self, nbytes: int) -> int:
        return int(self._cuda(self._cudart.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))

    def _new_buffers(self) -> _Buffers:
        bufs = _Buffers()
        self._sets.append(bufs)
        for name, t in self._tensors.items():
            bufs.device[name] = [self._malloc(self._nbytes(t)), 0]
        for name in (*(s.name for s in self.bundle.inputs), *self._results):  # staging, and landing for fetches
            bufs.pinned[name] = self._malloc_host(self._nbytes(self._tensors[name]))
        return bufs

    def _give_back(self, bufs: _Buffers) -> None:
        """Called when a state is garbage-collected; list.append is atomic, so no lock (GC may run anywhere)."""
        if not self._closed:
            self._free.append(bufs)

    def _own(self, state: Any) -> _State:
        if not isinstance(state, _State) or state.owner is not self:
            raise InputError("this state was not made by this TensorRT backend's start()")
        if self._closed:
            raise ConfigError("this TensorRT backend is closed")
        self._activate()
        return state

    # the Backend interface -----------------------------------------------------------------------------------
    def start(self, inputs: dict[str, np.ndarray]) -> _State:
        arrays, batch = self._check_inputs(inputs)
        cudart = self._cudart
        with self._lock:
            if self._closed:
                raise ConfigError("this TensorRT backend is closed")
            self._activate()
            bufs = self._free.pop() if self._free else self._new_buffers()
            state = _State(self, bufs, batch)
            weakref.finalize(state, self._give_back, bufs)
            for name, a in arrays.items():
                ctypes.memmove(bufs.pinned[name], a.ctypes.data, a.nbytes)
                self._cuda(cudart.cudaMemcpyAsync(state.address(name), bufs.pinned[name], a.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                           f"cudaMemcpyAsync({name} to device)")
                state.present.add(name)
        return state

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        specs = {s.name: s for s in self.bundle.inputs}
        if set(inputs) != set(specs):
            raise InputError(f"inputs must be exactly {sorted(specs)}, got {sorted(inputs)}")
        out, sizes = {}, set()
        for name, spec in specs.items():
            a, t = np.ascontiguousarray(inputs[name]), self._tensors[name]
            if a.dtype != np.dtype(spec.dtype):
                raise InputError(f"input {name!r} must be {spec.dtype}, got {a.dtype}")
            if a.ndim != len(t.row_shape) + 1 or a.shape[1:] != t.row_shape:
                raise InputError(f"input {name!r} must have shape (batch, {', '.join(map(str, t.row_shape))}), got {a.shape}")
            out[name] = a
            sizes.add(a.shape[0])
        if len(sizes) != 1:
            raise InputError(f"inputs need one common batch size, got {sorted(sizes)}")
        batch = sizes.pop()
        if batch > self.max_batch:
            raise InputError(f"batch {batch} is larger than the engines' maximum batch {self.max_batch}; split it "
                             "(Runtime.infer does) or export the bundle with a larger --max-batch")
        if batch < self.bundle.batch.min:
            raise InputError(f"batch {batch} is smaller than the engines' minimum batch {self.bundle.batch.min}")
        return out, batch

    def run(self, graph: str, state: _State) -> None:
        spec = self.bundle.graph(graph)
        with self._lock:
            state = self._own(state)
            missing = [t.name for t in spec.inputs if t.name not in state.present]
            if missing:
                raise InputError(f"{graph} reads {missing}, which this state does not hold yet: run the graphs in chain order")
            if state.batch:
                names = [t.name for t in (*spec.inputs, *spec.outputs)]
                self._enqueue(graph, spec.inputs, state.batch, names, tuple(state.address(n) for n in names))
            state.present.update(t.name for t in spec.outputs)

    def _enqueue(self, key: str, inputs: Sequence[Any], batch: int, names: list[str], addresses: tuple[int, ...]) -> None:
        cudart, ctx = self._cudart, self._contexts[key]
        if batch == 1 and self._shapes.get(key) == 1 and (key, addresses) in self._graphs:
            self._cuda(cudart.cudaGraphLaunch(self._graphs[(key, addresses)], self._stream), "cudaGraphLaunch")
            return
        if self._shapes.get(key) != batch:
            for t in inputs:
                lay = self._tensors[t.name]
                shape = (batch, *lay.row_shape) if lay.batched else lay.row_shape
                if not ctx.set_input_shape(t.name, shape):
                    raise InputError(f"TensorRT rejected shape {shape} for {t.name} of {key}; see the TensorRT log")
            self._shapes[key] = batch
        for name, address in zip(names, addresses):  # every call: compaction moves tensors between buffers
            if not ctx.set_tensor_address(name, address):
                raise BackendUnavailableError(f"TensorRT rejected the device address of {name} in {key}")
        if not ctx.execute_async_v3(self._stream_handle):
            raise BackendUnavailableError(f"TensorRT could not enqueue {key} at batch {batch}; see the TensorRT log")
        if self.cuda_graphs and batch == 1 and key not in self._uncapturable and (key, addresses) not in self._graphs:
            self._capture(key, ctx, addresses)

    def _capture(self, key: str, ctx: Any, addresses: tuple[int, ...]) -> None:
        """Record ``key`` at batch 1 right after a plain run (the warm-up); capturing does not execute."""
        cudart = self._cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads' CUDA calls stay legal
        self._cuda(cudart.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        ok = ctx.execute_async_v3(self._stream_handle)
        err, graph = cudart.cudaStreamEndCapture(self._stream)
        if not ok or err != cudart.cudaError_t.cudaSuccess:  # some engines cannot be captured: run them plainly
            log.info("CUDA graph capture of %s failed (%s); it runs without a graph", key, getattr(err, "name", err))
            self._uncapturable.add(key)
            if err == cudart.cudaError_t.cudaSuccess:
                self._cuda(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            return
        try:
            self._graphs[(key, addresses)] = self._cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self._cuda(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def fetch(self, state: _State, names: Sequence[str]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        with self._lock:
            state = self._own(state)
            copies = []
            for name in names:
                if name not in state.present:
                    raise InputError(f"{name!r} has not been computed in this state; run the graph that writes it first")
                t, bufs = self._tensors[name], state.buffers
                if name not in bufs.pinned:  # a tensor other graphs read (hidden states): pinned on first fetch
                    bufs.pinned[name] = self._malloc_host(self._nbytes(t))
                rows = state.batch if t.batched else 1
                if rows * t.row_bytes:
                    self._cuda(cudart.cudaMemcpyAsync(bufs.pinned[name], state.address(name), rows * t.row_bytes,
                                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                               f"cudaMemcpyAsync({name} to host)")
                copies.append((name, bufs.pinned[name], t, rows))
            self._cuda(cudart.cudaEventRecord(self._event, self._stream), "cudaEventRecord")
            self._cuda(cudart.cudaEventSynchronize(self._event), "cudaEventSynchronize")
            return {name: _host_array(ptr, t, rows) for name, ptr, t, rows in copies}

    def compact(self, state: _State, keep: np.ndarray) -> None:
        cudart = self._cudart
        with self._lock:
            state = self._own(state)
            rows = _check_keep(keep, state.batch)
            if len(rows) == state.batch:
                return
            runs = _runs(rows)
            for name in sorted(state.present):
                t = self._tensors[name]
                if not t.batched:
                    continue
                pair, src = state.buffers.device[name], state.side.get(name, 0)
                if not pair[1 - src]:
                    pair[1 - src] = self._malloc(self._nbytes(t))
                for src_row, dst_row, count in runs:
                    self._cuda(cudart.cudaMemcpyAsync(pair[1 - src] + dst_row * t.row_bytes,
                                                      pair[src] + src_row * t.row_bytes, count * t.row_bytes,
                                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream),
                               f"cudaMemcpyAsync({name} compaction)")
                state.side[name] = 1 - src
            state.batch = len(rows)

    def close(self) -> None:
        """Free buffers, CUDA graphs, the event and the stream; then contexts, engines and the runtime."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cudart, quiet = self._cudart, self._quiet
            if self._stream is not None:
                quiet(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            for graph_exec in self._graphs.values():
                quiet(cudart.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
            for bufs in self._sets:
                for ptr in (p for pair in bufs.device.values() for p in pair if p):
                    quiet(cudart.cudaFree(ptr), "cudaFree")
                for ptr in bufs.pinned.values():
                    quiet(cudart.cudaFreeHost(ptr), "cudaFreeHost")
            if self._event is not None:
                quiet(cudart.cudaEventDestroy(self._event), "cudaEventDestroy")
            if self._stream is not None:
                quiet(cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._graphs.clear()
            self._sets.clear()
            self._free.clear()
            self._contexts.clear()  # contexts before engines before the runtime, as TensorRT requires
            self._engines.clear()
            self._runtime = None

    def _quiet(self, result: Any, call: str) -> None:
        try:
            cuda_check(self._cudart, result, call)
        except BackendUnavailableError as exc:  # keep freeing the rest
            log.warning("%s", exc)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "engine_key": self.build.key, "engine_dir": str(self.engine_dir),
                "cuda_graphs": self.cuda_graphs, "tensorrt": str(self._trt.__version__), "gpu": self.info.gpu_name,
                "max_batch": self.max_batch}


# -- helpers of the backend ----------------------------------------------------------------------------------------

def _device_index(device: str) -> int:
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise ConfigError(f"the tensorrt backend runs on 'cuda' or 'cuda:N', not {device!r}")
    return int(m[1] or 0)


def _layouts(bundle: Bundle) -> dict[str, _Tensor]:
    """One layout per tensor name over every graph; a name means one buffer, so its spec must agree."""
    out: dict[str, _Tensor] = {}
    for g in bundle.graphs:
        key = g.key
        for t in (*g.inputs, *g.outputs):
            batched = bool(t.shape) and t.shape[0] == "batch"
            rest = t.shape[1:] if batched else t.shape
            if not all(isinstance(d, int) for d in rest):
                raise BundleError(f"{key}: tensor {t.name} has shape {t.shape}; the TensorRT backend needs 'batch' "
                                  "first and fixed sizes elsewhere")
            layout = _Tensor(np.dtype(t.dtype), tuple(int(d) for d in rest), batched)
            if out.setdefault(t.name, layout) != layout:
                raise BundleError(f"tensor {t.name} is declared with two different shapes or dtypes")
    for spec in bundle.inputs:
        if spec.name not in out or not out[spec.name].batched:
            raise BundleError(f"model input {spec.name} must be read by a graph and have 'batch' as its first dim")
    return out


def _check_keep(keep: np.ndarray, batch: int) -> np.ndarray:
    rows = np.asarray(keep)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise InputError(f"keep must be a 1-D array of row indices, got {rows.dtype} with shape {rows.shape}")
    rows = rows.astype(np.int64)
    if rows.size and (rows[0] < 0 or rows[-1] >= batch or np.any(np.diff(rows) <= 0)):
        raise InputError(f"keep must be strictly increasing row indices in [0, {batch}), got {rows.tolist()}")
    return rows


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(source row, destination row, count) for every contiguous run of kept rows."""
    if not rows.size:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, ends = np.concatenate(([0], breaks)), np.concatenate((breaks, [rows.size]))
    return [(int(rows[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


def _host_array(ptr: int, t: _Tensor, rows: int) -> np.ndarray:
    """A numpy copy of the first ``rows`` rows sitting in pinned host memory at ``ptr``."""
    shape = (rows, *t.row_shape) if t.batched else t.row_shape
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype=t.dtype)
    raw = (ctypes.c_char * (count * t.dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=t.dtype, count=count).reshape(shape).copy()
