"""ONNX Runtime backend: CPU, or CUDA through ``onnxruntime-gpu``.

On the CPU every session's intra-op threads spin-wait between the operators of a run, and stop the
moment the run returns (``session.force_spinning_stop``). Both halves matter. With spinning
switched off, each parallel operator wakes its worker thread through the kernel, and a digits block
took 0.50-0.63 ms at batch 1 on 2 cores against 0.40-0.45 ms with spinning during runs (the
monolithic graph 4.4 against 3.3 ms). Pools that keep spinning after their run returns steal the
cores from the next session of the chain, which made a chain 2-3x slower than one monolithic
session. ``spinning=False`` switches spinning off: fewer busy cycles where power matters more than
latency, and more throughput when many threads call at once (8 callers: 1.2x the calls per second),
since spinning threads then compete with them. ONNX Runtime's process-wide global thread pool
avoids the same theft, but once created it forces every other session in the process (the
application's own, ONNX Runtime's quantizer) to opt out of per-session threads or fail, so an
embeddable runtime must not create it; ``shared_pool=True`` opts in for processes that run nothing
else.

The sessions also share one memory arena (an environment allocator). With an arena per session,
each segment's intermediate buffers were cold in the cache at every call, and a chain with its
exits switched off took 1.07-1.10x the monolithic graph's time at batch 32 (1.00x at batch 1);
sharing the arena brought it to 1.02x. Registering the allocator is process-wide but harmless to
other sessions: only sessions that opt in (``session.use_env_allocators``) use it.

State tensors are numpy arrays: on the CPU feeding numpy is as fast as passing OrtValues. On CUDA
the tensors stay on the device as OrtValues bound through I/O binding; compaction there goes
through the host (a copy of the surviving rows).

One CPU case is bound too: a classifier's chain at batch 1 (``start_one``, which the early-exit loop
uses for single rows). Every graph's inputs and outputs are bound once to preallocated numpy
buffers, a segment's output buffer being the next graph's input buffer (a tensor name means one
tensor everywhere), so each call is ``run_with_iobinding`` with no feeds to build and no outputs to
allocate: 0.01-0.03 ms less per stage (segment and exit head) than ``run`` with numpy
(``benchmarks/call_costs.py``). Bound chains are pooled, one per concurrent caller; past 4 per CPU
(``bound_chains``) at once, further callers take the plain path. ``io_binding=False`` switches this off.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from runtimes.backends.base import Backend
from runtimes.bundle import Bundle
from runtimes.errors import BackendUnavailableError, ConfigError, InputError

__all__ = ["OrtBackend", "max_threads"]

log = logging.getLogger(__name__)

_GLOBAL_POOL: int | None = None  # threads of the process-wide pool once set (ONNX Runtime allows it once)
_SHARED_ARENA: bool | None = None  # whether the process-wide CPU arena is registered and usable


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            "the onnxruntime backend needs ONNX Runtime: pip install onnxruntime (CPU) or onnxruntime-gpu "
            "(CUDA; never both in one environment)") from exc
    return onnxruntime


def max_threads() -> int:
    """The most intra-op threads a session may ask for: 4 per CPU. More only oversubscribes the cores,
    and every session of a chain starts its own pool (1,000 threads took minutes to load)."""
    return 4 * (os.cpu_count() or 1)


def _thread_count(name: str, value: object, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= max_threads():
        raise ConfigError(f"{name} must be an integer from 1 to {max_threads()} (4 per CPU), got {value!r}")
    return int(value)


def _run_errors(ort: Any) -> tuple[type[Exception], ...]:
    """The exception types ONNX Runtime raises from a run (they share no base class but Exception)."""
    module = getattr(getattr(ort, "capi", None), "onnxruntime_pybind11_state", None)
    found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Exception)] if module else []
    return (RuntimeError, *found)


# ONNX Runtime's element types as numpy dtypes: those a bound buffer can hold
_ORT_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
               "tensor(double)": np.dtype(np.float64), "tensor(int64)": np.dtype(np.int64),
               "tensor(int32)": np.dtype(np.int32), "tensor(int8)": np.dtype(np.int8),
               "tensor(uint8)": np.dtype(np.uint8), "tensor(bool)": np.dtype(np.bool_)}


class _BoundChain:
    """One caller's batch-1 chain: an I/O binding per graph, every tensor bound to its own buffer.

    ``runs`` maps a graph key to its session's ``run_with_iobinding`` and the binding; ``buffers``
    maps every tensor the graphs write to its (1, ...) array; ``feeds`` lists each model input with
    the bindings that read it (bound afresh to the caller's array at every call, no copy);
    ``inputs`` holds the caller's arrays while a call lasts."""

    __slots__ = ("runs", "buffers", "feeds", "inputs")

    def __init__(self, runs: dict[str, tuple[Any, Any]], buffers: dict[str, np.ndarray],
                 feeds: tuple[tuple[str, tuple[int, ...], np.dtype, tuple[Any, ...]], ...]) -> None:
        self.runs, self.buffers, self.feeds = runs, buffers, feeds
        self.inputs: dict[str, np.ndarray] | None = None


def _global_pool(ort: Any, threads: int) -> bool:
    """Create ONNX Runtime's global thread pool once per process; False when it cannot be used."""
    global _GLOBAL_POOL
    if _GLOBAL_POOL is not None:
        return _GLOBAL_POOL == threads
    try:
        ort.set_global_thread_pool_sizes(threads, 1)
    except (AttributeError, RuntimeError) as exc:  # too late (environment exists) or not in this build
        log.debug("global thread pool unavailable: %s", exc)
        _GLOBAL_POOL = -1
        return False
    _GLOBAL_POOL = threads
    return True


def _shared_arena(ort: Any) -> bool:
    """Register one CPU arena allocator for the process (once); False when it cannot be used."""
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _SHARED_ARENA = True
        except Exception as exc:  # an application registered its own already, or an older ONNX Runtime
            log.debug("shared CPU arena unavailable: %s", exc)
            _SHARED_ARENA = "already" in str(exc).lower()
    return bool(_SHARED_ARENA)


class OrtBackend(Backend):
    name = "onnxruntime"
    devices = ("cpu", "cuda", "cuda:N")
    takes = ("threads", "head_threads", "spinning", "graphs", "session_config", "optimization", "shared_pool",
             "io_binding")

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
                 graphs: Sequence[str] | None = None, session_config: dict[str, str] | None = None,
                 optimization: str = "all", shared_pool: bool = False, head_threads: int | None = None,
                 spinning: bool = True, io_binding: bool = True, **options: Any) -> None:
        if options:  # a misspelt setting must not pass silently
            raise ConfigError(f"the onnxruntime backend takes {', '.join(self.takes)}, not {', '.join(sorted(options))}")
        super().__init__(bundle, precision, device)
        self.threads = _thread_count("threads", threads, min(os.cpu_count() or 1, 8))
        # cls-query exit heads do a few tiny matrix products: waking a second thread costs more than
        # it saves (measured: 0.31 vs 0.52 ms per head at batch 1 on 2 cores), so they run on one
        self.head_threads = _thread_count("head_threads", head_threads, 1)
        ort = _import_ort()
        self._ort, self._run_errors = ort, _run_errors(ort)
        self.cuda = device.startswith("cuda")
        if self.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError("device cuda needs onnxruntime-gpu (with CUDA and cuDNN); this onnxruntime "
                                          f"offers {ort.get_available_providers()}")
        self.device_id = int(device.split(":")[1]) if ":" in device else 0
        self.spinning = spinning
        self.shared_pool = shared_pool and not self.cuda and _global_pool(ort, self.threads)
        self.shared_arena = not self.cuda and _shared_arena(ort)
        self._config, self._optimization = dict(session_config or {}), optimization
        self.sessions = {key: self._session(key) for key in (graphs or bundle.graph_keys())}
        # tensor names per graph, looked up once: the hot path does no string work
        self._io = {key: ([t.name for t in bundle.graph(key).inputs], [t.name for t in bundle.graph(key).outputs])
                    for key in self.sessions}
        if not isinstance(io_binding, bool):
            raise ConfigError(f"io_binding must be True or False, got {io_binding!r}")
        # the batch-1 bound path: its plan (None where it does not apply), a pool of idle bound chains,
        # and how many may exist at once (one per concurrent caller; more callers take the plain path)
        self._one = self._bound_plan() if io_binding else None
        self.bound_chains = max_threads()
        self._idle: list[_BoundChain] = []
        self._made, self._making = 0, threading.Lock()

    def _threads_for(self, key: str) -> int:
        one_token = {e.graph.key for e in self.bundle.exits if e.head == "cls-query"}
        return self.head_threads if key in one_token else self.threads

    def _session(self, key: str) -> Any:
        path = self.bundle.path(self.bundle.graph(key).files[self.precision])
        try:
            return self.open_session(path, self._threads_for(key))
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            from runtimes.errors import BundleError

            raise BundleError(f"ONNX Runtime cannot load {path.name} ({key}): {str(exc).splitlines()[0]}") from exc

    def open_session(self, path: str | os.PathLike, threads: int | None = None) -> Any:
        """An ONNX Runtime session for any ONNX file, set up exactly as this backend's own (threads,
        spinning, shared arena, providers): what measurements of other graphs compare against."""
        ort = self._ort
        opts = ort.SessionOptions()
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if self._optimization not in levels:
            raise ConfigError(f"optimization must be one of {sorted(levels)}, got {self._optimization!r}")
        opts.graph_optimization_level = levels[self._optimization]
        opts.log_severity_level = 3
        if self.shared_pool:
            opts.use_per_session_threads = False
        else:
            opts.intra_op_num_threads = threads or self.threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        if self.shared_arena:
            opts.add_session_config_entry("session.use_env_allocators", "1")
        for k, v in self._config.items():
            opts.add_session_config_entry(k, v)
        providers = ([("CUDAExecutionProvider", {"device_id": self.device_id})] if self.cuda else []) + \
            ["CPUExecutionProvider"]
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)

    def start(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        state = dict(inputs)
        if self.cuda:
            state = {k: self._ort.OrtValue.ortvalue_from_numpy(v, "cuda", self.device_id) for k, v in state.items()}
        return state

    def _bound_plan(self) -> dict[str, Any] | None:
        """What a bound chain needs, or None where the batch-1 bound path does not apply: on CUDA, or when
        a chain graph has no session here (``graphs=``), a named axis besides the batch (buffers need every
        other size fixed: a decoder's steps have them), or an element type without a numpy dtype."""
        bundle = self.bundle
        if self.cuda:
            return None
        keys = [g.key for s in bundle.stages for g in ((s.segment, s.exit.graph) if s.exit else (s.segment,))]
        if any(k not in self.sessions for k in keys):
            return None
        tensors: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        produced: set[str] = set()
        for key in keys:
            sess, spec = self.sessions[key], bundle.graph(key)
            specs, metas = [*spec.inputs, *spec.outputs], [*sess.get_inputs(), *sess.get_outputs()]
            if len(specs) != len(metas) or len(sess.get_inputs()) != len(spec.inputs):
                return None
            for t, meta in zip(specs, metas):
                dtype = _ORT_DTYPES.get(meta.type)
                if (meta.name != t.name or dtype is None or not t.shape or t.shape[0] != "batch"
                        or not all(isinstance(d, int) for d in t.shape[1:])):
                    return None
                shape = (1, *t.shape[1:])
                if tensors.setdefault(t.name, (shape, dtype)) != (shape, dtype):
                    return None  # one name, two shapes or types: not one tensor
            produced.update(t.name for t in spec.outputs)
        feeds = {n: v for n, v in tensors.items() if n not in produced}
        return {"keys": keys, "tensors": tensors, "produced": produced, "feeds": feeds}

    def _new_chain(self) -> _BoundChain | None:
        """A new bound chain, or None when ``bound_chains`` exist already (the caller runs plain)."""
        with self._making:
            if self._made >= self.bound_chains or self._one is None:
                return None
            self._made += 1
        plan, ort = self._one, self._ort
        try:
            buffers = {n: np.zeros(shape, dtype) for n, (shape, dtype) in plan["tensors"].items()
                       if n in plan["produced"]}
            values = {n: ort.OrtValue.ortvalue_from_numpy(b) for n, b in buffers.items()}
            runs, readers = {}, {n: [] for n in plan["feeds"]}
            for key in plan["keys"]:
                sess = self.sessions[key]
                binding = sess.io_binding()
                inputs, outputs = self._io[key]
                for n in inputs:
                    if n in values:
                        binding.bind_ortvalue_input(n, values[n])
                    else:
                        readers[n].append(binding)
                for n in outputs:
                    binding.bind_ortvalue_output(n, values[n])
                runs[key] = (sess.run_with_iobinding, binding)
        except Exception as exc:  # an ONNX Runtime without this binding: the plain path serves every call
            log.debug("batch-1 I/O binding unavailable, using the plain path: %s", exc)
            self._one = None
            return None
        feeds = tuple((n, shape, dtype, tuple(readers[n])) for n, (shape, dtype) in plan["feeds"].items())
        return _BoundChain(runs, buffers, feeds)

    def start_one(self, inputs: dict[str, np.ndarray]) -> Any:
        """A state for one row (batch 1) that ``run`` and ``fetch`` take like ``start``'s: a bound chain
        where the bound path applies and one is free, else ``start(inputs)``. Hand it back with
        ``release`` when the call is done."""
        if self._one is None:
            return self.start(inputs)
        try:
            chain = self._idle.pop()  # atomic: no two callers get one chain
        except IndexError:
            chain = self._new_chain()
            if chain is None:
                return self.start(inputs)
        try:
            for name, shape, dtype, readers in chain.feeds:
                a = inputs.get(name)
                if (not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype
                        or not a.flags.c_contiguous):  # anything unusual goes the plain way, its errors included
                    break
                for binding in readers:
                    binding.bind_cpu_input(name, a)  # the caller's array itself: no copy
            else:
                chain.inputs = inputs
                return chain
        except Exception as exc:
            log.debug("batch-1 input not bound, using the plain path: %s", exc)
        self._idle.append(chain)
        return self.start(inputs)

    def release(self, state: Any) -> None:
        """Hand back a state from ``start_one`` once its call is done (its buffers get reused)."""
        if state.__class__ is _BoundChain:
            state.inputs = None  # the caller's arrays are theirs again
            if self._one is not None:
                self._idle.append(state)

    def _rejected(self, graph: str, exc: Exception) -> InputError:
        # the graph loaded and the inputs passed their checks: their values failed
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return InputError(f"ONNX Runtime rejected the input in {graph}: {reason}")

    def _plain_failure(self, graph: str, chain: _BoundChain) -> Exception | None:
        """The error ``run`` with numpy feeds gives on the inputs a bound run failed on: the same
        InputError, word for word, on either path (ONNX Runtime words a bound run's failure differently)."""
        inputs, outputs = self._io[graph]
        given = chain.inputs or {}
        try:
            feeds = {n: chain.buffers[n] if n in chain.buffers else given[n] for n in inputs}
            self.sessions[graph].run(outputs, feeds)
        except self._run_errors as exc:
            return exc
        except Exception:  # noqa: BLE001 - the bound run's own error stands
            return None
        return None

    def run(self, graph: str, state: Any) -> None:
        if state.__class__ is _BoundChain:
            call, binding = state.runs[graph]
            try:
                call(binding)
            except self._run_errors as exc:
                plain = self._plain_failure(graph, state) or exc
                raise self._rejected(graph, plain) from plain
            return
        sess = self.sessions[graph]
        inputs, outputs = self._io[graph]
        try:
            if not self.cuda:
                state.update(zip(outputs, sess.run(outputs, {n: state[n] for n in inputs})))
                return
            binding = sess.io_binding()
            for n in inputs:
                binding.bind_ortvalue_input(n, state[n])
            for n in outputs:
                binding.bind_output(n, "cuda", self.device_id)
            sess.run_with_iobinding(binding)
        except self._run_errors as exc:
            raise self._rejected(graph, exc) from exc
        state.update(zip(outputs, binding.get_outputs()))

    def bind(self, graph: str, arrays: Mapping[str, np.ndarray]) -> Callable[[], None]:
        """On the CPU: an I/O binding on the caller's arrays themselves (ONNX Runtime reads and writes
        them in place, nothing is copied), so a decoding step is one ``run_with_iobinding``."""
        if self.cuda:
            return super().bind(graph, arrays)
        inputs, outputs = self._io[graph]
        missing = [n for n in (*inputs, *outputs) if n not in arrays]
        if missing:
            raise ConfigError(f"binding {graph}: no array for {', '.join(missing)}")
        if not all(arrays[n].flags.c_contiguous for n in (*inputs, *outputs)):
            return super().bind(graph, arrays)
        sess, ort = self.sessions[graph], self._ort
        binding = sess.io_binding()
        for n in inputs:
            binding.bind_cpu_input(n, arrays[n])
        for n in outputs:
            binding.bind_ortvalue_output(n, ort.OrtValue.ortvalue_from_numpy(arrays[n]))
        run, errors = sess.run_with_iobinding, self._run_errors

        def call() -> None:
            try:
                run(binding)
            except errors as exc:
                raise self._rejected(graph, exc) from exc
        return call

    def fetch(self, state: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
        if state.__class__ is _BoundChain:  # copies: the next call overwrites the buffers
            buffers = state.buffers
            return {n: buffers[n].copy() for n in names}
        if not self.cuda:
            return {n: state[n] for n in names}
        return {n: state[n].numpy() for n in names}

    def compact(self, state: dict[str, Any], keep: np.ndarray) -> None:
        for name, value in list(state.items()):
            if self.cuda:
                state[name] = self._ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(value.numpy()[keep]), "cuda", self.device_id)
            else:
                state[name] = value[keep]

    def close(self) -> None:
        self._one = None
        self._idle.clear()
        self.sessions.clear()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": self.threads, "head_threads": self.head_threads,
                "spinning": self.spinning and not self.shared_pool,
                "shared_thread_pool": self.shared_pool,
                "shared_arena": self.shared_arena,
                "io_binding": self._one is not None,
                "providers": self.sessions[next(iter(self.sessions))].get_providers() if self.sessions else []}
