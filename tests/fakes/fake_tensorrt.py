"""API-surface fakes of TensorRT (8.6, 10.x, 11.x) and of ``cuda.bindings`` (``tests.fakes.fake_cudart``).

They prove the calls exist in the real APIs, and fail where the real ones fail, not that engines
build. Each class, method and enum member mirrors a name in the real Python API of that version,
checked against NVIDIA's sources at the v8.6.1, v10.3.0, v10.12.0, v11.0 and v11.1 tags
(``include/NvInfer.h``, ``python/src/infer/pyCore.cpp``) and the 10.x -> 11.x migration guide. A
name removed in a version is absent, so using it raises AttributeError; a name deprecated *in that
version* (not merely later) is present but noted in ``FakeGpu.deprecated``: in 10.3 the fp16/int8
builder flags and ``platform_has_fast_fp16`` are not deprecated (10.12 and 10.5 deprecate them).
BuilderFlag and NetworkDefinitionCreationFlag values are the real ones (11.0 renumbered them);
other enum values are illustrative. Every call lands, in order, in ``FakeGpu.calls``.

Where the real API is strict, so is the fake: ``IOptimizationProfile.set_shape`` raises
``RuntimeError`` when min <= opt <= max does not hold (the binding's own messages); a new builder
config has TF32 set, as TensorRT's does; ``execute_v2`` exists in 10.x and 11.x; 8.6 has no
``IProgressMonitor`` and no STRONGLY_TYPED flag. Capture and driver behaviour: see ``fake_cudart``.

Conventions that let a chain run end to end on a CPU:

- the parser reads real ONNX files (``onnx.load``; anything else fails to parse): the network's
  inputs and outputs are the graph's ("batch" marks the dynamic first axis), and the model's
  ``fake_trt`` metadata entry (JSON, written by ``tests.fakes.onnx_stub.write_stub_onnx``) names the
  graph and scripts the fakes: ``"errors": [...]`` makes the parser fail with those errors;
  ``"fail_build": true`` makes ``build_serialized_network`` return None;
- the fake builder's plan is JSON describing the engine's tensors and its profile;
- the fake engine "computes" row i of every output as the first element of row i of its first
  input, cast to the output dtype, so rows can be traced through chaining and compaction;
- except an engine built from a real ONNX graph (one without ``fake_trt`` metadata, such as an
  exported generative bundle's, or a stub whose script says ``"compute": "onnx"``): the plan records
  the file, and the engine computes for real, running it with ONNX Runtime (one thread) on the bytes
  in fake device memory at the context's current shapes, and writing the outputs back there;
- a tensor address must be 256-byte aligned (``setTensorAddress`` says so): any other is refused;
- device memory is bytearrays at addresses from 2**48 up (never a host address); pinned host
  memory is real (ctypes buffers), so the code under test can memmove into it, and copies check
  that host pointers are pinned.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from runtimes.bundle import BatchSpec, TensorSpec, save_bundle, sha256_file
from runtimes.plan import classifier_bundle, classifier_layout
from runtimes.preprocess import ImageSpec
from tests.fakes.fake_cudart import CUDA_FLAVOURS, FakeGpu, _Enum, _Member, bindings_module, make_fake_cudart
from tests.fakes.onnx_stub import write_stub_onnx

__all__ = ["FakeGpu", "make_fake_tensorrt", "make_fake_cudart", "installed_fakes", "blocked_modules",
           "make_fake_bundle", "MODULE_NAMES", "CUDA_FLAVOURS"]

MODULE_NAMES = ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.bindings.utils")
_CACHE_MAGIC = b"FAKE-TRT-TIMING-CACHE "
_PLAN_MAGIC = "fake-tensorrt-plan"
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
          "UINT8": np.uint8, "INT64": np.int64}
_BY_NUMPY = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "bool": "BOOL", "int64": "INT64"}


def _dims(shape: list[Any]) -> tuple[int, ...]:
    """TensorRT's view of an ONNX shape: every named (dynamic) axis is -1."""
    return tuple(-1 if isinstance(d, str) else int(d) for d in shape)


# what the fake parser counts as "not a loadable ONNX file": unreadable, not a ModelProto, not a valid model
_NotOnnx = (OSError, ValueError, DecodeError, onnx.checker.ValidationError)


def _read_onnx(model: str) -> dict[str, Any]:
    """A real ONNX file as the fake parser sees it: ``{"graph": key, "inputs": [...], "outputs": [...]}``
    (TensorSpec-like entries, "batch" for a dynamic first axis) plus the scripted fields of its
    ``fake_trt`` metadata entry (``errors``, ``fail_build``)."""
    proto = onnx.load(str(model))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    # a real graph is named after its file (exporters name every graph "main_graph")
    script = json.loads(meta["fake_trt"]) if "fake_trt" in meta else {"graph": Path(model).stem}
    if not isinstance(script, dict) or {"inputs", "outputs"} & set(script):
        raise AssertionError(f"{model}: the fake_trt metadata scripts behaviour (graph, errors, fail_build); "
                             "inputs and outputs come from the ONNX graph itself")
    real = "fake_trt" not in meta or script.get("compute") == "onnx"  # a real graph: its engine computes it
    return {**script, "inputs": [_value_json(v) for v in proto.graph.input],
            "outputs": [_value_json(v) for v in proto.graph.output], **({"onnx": str(model)} if real else {})}


def _value_json(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [("batch" if i == 0 else d.dim_param) if d.HasField("dim_param") else d.dim_value
             for i, d in enumerate(tensor.shape.dim)]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}


_FLAGS_10 = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
             "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10,
             "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12, "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14,
             "FP8": 15, "ERROR_ON_TIMING_CACHE_MISS": 16, "BF16": 17, "DISABLE_COMPILATION_CACHE": 18, "STRIP_PLAN": 19,
             "REFIT_IDENTICAL": 20, "WEIGHT_STREAMING": 21, "INT4": 22, "REFIT_INDIVIDUAL": 23}  # v10.3.0
_FLAGS_11 = {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
             "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
             "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18, "REFIT_IDENTICAL": 19,
             "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23, "MONITOR_MEMORY": 24,
             "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27}  # v11.0
# BuilderFlag members and the 10.x minor that deprecated them (include/NvInfer.h at v10.12.0)
_FLAG_DEPRECATED_IN = {"FP16": 12, "INT8": 12, "OBEY_PRECISION_CONSTRAINTS": 12, "PREFER_PRECISION_CONSTRAINTS": 12,
                       "FP8": 12, "BF16": 12, "INT4": 12, "DIRECT_IO": 7, "REJECT_EMPTY_ALGORITHMS": 10}


def make_fake_tensorrt(version: str, gpu: FakeGpu | None = None) -> types.ModuleType:
    """A ``tensorrt`` module with the 8.6, 10.x or 11.x Python API surface our code may need."""
    gpu = gpu or FakeGpu()
    major, minor = (int(p) for p in version.split(".")[:2])
    if major not in (8, 10, 11):
        raise ValueError(f"fakes exist for TensorRT 8.6, 10.x and 11.x, not {version}")
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    severity = _Enum(gpu, "ILogger.Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})
    trt.DataType = _Enum(gpu, "DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5,
                                           "FP8": 6, "BF16": 7, "INT64": 8, "INT4": 9})
    trt.TensorIOMode = _Enum(gpu, "TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.MemoryPoolType = _Enum(gpu, "MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2,
                                                       "DLA_GLOBAL_DRAM": 3, "TACTIC_DRAM": 4, "TACTIC_SHARED_MEMORY": 5})
    if major == 8:  # 8.6: explicit batch is the flag to set; no STRONGLY_TYPED (9.1), no IProgressMonitor (9.x)
        trt.NetworkDefinitionCreationFlag = _Enum(gpu, "NetworkDefinitionCreationFlag",
                                                  {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}, {"EXPLICIT_PRECISION"})
        trt.BuilderFlag = _Enum(gpu, "BuilderFlag", {k: v for k, v in _FLAGS_10.items() if v <= 17})
    elif major == 10:  # 10.x: EXPLICIT_BATCH is ignored (deprecated in 10.0); STRONGLY_TYPED is the flag to set
        trt.NetworkDefinitionCreationFlag = _Enum(gpu, "NetworkDefinitionCreationFlag",
                                                  {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}, {"EXPLICIT_BATCH"})
        trt.BuilderFlag = _Enum(gpu, "BuilderFlag", _FLAGS_10,
                                {k for k, v in _FLAG_DEPRECATED_IN.items() if minor >= v})
    else:  # 11.x: strongly typed only; STRONGLY_TYPED kept (value 0) but ignored, EXPLICIT_BATCH and weak flags gone
        trt.NetworkDefinitionCreationFlag = _Enum(gpu, "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0},
                                                  {"STRONGLY_TYPED"})
        trt.BuilderFlag = _Enum(gpu, "BuilderFlag", _FLAGS_11, {"DIRECT_IO", "SAFETY_SCOPE"})

    def nptype(dtype: _Member) -> type:
        if dtype.name not in _NUMPY:
            raise TypeError(f"could not resolve TensorRT datatype {dtype!r} to an equivalent numpy datatype")
        return _NUMPY[dtype.name]

    trt.nptype = nptype

    class ILogger:
        Severity = severity
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (severity._members[k] for k in severity._members)

    class Logger(ILogger):
        def __init__(self, min_severity: _Member = severity._members["WARNING"]) -> None:
            self.min_severity, self.messages = min_severity, []
            gpu.record("Logger", min_severity=min_severity.name)

        def log(self, severity: _Member, msg: str) -> None:
            self.messages.append((severity.name, msg))
            gpu.record("Logger.log", severity=severity.name, msg=msg)

    class IHostMemory(bytes):
        @property
        def nbytes(self) -> int:
            return len(self)

    class ITensor:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: _Member) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags, self.source = flags, None
            self._inputs: list[ITensor] = []
            self._outputs: list[ITensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    class _ParserError:
        def __init__(self, desc: str, node: int = -1) -> None:
            self._desc, self._node = desc, node

        def desc(self) -> str:
            return self._desc

        def node(self) -> int:
            return self._node

        def __str__(self) -> str:
            return f"In node {self._node}: {self._desc}"

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
            self._network, self._errors = network, []

        def parse_from_file(self, model: str) -> bool:
            gpu.record("OnnxParser.parse_from_file", path=model)
            try:
                spec = _read_onnx(model)
            except _NotOnnx as exc:
                self._errors = [_ParserError(f"ModelImporter: failed to parse ONNX model from file {model}: {exc}")]
                return False
            if spec.get("errors"):
                self._errors = [_ParserError(e, i) for i, e in enumerate(spec["errors"])]
                return False
            make = lambda t: ITensor(t["name"], _dims(t["shape"]), trt.DataType._members[_BY_NUMPY[t["dtype"]]])  # noqa: E731
            self._network._inputs = [make(t) for t in spec["inputs"]]
            self._network._outputs = [make(t) for t in spec["outputs"]]
            self._network.source = spec
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> _ParserError:
            return self._errors[index]

        def clear_errors(self) -> None:
            self._errors = []

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - the real names
            """As the binding (pyCore.cpp ``opt_profile_set_shape``): min, then opt, then max, each checked."""
            lo, mid, hi = tuple(min), tuple(opt), tuple(max)
            gpu.record("IOptimizationProfile.set_shape", name=input, min=lo, opt=mid, max=hi)
            for which, shape, below in (("min", lo, None), ("opt", mid, lo), ("max", hi, mid)):
                bad = any(d < 0 for d in shape) if below is None else (
                    len(shape) != len(below) or any(d < b for d, b in zip(shape, below)))
                if bad:
                    raise RuntimeError(f"Shape provided for {which} is inconsistent with other shapes.")
            self.shapes[input] = (lo, mid, hi)

        def get_shape(self, input: str) -> list[tuple[int, ...]]:  # noqa: A002
            return list(self.shapes[input])

    class ITimingCache:
        def __init__(self, cache_version: str, entries: list[str]) -> None:
            self.version, self.entries = cache_version, entries

        def serialize(self) -> IHostMemory:
            return IHostMemory(_CACHE_MAGIC + self.version.encode() + b"\n" + json.dumps(self.entries).encode())

        def combine(self, input_cache: "ITimingCache", ignore_mismatch: bool) -> bool:
            if input_cache.version != self.version and not ignore_mismatch:
                return False
            self.entries += input_cache.entries
            return True

        def reset(self) -> bool:
            self.entries = []
            return True

    class IProgressMonitor:
        def __init__(self) -> None:
            self._fake_initialised = True  # pybind11 insists that subclasses call the base __init__

    class IBuilderConfig:
        def __init__(self) -> None:
            self.pool_limits: dict[str, int] = {}
            self.profiles: list[IOptimizationProfile] = []
            self.flags: set[str] = {"TF32"}  # "Enabled by default" (BuilderFlag::kTF32, 10.x and 11.x)
            self._level, self._monitor, self._cache = 3, None, None

        def set_memory_pool_limit(self, pool: _Member, pool_size: int) -> None:
            gpu.record("IBuilderConfig.set_memory_pool_limit", pool=pool.name, size=pool_size)
            self.pool_limits[pool.name] = pool_size

        def get_memory_pool_limit(self, pool: _Member) -> int:
            return self.pool_limits.get(pool.name, 0)

        @property
        def builder_optimization_level(self) -> int:
            return self._level

        @builder_optimization_level.setter
        def builder_optimization_level(self, value: int) -> None:
            gpu.record("IBuilderConfig.builder_optimization_level", value=value)
            self._level = value

        @property
        def progress_monitor(self) -> IProgressMonitor | None:
            return self._monitor

        @progress_monitor.setter
        def progress_monitor(self, monitor: IProgressMonitor) -> None:
            if not isinstance(monitor, IProgressMonitor) or not getattr(monitor, "_fake_initialised", False):
                raise TypeError("progress_monitor: an IProgressMonitor whose __init__ called IProgressMonitor.__init__")
            gpu.record("IBuilderConfig.progress_monitor", type=type(monitor).__name__)
            self._monitor = monitor

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
            data = bytes(serialized_timing_cache)
            gpu.record("IBuilderConfig.create_timing_cache", size=len(data))
            if not data:
                return ITimingCache(version, [])
            if not data.startswith(_CACHE_MAGIC):
                return None
            head, _, body = data[len(_CACHE_MAGIC):].partition(b"\n")
            return ITimingCache(head.decode(), json.loads(body))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            gpu.record("IBuilderConfig.set_timing_cache", ignore_mismatch=ignore_mismatch)
            if cache.version != version and not ignore_mismatch:
                return False
            self._cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self._cache

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            gpu.record("IBuilderConfig.add_optimization_profile", shapes=dict(profile.shapes))
            if not profile.shapes:  # an invalid profile; inconsistent shapes never get here (set_shape raises)
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag: _Member) -> None:
            gpu.record("IBuilderConfig.set_flag", flag=flag.name)
            self.flags.add(flag.name)

        def get_flag(self, flag: _Member) -> bool:
            return flag.name in self.flags

        def clear_flag(self, flag: _Member) -> None:
            self.flags.discard(flag.name)

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger
            gpu.record("Builder")

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            gpu.record("Builder.create_network", flags=flags)
            if major in (8, 10) and flags & 1:
                gpu.deprecated.append("NetworkDefinitionCreationFlag.EXPLICIT_BATCH (create_network flags)")
            if major == 11 and flags & 1:
                gpu.deprecated.append("NetworkDefinitionCreationFlag.STRONGLY_TYPED (create_network flags)")
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
            spec = network.source
            gpu.record("Builder.build_serialized_network", graph=spec and spec["graph"])
            error = _build_problem(network, config)
            if error is None and config.progress_monitor is not None and not _report(config.progress_monitor):
                error = "the build was cancelled by the progress monitor"
            if error is None and spec.get("fail_build"):
                error = f"could not find any implementation for a node of {spec['graph']}"
            if error is not None:
                self.logger.log(ILogger.ERROR, error)
                return None
            if config.get_timing_cache() is not None:
                config.get_timing_cache().entries.append(spec["graph"])
            strongly = bool(network.flags & 2) if major == 10 else major == 11
            tensors = [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape), "mode": mode}
                       for mode, group in (("INPUT", network._inputs), ("OUTPUT", network._outputs)) for t in group]
            plan = {"magic": _PLAN_MAGIC, "version": version, "graph": spec["graph"], "strongly_typed": strongly,
                    "tensors": tensors, "profile": {k: [list(s) for s in v] for k, v in config.profiles[0].shapes.items()}}
            if "onnx" in spec:
                plan["onnx"] = spec["onnx"]
            return IHostMemory(json.dumps(plan).encode())

    def _build_problem(network: INetworkDefinition, config: IBuilderConfig) -> str | None:
        if network.source is None:
            return "the network is empty: nothing was parsed"
        if not config.profiles:
            return "a network with dynamic inputs needs an optimization profile"
        shapes = config.profiles[0].shapes
        for t in network._inputs:
            if t.name not in shapes:
                return f"input {t.name} has no shapes in the optimization profile"
            for lo, hi, want in zip(shapes[t.name][0], shapes[t.name][2], t.shape):
                if len(shapes[t.name][0]) != len(t.shape) or (want != -1 and not lo == hi == want):
                    return f"profile shapes {shapes[t.name]} do not fit input {t.name} {t.shape}"
        return None

    def _report(monitor: IProgressMonitor) -> bool:
        monitor.phase_start("Building engine", None, 2)
        monitor.phase_start("Tactic selection", "Building engine", 3)
        for step in range(3):
            monitor.step_complete("Tactic selection", step)
        monitor.phase_finish("Tactic selection")
        for step in range(2):
            if not monitor.step_complete("Building engine", step):
                monitor.phase_finish("Building engine")
                return False
        monitor.phase_finish("Building engine")
        return True

    class IExecutionContext:
        def __init__(self, engine: "ICudaEngine") -> None:
            self.engine = engine
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            gpu.record("IExecutionContext.set_input_shape", graph=self.engine.name, name=name, shape=shape)
            t = self.engine.tensor(name)
            lo, _, hi = self.engine.profile[name]
            if t["mode"] != "INPUT" or len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False
            self._shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._shapes.get(name, tuple(self.engine.tensor(name)["shape"]))

        def set_tensor_address(self, name: str, memory: int) -> bool:
            gpu.record("IExecutionContext.set_tensor_address", graph=self.engine.name, name=name, address=memory)
            self.engine.tensor(name)
            if int(memory) % 256:  # "The pointer must have at least 256-byte alignment."
                gpu.record("Logger.log", severity="ERROR", msg=f"the address of {name} is not 256-byte aligned")
                return False
            self._addresses[name] = int(memory)
            return True

        def get_tensor_address(self, name: str) -> int:
            return self._addresses.get(name, 0)

        def execute_async_v3(self, stream_handle: int) -> bool:
            if not isinstance(stream_handle, int):
                raise TypeError("execute_async_v3(): incompatible function arguments: stream_handle must be an int")
            captured = stream_handle in gpu.capturing
            gpu.record("IExecutionContext.execute_async_v3", graph=self.engine.name, stream=stream_handle,
                       captured=captured, batch=self._shapes.get(self.engine.inputs[0]["name"], (None,))[0])
            names = [t["name"] for t in self.engine.tensors]
            if any(t["name"] not in self._shapes for t in self.engine.inputs) or any(n not in self._addresses for n in names):
                return False
            if not self._enqueue_allowed(stream_handle, captured):
                return False
            shapes, addresses = dict(self._shapes), dict(self._addresses)  # what a captured graph freezes
            gpu.issue(stream_handle, lambda: self.engine.compute(shapes, addresses))
            return True

        def _enqueue_allowed(self, stream: int, captured: bool) -> bool:
            """TensorRT reports a CUDA error left pending by earlier work, and fails inside a capture
            that cannot hold this engine or that began before the warm-up had finished."""
            cudart = gpu.cudart
            if not captured and gpu.last_error is not None:
                gpu.last_error = None  # TensorRT's own error check consumes it
                gpu.record("Logger.log", severity="ERROR", msg="a CUDA error from earlier work is pending")
                return False
            if captured and self.engine.name in gpu.uncapturable:
                gpu.capture_invalid.add(stream)
                gpu.last_error = cudart.cudaError_t.cudaErrorStreamCaptureUnsupported
                return False
            return not (captured and stream in gpu.capture_dirty)

        def execute_v2(self, bindings: list[int]) -> bool:
            """Synchronous, with device addresses in I/O tensor order (present in 10.0 through 11.x)."""
            gpu.record("IExecutionContext.execute_v2", graph=self.engine.name, bindings=list(bindings))
            if len(bindings) != len(self.engine.tensors):
                return False
            addresses = {t["name"]: int(a) for t, a in zip(self.engine.tensors, bindings)}
            self.engine.compute(dict(self._shapes), addresses)
            return True

    class ICudaEngine:
        def __init__(self, plan: dict[str, Any]) -> None:
            self.name, self.tensors, self.profile = plan["graph"], plan["tensors"], plan["profile"]
            self.onnx, self._session = plan.get("onnx"), None
            self.inputs = [t for t in self.tensors if t["mode"] == "INPUT"]
            self.outputs = [t for t in self.tensors if t["mode"] == "OUTPUT"]

        def tensor(self, name: str) -> dict[str, Any]:
            for t in self.tensors:
                if t["name"] == name:
                    return t
            raise RuntimeError(f"{self.name} has no tensor named {name}")

        @property
        def num_io_tensors(self) -> int:
            return len(self.tensors)

        @property
        def num_optimization_profiles(self) -> int:
            return 1

        def get_tensor_name(self, index: int) -> str:
            return self.tensors[index]["name"]

        def get_tensor_mode(self, name: str) -> _Member:
            return trt.TensorIOMode._members[self.tensor(name)["mode"]]

        def get_tensor_dtype(self, name: str) -> _Member:
            return trt.DataType._members[self.tensor(name)["dtype"]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self.tensor(name)["shape"])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            if profile_index != 0 or name not in self.profile:
                raise RuntimeError(f"no profile shapes for {name} in profile {profile_index}")
            return [tuple(s) for s in self.profile[name]]

        def create_execution_context(self) -> IExecutionContext:
            gpu.record("ICudaEngine.create_execution_context", graph=self.name)
            return IExecutionContext(self)

        def compute(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
            """Row i of every output = first element of row i of the first input; or, for an engine built
            from a real ONNX graph, that graph run by ONNX Runtime."""
            arrays = {}
            for t in self.inputs:
                arrays[t["name"]] = gpu.array(addresses[t["name"]], _NUMPY[t["dtype"]], shapes[t["name"]])
            if self.onnx is not None:
                if self._session is None:
                    import onnxruntime

                    options = onnxruntime.SessionOptions()
                    options.intra_op_num_threads, options.log_severity_level = 1, 3
                    self._session = onnxruntime.InferenceSession(self.onnx, options, providers=["CPUExecutionProvider"])
                names = [t["name"] for t in self.outputs]
                for name, out in zip(names, self._session.run(names, arrays)):
                    out = np.ascontiguousarray(out, dtype=_NUMPY[self.tensor(name)["dtype"]])
                    gpu.write(addresses[name], out.tobytes())
                return
            first = arrays[self.inputs[0]["name"]]
            batch = first.shape[0]
            marks = first.reshape(batch, -1)[:, 0].astype(np.float64)
            for t in self.outputs:
                out = np.empty((batch, *t["shape"][1:]), dtype=_NUMPY[t["dtype"]])
                out.reshape(batch, -1)[...] = marks.astype(out.dtype)[:, None]
                gpu.write(addresses[t["name"]], out.tobytes())

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger
            gpu.record("Runtime")

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
            gpu.record("Runtime.deserialize_cuda_engine", size=len(serialized_engine))
            try:
                plan = json.loads(bytes(serialized_engine))
            except ValueError:
                plan = {}
            if not isinstance(plan, dict) or plan.get("magic") != _PLAN_MAGIC or plan.get("version") != version:
                self.logger.log(ILogger.ERROR, "the engine plan file is not compatible with this version of TensorRT")
                return None
            return ICudaEngine(plan)

    for cls in (ILogger, Logger, IHostMemory, ITensor, INetworkDefinition, OnnxParser, IOptimizationProfile, ITimingCache,
                IBuilderConfig, Builder, IExecutionContext, ICudaEngine, Runtime):
        setattr(trt, cls.__name__, cls)
    if major >= 10:
        trt.IProgressMonitor = IProgressMonitor
    if major < 11:  # removed in 11.0; platform_has_fast_fp16 deprecated in 10.5, the calibrators in 10.1
        def note(name: str, since: int) -> None:
            if major == 10 and minor >= since:
                gpu.deprecated.append(name)

        Builder.platform_has_fast_fp16 = property(lambda self: note("Builder.platform_has_fast_fp16", 5) or True)
        IBuilderConfig.int8_calibrator = property(lambda self: note("IBuilderConfig.int8_calibrator", 1),
                                                  lambda self, v: note("IBuilderConfig.int8_calibrator", 1))
        for name in ("IInt8Calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator"):
            setattr(trt, name, type(name, (), {"__init__": lambda self, _n=name: note(_n, 1)}))
    gpu.trt = trt
    return trt


@contextlib.contextmanager
def _modules(replacements: dict[str, Any]) -> Iterator[None]:
    saved = {name: sys.modules.get(name, _ABSENT) for name in replacements}
    sys.modules.update(replacements)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


_ABSENT = object()


@contextlib.contextmanager
def installed_fakes(version: str = "10.3.0", gpu: FakeGpu | None = None, cuda: str = "12.9.0",
                    **gpu_options: Any) -> Iterator[FakeGpu]:
    """Put a fake ``tensorrt`` of ``version`` and fake ``cuda.bindings`` of version ``cuda`` (cuda-python
    12.6.2.post1, cuda-bindings 12.9.x or 13.x; see ``fake_cudart``) into sys.modules for the block."""
    gpu = gpu or FakeGpu(**gpu_options)
    trt, rt = make_fake_tensorrt(version, gpu), make_fake_cudart(gpu, cuda)
    bindings, modules = bindings_module(rt, cuda)
    package = types.ModuleType("cuda")
    package.bindings, package.__path__ = bindings, []
    with _modules({name: modules.get(name) for name in MODULE_NAMES[1:]} | {"tensorrt": trt, "cuda": package}):
        yield gpu


@contextlib.contextmanager
def blocked_modules(*names: str) -> Iterator[None]:
    """Make ``import name`` fail with ImportError for the block (``None`` in sys.modules)."""
    with _modules({name: None for name in names}):
        yield


# -- a tiny bundle of real stub ONNX graphs that script the fake parser and builder -------------------------

_SHAPES = {"model_input": (3, 4, 4), "hidden": (5, 8), "logits": (3,), "confidence": (), "prediction": ()}


def _tensor(name: str, role: str) -> TensorSpec:
    kind = role if role in _SHAPES else role.rpartition("_")[2]  # exit_logits, final_prediction, ... -> logits, ...
    return TensorSpec(name, "int64" if kind == "prediction" else "float32", ("batch", *_SHAPES[kind]))


def make_fake_bundle(directory: Path, *, precisions: tuple[str, ...] = ("fp32", "fp16"),
                     batch: tuple[int, int, int] = (1, 2, 4), exits: tuple[int, ...] = (1, 3), num_blocks: int = 4,
                     extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """An image bundle (pixel_values (B,3,4,4), hidden (B,5,8), 3 classes), laid out and assembled by
    ``runtimes.plan``, every graph file a real stub ONNX graph. ``extra[key]`` scripts the fakes for
    that graph (its ``fake_trt`` metadata), e.g. ``{"errors": [...]}`` or ``{"fail_build": True}``."""
    directory = Path(directory)
    layout = classifier_layout(("pixel_values",), exits, num_blocks)
    io = {g.key: tuple(tuple(_tensor(n, role) for n, role in side) for side in (g.inputs, g.outputs)) for g in layout}
    bundle = classifier_bundle(layout, io, name="fake", labels=("a", "b", "c"), preprocess=ImageSpec(size=(4, 4)),
                               num_blocks=num_blocks, batch=BatchSpec(*batch), precisions=precisions,
                               provenance={"made_by": "tests.fakes.make_fake_bundle"})
    files = {}
    for g in bundle.graphs:
        for rel in g.files.values():
            write_stub_onnx(directory / rel, g.inputs, g.outputs,
                            metadata={"fake_trt": {"graph": g.key, **(extra or {}).get(g.key, {})}})
            files[rel] = sha256_file(directory / rel)
    save_bundle(replace(bundle, files=files), directory)
    return directory
