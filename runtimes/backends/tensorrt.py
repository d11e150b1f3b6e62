"""TensorRT backend: the bundle's engine set for this GPU, chained on the device.

Written against the TensorRT 10.x and 11.x Python APIs (checked against NVIDIA's sources at the
v10.3.0, v11.0 and v11.1 tags; 10.3 is what JetPack 6 ships) and ``cuda.bindings.runtime`` from
cuda-python 12.6.2.post1, cuda-bindings 12.9 and 13 (``docs/tensorrt.md``). Only the name-based
tensor API is used: ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``. The
binding-index API and ``execute_async_v2`` were removed in 10.0; ``execute_v2`` still exists in
10.0-11.x, but it is synchronous and takes a list of bindings, so it is not used here. Every cudart
call returns ``(error, *values)``; ``cuda_check`` turns a failure into one clear error.

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
executes normally, which is the warm-up TensorRT needs after a shape change; as trtexec does, the
stream is then synchronised (so no deferred work of the warm-up lands in the graph) and the graph
captured on the backend's own (non-default) stream. A failed capture leaves a CUDA error pending,
which trtexec clears with ``cudaGetLastError`` and so does this backend; that graph then runs
without capture. Later batch-1 runs replay a captured graph with ``cudaGraphLaunch``.
A graph freezes shapes and addresses, so it is keyed by graph key and buffer addresses, and it
replays only while the context still holds batch-1 shapes. Everything else runs plainly.

**Decoding** (generative bundles, ``runtimes.decoding``) keeps its buffers in device memory:
``decode_memory()`` gives each decoding session a ``_DecodeMemory``. The KV cache, the past masks,
the hidden rows kept for recomputation and every step graph's inputs and outputs are allocated
once per session with ``cudaMalloc`` (zero-filled: masked cache rows must hold finite numbers);
each ``(graph, new tokens, past bucket)`` is bound once: input shapes (batch 1, ``new`` = n,
``past`` = bucket) and tensor addresses are set when a call's binding is not the context's current
one, then ``execute_async_v3`` enqueues it. With ``cuda_graphs=True`` each binding is captured
after its first run and replayed from then on (a graph holds the shapes and addresses it was
captured with, so the context is not touched). Past inputs are the first ``bucket`` rows of a layer's cache, that is the
layer's own address with a shorter shape, so a binding never copies the cache; prefill writes its
keys and values into the cache in place. Commits of new keys and values into the cache and moves
of hidden rows are device-to-device ``cudaMemcpyAsync`` / ``cudaMemcpy2DAsync`` (one call per
region: a row of every layer is one 2-D copy); tokens, positions and mask entries go host ->
pinned staging -> device; per decision only the token and the confidence of the row that decides
come back (device -> pinned, then an event synchronize). Every first-axis item of a region is
256-byte aligned, as ``setTensorAddress`` requires. Decoder engines are fp32 (the exporter builds
no other), and decoder bundles run only this way: ``start``/``run``/``fetch`` are for classifiers.

Threads: execution contexts are not thread-safe, so every call takes the backend's lock. Each
state borrows its own buffer set from a pool and returns it when the state is garbage-collected.
Calls from several threads therefore get correct answers, but they run one at a time on one
stream. For parallel throughput use one Runtime per thread, or a pool of Runtimes: each has its
own contexts, stream and buffers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtimes.backends.base import Backend
from runtimes.bundle import ENGINE_PRECISIONS, Bundle, ClassifierHead, decision_field
from runtimes.backends.tensorrt_device import (BUILD_FILE, BUILD_SCHEMA, ENGINES_DIR, DeviceInfo, cuda_check,
                                               detect_device, find_engine_dir, import_cudart, import_tensorrt,
                                               install_hint, native_handle, read_build, target_key)
from runtimes.errors import BackendUnavailableError, BundleError, ConfigError, InputError

__all__ = ["TensorRTBackend", "DeviceInfo", "detect_device", "target_key", "read_build", "find_engine_dir",
           "import_tensorrt", "import_cudart", "cuda_check", "install_hint", "BUILD_FILE", "BUILD_SCHEMA", "ENGINES_DIR"]

log = logging.getLogger(__name__)



# -- the backend ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    dtype: np.dtype
    row_shape: tuple[int | str, ...]  # the dims after the batch axis (all when not batched); str: a decoder's axis
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
        self._graphs: dict[tuple, Any] = {}  # (graph key, addresses[, shapes]) -> instantiated CUDA graph (batch 1)
        self._bound: dict[str, tuple] = {}  # graph key -> the decoding binding its context holds now
        self._memories: list[_DecodeMemory] = []
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
        # a classifier's chain runs through start/run/fetch on buffers made here; a decoder's graphs run in
        # the decoding loop, on buffers of its own (decode_memory), with named axes besides the batch
        self._chain = isinstance(self.bundle.head, ClassifierHead)
        self._tensors = _layouts(self.bundle, named=not self._chain)
        # the decisions (logits, confidences, predictions): what fetch reads, so they get pinned landing buffers
        self._results = sorted({t.name for g in self.bundle.graphs for t in g.outputs
                                if decision_field(t.role)})
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        for graph in self.bundle.graphs:
            self._load(graph.key)
        self._stream = self._cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = native_handle(self._stream)  # execute_async_v3 takes the raw handle
        self._event = self._cuda(cudart.cudaEventCreate(), "cudaEventCreate")
        if self._chain:
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
        if not self._chain:
            raise ConfigError(f"bundle {self.bundle.name!r} generates text: on TensorRT its graphs run in the decoding "
                              "loop (Runtime.generate), not through start/run/fetch")
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
        self._bound.pop(key, None)  # a decoding binding on this context must set its shapes and addresses again
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
            self._capture(key, ctx, (key, addresses))

    def _capture(self, key: str, ctx: Any, slot: tuple) -> None:
        """Record ``key`` at batch 1 right after a plain run (the warm-up); capturing does not execute.
        The sequence is trtexec's (samples/common/sampleInference.cpp, TensorRT 10.3 to 11.1). ``slot``
        keys the graph: what it froze (graph key and addresses, and a decoding binding's shapes)."""
        cudart = self._cudart
        self._cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")  # the warm-up has finished
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads' CUDA calls stay legal
        self._cuda(cudart.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        ok = ctx.execute_async_v3(self._stream_handle)
        err, graph = cudart.cudaStreamEndCapture(self._stream)
        if not ok or err != cudart.cudaError_t.cudaSuccess:  # some engines cannot be captured: run them plainly
            if err == cudart.cudaError_t.cudaSuccess:  # TensorRT refused, the capture itself ended: drop its graph
                self._quiet(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            cudart.cudaGetLastError()  # clear the error the failed capture left, or the next enqueue reports it
            log.info("CUDA graph capture of %s failed (%s); it runs without a graph", key, getattr(err, "name", err))
            self._uncapturable.add(key)
            return
        try:
            self._graphs[slot] = self._cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
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
            for memory in self._memories:
                memory.free(quiet)
            if self._event is not None:
                quiet(cudart.cudaEventDestroy(self._event), "cudaEventDestroy")
            if self._stream is not None:
                quiet(cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._graphs.clear()
            self._bound.clear()
            self._memories.clear()
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

    def decode_memory(self) -> "_DecodeMemory":
        """Device memory for one decoding session (see the module docstring)."""
        with self._lock:
            if self._closed:
                raise ConfigError("this TensorRT backend is closed")
            self._activate()
            memory = _DecodeMemory(self)
            self._memories.append(memory)
        return memory

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


def _layouts(bundle: Bundle, named: bool = False) -> dict[str, _Tensor]:
    """One layout per tensor name over every graph; a name means one buffer, so its spec must agree.
    ``named``: other named axes than the batch are allowed (a decoder's new tokens, past, prompt)."""
    out: dict[str, _Tensor] = {}
    for g in bundle.graphs:
        key = g.key
        for t in (*g.inputs, *g.outputs):
            batched = bool(t.shape) and t.shape[0] == "batch"
            rest = t.shape[1:] if batched else t.shape
            if not named and not all(isinstance(d, int) for d in rest):
                raise BundleError(f"{key}: tensor {t.name} has shape {t.shape}; the TensorRT backend needs 'batch' "
                                  "first and fixed sizes elsewhere")
            layout = _Tensor(np.dtype(t.dtype), tuple(d if isinstance(d, str) else int(d) for d in rest), batched)
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


# -- decoding in device memory ---------------------------------------------------------------------------------------

_ALIGN = 256  # IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment"
_STAGING = 64 << 10  # pinned bytes for host -> device writes between two synchronisations (grown when one needs more)
_LANDING = 4 << 10  # pinned bytes for reads (grown when one read needs more)


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class _Region:
    """A strided view of device (or pinned host) memory with numpy's basic indexing: integers and
    unit-step slices, which make views and never copy. What the decoding loop's buffers are here."""

    __slots__ = ("address", "shape", "strides", "dtype")

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: np.dtype) -> None:
        self.address, self.shape, self.strides, self.dtype = address, shape, strides, dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def contiguous(self) -> bool:
        """C order without gaps: what TensorRT reads and writes at one address."""
        step = self.dtype.itemsize
        for n, stride in zip(reversed(self.shape), reversed(self.strides)):
            if n != 1 and stride != step:
                return False
            step *= n
        return True

    def __getitem__(self, key: Any) -> "_Region":
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > len(self.shape):
            raise IndexError(f"{len(key)} indices for a region of {len(self.shape)} dimensions")
        address, shape, strides = self.address, [], []
        for k, n, stride in zip(key, self.shape, self.strides):
            if isinstance(k, slice):
                lo, hi, step = k.indices(n)
                if step != 1:
                    raise IndexError("a device region takes unit-step slices only")
                address += lo * stride
                shape.append(max(hi - lo, 0))
                strides.append(stride)
            else:
                i = int(k)
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of bounds for an axis of size {n}")
                address += (i % n) * stride
        rest = len(key)
        return _Region(address, (*shape, *self.shape[rest:]), (*strides, *self.strides[rest:]), self.dtype)

    def __repr__(self) -> str:
        return f"_Region({self.address:#x}, shape={self.shape}, strides={self.strides}, dtype={self.dtype})"


@functools.lru_cache(maxsize=4096)
def _copy_plan(shape: tuple[int, ...], dst_strides: tuple[int, ...], src_strides: tuple[int, ...],
               itemsize: int) -> tuple[int, int, int, int, tuple[tuple[int, int], ...]]:
    """How to copy a strided region into another of the same shape: (width in bytes, height, destination
    pitch, source pitch, (destination, source) byte offsets of each 2-D copy). Axes of size 1 drop out and
    neighbours that are contiguous in both merge, so a row of every layer is one 2-D copy."""
    if 0 in shape:
        return 0, 0, 0, 0, ()
    dims: list[tuple[int, int, int]] = []
    for n, ds, ss in zip(shape, dst_strides, src_strides):
        if n == 1:
            continue
        if dims and dims[-1][1] == n * ds and dims[-1][2] == n * ss:
            dims[-1] = (dims[-1][0] * n, ds, ss)
        else:
            dims.append((n, ds, ss))
    width = itemsize
    if dims and dims[-1][1] == itemsize and dims[-1][2] == itemsize:
        width = dims.pop()[0] * itemsize
    height, dpitch, spitch = dims.pop() if dims else (1, width, width)
    offsets = [(0, 0)]
    for n, ds, ss in dims:
        offsets = [(d + i * ds, s + i * ss) for d, s in offsets for i in range(n)]
    return width, height, dpitch, spitch, tuple(offsets)


class _DecodeMemory:
    """One decoding session's device memory (``Backend.decode_memory``; the calls are
    ``runtimes.backends.base.HostMemory``'s). Regions are ``_Region`` views of ``cudaMalloc``
    allocations; ``write`` stages host values in pinned memory, ``read`` lands them in pinned memory and
    waits on an event. Everything runs on the backend's stream, under its lock, on its device."""

    device = True

    def __init__(self, owner: TensorRTBackend) -> None:
        self._owner, self._cudart = owner, owner._cudart
        kinds = self._cudart.cudaMemcpyKind
        self._h2d, self._d2h, self._d2d = (kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost,
                                           kinds.cudaMemcpyDeviceToDevice)
        self._device: list[int] = []
        self._pinned: list[int] = []
        self._event = owner._cuda(self._cudart.cudaEventCreate(), "cudaEventCreate")
        self._stage, self._stage_used = self._pinned_block(_STAGING), 0
        self._landing = self._pinned_block(_LANDING)

    # memory ------------------------------------------------------------------------------------------------
    def _pinned_block(self, nbytes: int) -> tuple[int, np.ndarray]:
        ptr = self._owner._malloc_host(nbytes)
        self._pinned.append(ptr)
        return ptr, np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=np.uint8)

    def _ready(self) -> None:
        if self._owner._closed:
            raise ConfigError("this TensorRT backend is closed")
        self._owner._activate()

    def alloc(self, shape: Sequence[int], dtype: Any) -> _Region:
        """A zero-filled region in C order, every item of its first axis 256-byte aligned (a layer of
        the cache, a stage's mask: each is bound where it starts)."""
        dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
        strides = _c_strides(shape, dtype.itemsize)
        if len(shape) > 1 and shape[0] > 1:
            strides = (-(-strides[0] // _ALIGN) * _ALIGN, *strides[1:])
        nbytes = strides[0] * shape[0] if shape else dtype.itemsize
        owner, cudart = self._owner, self._cudart
        with owner._lock:
            self._ready()
            ptr = owner._malloc(nbytes)
            self._device.append(ptr)
            owner._cuda(cudart.cudaMemsetAsync(ptr, 0, max(nbytes, 1), owner._stream), "cudaMemsetAsync")
        return _Region(ptr, shape, strides, dtype)

    def free(self, quiet: Callable[[Any, str], None]) -> None:
        """Called by the backend's ``close`` (under its lock, the stream synchronised)."""
        cudart = self._cudart
        for ptr in self._device:
            quiet(cudart.cudaFree(ptr), "cudaFree")
        for ptr in self._pinned:
            quiet(cudart.cudaFreeHost(ptr), "cudaFreeHost")
        if self._event is not None:
            quiet(cudart.cudaEventDestroy(self._event), "cudaEventDestroy")
        self._device, self._pinned, self._event = [], [], None

    # moving data -------------------------------------------------------------------------------------------
    def _copy(self, dst: _Region, src: _Region, kind: Any, what: str) -> None:
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ConfigError(f"cannot copy a {src.dtype} region of shape {src.shape} into a {dst.dtype} one of "
                              f"shape {dst.shape}")
        width, height, dpitch, spitch, offsets = _copy_plan(dst.shape, dst.strides, src.strides, dst.dtype.itemsize)
        cudart, stream, check = self._cudart, self._owner._stream, self._owner._cuda
        for doff, soff in offsets:
            if height == 1:
                check(cudart.cudaMemcpyAsync(dst.address + doff, src.address + soff, width, kind, stream),
                      f"cudaMemcpyAsync({what})")
            else:
                check(cudart.cudaMemcpy2DAsync(dst.address + doff, dpitch, src.address + soff, spitch, width, height,
                                               kind, stream), f"cudaMemcpy2DAsync({what})")

    def _sync(self) -> None:
        """Wait for everything issued so far; the pinned staging is free again."""
        check, cudart = self._owner._cuda, self._cudart
        check(cudart.cudaEventRecord(self._event, self._owner._stream), "cudaEventRecord")
        check(cudart.cudaEventSynchronize(self._event), "cudaEventSynchronize")
        self._stage_used = 0

    def copy(self, dst: _Region, src: _Region) -> None:
        """Device to device (a commit into the cache, hidden rows into the store and back)."""
        with self._owner._lock:
            self._ready()
            self._copy(dst, src, self._d2d, "device to device")

    def write(self, dst: _Region, values: Any) -> None:
        """Host values (broadcast to ``dst``) -> pinned staging -> ``dst``. A staged value stays untouched
        until the stream has copied it: the staging is reused only after a synchronisation."""
        a = np.asarray(values, dtype=dst.dtype)
        nbytes = dst.nbytes
        if not nbytes:
            return
        with self._owner._lock:
            self._ready()
            (ptr, host), used = self._stage, self._stage_used
            if used + nbytes > host.size:
                self._sync()
                used = 0
                if nbytes > host.size:  # one write larger than the staging (a restored cache): grow it, once
                    self._stage = self._pinned_block(max(2 * host.size, -(-nbytes // _ALIGN) * _ALIGN))
                    ptr, host = self._stage
            np.copyto(host[used:used + nbytes].view(dst.dtype).reshape(dst.shape), a)
            self._stage_used = used + -(-nbytes // _ALIGN) * _ALIGN
            staged = _Region(ptr + used, dst.shape, _c_strides(dst.shape, dst.dtype.itemsize), dst.dtype)
            self._copy(dst, staged, self._h2d, "host to device")

    def read(self, *srcs: _Region) -> tuple[np.ndarray, ...]:
        """Host copies of ``srcs``: device -> pinned landing, one event synchronisation for them all."""
        sizes = [-(-s.nbytes // 64) * 64 for s in srcs]
        with self._owner._lock:
            self._ready()
            ptr, host = self._landing
            if sum(sizes) > host.size:  # nothing is in flight into the landing buffer between reads
                self._landing = self._pinned_block(max(2 * host.size, -(-sum(sizes) // _ALIGN) * _ALIGN))
                ptr, host = self._landing
            at, places = 0, []
            for src, size in zip(srcs, sizes):
                self._copy(_Region(ptr + at, src.shape, _c_strides(src.shape, src.dtype.itemsize), src.dtype), src,
                           self._d2h, "device to host")
                places.append((at, src))
                at += size
            self._sync()
            return tuple(host[at:at + src.nbytes].view(src.dtype).reshape(src.shape).copy() for at, src in places)

    # graphs ------------------------------------------------------------------------------------------------
    def bind(self, graph: str, regions: dict[str, _Region]) -> Callable[[], None]:
        """A call of ``graph`` on ``regions``: input shapes and tensor addresses are set once per binding
        (again only when another binding used the context since), then it is enqueued on the stream."""
        owner = self._owner
        spec = owner.bundle.graph(graph)
        names = [t.name for t in (*spec.inputs, *spec.outputs)]
        missing = [n for n in names if n not in regions]
        if missing:
            raise ConfigError(f"binding {graph}: no region for {', '.join(missing)}")
        engine, ctx = owner._engines[graph], owner._contexts[graph]
        for name in names:
            r = regions[name]
            want = np.dtype(owner._trt.nptype(engine.get_tensor_dtype(name)))
            if not isinstance(r, _Region) or not r.contiguous or r.address % _ALIGN or r.dtype != want:
                raise ConfigError(f"binding {graph}: {name} needs a contiguous, 256-byte aligned {want} device region, "
                                  f"got {r!r}")
        shapes = tuple((t.name, regions[t.name].shape) for t in spec.inputs)
        addresses = tuple((n, regions[n].address) for n in names)
        slot = (graph, shapes, addresses)
        cudart, handle = self._cudart, owner._stream_handle

        def call() -> None:
            with owner._lock:
                self._ready()
                replay = owner._graphs.get(slot)
                if replay is not None:  # the graph holds the shapes and addresses it was captured with
                    owner._cuda(cudart.cudaGraphLaunch(replay, owner._stream), "cudaGraphLaunch")
                    return
                if owner._bound.get(graph) != slot:
                    for name, shape in shapes:
                        if not ctx.set_input_shape(name, shape):
                            raise InputError(f"TensorRT rejected shape {shape} for {name} of {graph}; "
                                             "see the TensorRT log")
                    for name, address in addresses:
                        if not ctx.set_tensor_address(name, address):
                            raise BackendUnavailableError(f"TensorRT rejected the device address of {name} in {graph}")
                    owner._bound[graph] = slot
                    owner._shapes.pop(graph, None)  # the batch path must set its shapes again
                if not ctx.execute_async_v3(handle):
                    raise BackendUnavailableError(f"TensorRT could not enqueue {graph} at "
                                                  f"{', '.join(f'{n} {s}' for n, s in shapes)}; see the TensorRT log")
                if owner.cuda_graphs and graph not in owner._uncapturable:
                    owner._capture(graph, ctx, slot)
        return call
