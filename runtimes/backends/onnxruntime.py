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

State tensors are numpy arrays: on the CPU feeding numpy is as fast
as OrtValues or I/O binding. On CUDA the tensors stay on the device as OrtValues bound through
I/O binding; compaction there goes through the host (a copy of the surviving rows).
"""

from __future__ import annotations

import logging
import numbers
import os
from typing import Any, Sequence

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
    takes = ("threads", "head_threads", "spinning", "graphs", "session_config", "optimization", "shared_pool")

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
                 graphs: Sequence[str] | None = None, session_config: dict[str, str] | None = None,
                 optimization: str = "all", shared_pool: bool = False, head_threads: int | None = None,
                 spinning: bool = True, **options: Any) -> None:
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

    def run(self, graph: str, state: dict[str, Any]) -> None:
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
        except self._run_errors as exc:  # the graph loaded and the inputs passed their checks: their values failed
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise InputError(f"ONNX Runtime rejected the input in {graph}: {reason}") from exc
        state.update(zip(outputs, binding.get_outputs()))

    def fetch(self, state: dict[str, Any], names: Sequence[str]) -> dict[str, np.ndarray]:
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
        self.sessions.clear()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": self.threads, "head_threads": self.head_threads,
                "spinning": self.spinning and not self.shared_pool,
                "shared_thread_pool": self.shared_pool,
                "shared_arena": self.shared_arena,
                "providers": self.sessions[next(iter(self.sessions))].get_providers() if self.sessions else []}
