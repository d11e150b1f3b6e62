"""``freedeploy serve``: a bundle behind NVIDIA Triton Inference Server, from the ``serve`` extra
(``nvidia-pytriton``, which ships Triton and pins numpy<2: keep it in an environment of its own).

Triton takes the requests (HTTP and gRPC, KServe v2 protocol), batches them across clients
(dynamic batching), reports health and Prometheus metrics; the runtime answers each batch in one
call, so early exit compacts per row inside it (``serving.protocol``). Two engines:

- ``tritonserver`` (default): the model repository of ``serving.repository``, written into a
  private workspace, served by the ``tritonserver`` binary PyTriton ships; the runtime runs in
  Triton's Python-backend processes.
- ``pytriton``: PyTriton binds the runtime in this process; Triton hands each batch over through
  PyTriton's proxy (measured about half the throughput: docs/serving.md).

SIGINT or SIGTERM stops Triton; then whatever its Python-backend processes still hold (the
processes, their shared-memory regions, the model folders Triton copied) and the workspace are
removed before the call returns.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from runtimes.errors import BackendUnavailableError, ConfigError
from serving.protocol import (DEFAULT_QUEUE_DELAY_US, OUTPUTS, answer_requests, check_model_name, inputs_for,
                              model_name, model_names)

__all__ = ["ServeConfig", "serve", "python_library_path", "ready_line"]

log = logging.getLogger(__name__)
ENGINES = ("tritonserver", "pytriton")
READY_TIMEOUT_S = 120.0


@dataclass
class ServeConfig:
    """What ``serve`` starts; ``max_batch`` None: the bundle's exported maximum."""

    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int | None = None
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    batching: bool = True  # dynamic batching across requests; off: each request is run as it came
    early_exit: bool = True  # off: the monolithic graph answers (the baseline)
    instances: int = 1  # model instances (concurrent batches): processes with a runtime each; pytriton: one shared
    log_verbose: int = 0
    name: str | None = None
    engine: str = "tritonserver"  # tritonserver: PyTriton's server binary on a model repository; pytriton: its proxy
    thresholds: Sequence[float | None] | None = None


def python_library_path() -> str | None:
    """The directory of this Python's ``libpython``. Triton's Python-backend stub finds libpython
    through the library search path: in a virtual environment made from a Python built elsewhere it
    would otherwise load the system's libpython of another patch version and the model never loads."""
    libdir = sysconfig.get_config_var("LIBDIR")
    return libdir if libdir and Path(libdir).is_dir() else None


def _with_library_path(env: dict[str, str]) -> None:
    libdir = python_library_path()
    if libdir and libdir not in env.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)


def _check_port(host: str, port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"--{what}-port must be between 1 and 65535, got {port}")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("" if host == "0.0.0.0" else host, port))
        except socket.gaierror as exc:
            raise ConfigError(f"--host {host!r} is not an address of this machine ({exc.strerror or exc})") from None
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:  # a valid address, but not this machine's
                raise ConfigError(f"--host {host!r} is not an address of this machine") from None
            raise ConfigError(f"{what} port {port} is not free on {host} ({exc.strerror or exc}): choose another "
                              f"with --{what}-port") from None


class _Stop(BaseException):
    """SIGINT or SIGTERM while serving: stop cleanly."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Both signals stop the server, even where SIGINT was inherited as ignored (a service manager,
    a shell's background job)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        for sig in previous:  # a second signal must not interrupt the clean stop the first one started
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(bundle_dir: str | os.PathLike, config: ServeConfig | None = None,
          on_ready: Callable[[dict[str, Any]], None] | None = None, backend: str = "auto",
          device: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """Serve ``bundle_dir`` until SIGINT or SIGTERM; returns what was served once stopped.

    ``on_ready`` gets the endpoints and models when the server answers."""
    config = config or ServeConfig()
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise BackendUnavailableError(f"serving needs PyTriton ({exc}): pip install 'freedeploy[serve]' in an "
                                      "environment of its own (it pins numpy<2), e.g. make serve-env") from None
    from runtimes.runtime import Runtime

    for port, what in ((config.http_port, "http"), (config.grpc_port, "grpc"), (config.metrics_port, "metrics")):
        _check_port(config.host, port, what)
    if len({config.http_port, config.grpc_port, config.metrics_port}) != 3:
        raise ConfigError("--http-port, --grpc-port and --metrics-port must differ")
    if config.instances < 1:
        raise ConfigError(f"instances must be at least 1, got {config.instances}")
    if config.queue_delay_us < 0:
        raise ConfigError(f"queue delay must be >= 0 microseconds, got {config.queue_delay_us}")

    if config.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    # loaded here in both cases: a bundle, backend, device or threshold that cannot work fails now, in one line
    runtime = Runtime.load(bundle_dir, backend=backend, device=device, precision=precision)
    try:
        bundle = runtime.bundle
        ports = {mode: inputs_for(bundle, mode) for mode in ("raw", "tensors")}  # refuses generative bundles
        if config.thresholds is not None:
            runtime.thresholds = config.thresholds
        max_batch = config.max_batch or bundle.batch.max
        if max_batch < 1:
            raise ConfigError(f"max batch must be at least 1, got {max_batch}")
        name = config.name or model_name(bundle.name)
        check_model_name(name)
        served = _served(runtime, config, name, max_batch)
        if config.engine == "tritonserver":
            runtime.close()  # the server's backend stubs load their own
            return _run_tritonserver(bundle_dir, config, served, on_ready, backend, device, precision)
        return _run(runtime, config, served, ports, on_ready,
                    (DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig))
    finally:
        runtime.close()


def _served(runtime: Any, config: ServeConfig, name: str, max_batch: int) -> dict[str, Any]:
    """What the ready line and the stop line say."""
    host = "127.0.0.1" if config.host == "0.0.0.0" else config.host
    return {"bundle": runtime.bundle.name, "models": model_names(name), "engine": config.engine,
            "max_batch": max_batch, "queue_delay_us": config.queue_delay_us if config.batching else None,
            "batching": config.batching, "early_exit": config.early_exit, "instances": config.instances,
            "backend": runtime.calibration_key, "thresholds": list(runtime.thresholds),
            "endpoints": {"http": f"http://{host}:{config.http_port}", "grpc": f"{host}:{config.grpc_port}",
                          "metrics": f"http://{host}:{config.metrics_port}/metrics"}}


def _run(runtime: Any, config: ServeConfig, served: dict[str, Any], ports: dict[str, tuple],
         on_ready: Callable[[dict[str, Any]], None] | None, api: tuple) -> dict[str, Any]:
    """PyTriton: Triton's Python backend hands each batch to this process, which runs the runtime."""
    DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig = api
    _with_library_path(os.environ)  # Triton and its stubs inherit this process's environment
    workspace = Path(tempfile.mkdtemp(prefix="freedeploy-serve-"))
    stubs: dict[int, list[str]] = {}
    max_batch = served["max_batch"]
    triton_config = TritonConfig(http_address=config.host, http_port=config.http_port, grpc_address=config.host,
                                 grpc_port=config.grpc_port, metrics_address=config.host,
                                 metrics_port=config.metrics_port, log_verbose=config.log_verbose,
                                 log_file=None if config.log_verbose else workspace / "triton.log",
                                 exit_timeout_secs=5)
    try:
        with _stop_on_signals(), _quiet(config.log_verbose):
            triton = Triton(config=triton_config, workspace=workspace / "pytriton")
            try:
                for mode, model in served["models"].items():
                    batcher = DynamicBatcher(max_queue_delay_microseconds=config.queue_delay_us) \
                        if config.batching else None
                    triton.bind(model_name=model, infer_func=[_infer(runtime, mode, config.early_exit)] * config.instances,
                                inputs=[Tensor(name=p.name, dtype=p.numpy_dtype, shape=p.shape) for p in ports[mode]],
                                outputs=[Tensor(name=p.name, dtype=p.numpy_dtype, shape=p.shape) for p in OUTPUTS],
                                config=ModelConfig(max_batch_size=max_batch, batcher=batcher), strict=False)
                try:
                    with _stdout_to_stderr():
                        triton.run()
                except Exception as exc:
                    raise BackendUnavailableError(f"Triton did not start: {_one_line(exc)}{_log_tail(workspace)}") \
                        from None
                stubs.update(_stubs(os.getpid()))
                if on_ready is not None:
                    on_ready(served)
                with contextlib.suppress(_Stop, KeyboardInterrupt):
                    triton.serve()
            finally:
                stubs.update(_stubs(os.getpid()))
                triton.stop()
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        _clean_up(stubs, workspace)
    return served


def triton_home(into: Path) -> tuple[Path, dict[str, str]]:
    """A private copy of the tritonserver PyTriton ships, with the Python-backend stub of this Python's
    version, and the environment it needs: the stub embeds the ``python3`` it finds first on PATH (this
    environment's, whose site-packages it then reads; PYTHONPATH it ignores), and loads this Python's
    libpython (``python_library_path``) and PyTriton's bundled libraries."""
    import pytriton

    dist = Path(pytriton.__file__).parent
    stub = dist / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendUnavailableError(f"PyTriton has no Python-backend stub for Python "
                                      f"{sys.version_info[0]}.{sys.version_info[1]}; serve with --engine pytriton")
    home = Path(shutil.copytree(dist / "tritonserver", into / "tritonserver",
                                ignore=shutil.ignore_patterns("python_backend_stubs")))
    shutil.copy2(stub, home / "backends" / "python")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
    _with_library_path(env)
    env["LD_LIBRARY_PATH"] += os.pathsep + str(dist.parent / "nvidia_pytriton.libs")
    return home, env


def http_ready(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Polls ``URL/v2/health/ready`` until it answers 200, the process ends or time is up."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the server gets SIGTERM when this process dies, even by SIGKILL, so none outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run_tritonserver(bundle_dir: str | os.PathLike, config: ServeConfig, served: dict[str, Any],
                      on_ready: Callable[[dict[str, Any]], None] | None, backend: str, device: str | None,
                      precision: str | None) -> dict[str, Any]:
    """The tritonserver binary PyTriton ships, on the model repository ``triton-repo`` writes (in a
    private workspace): the runtime runs in Triton's Python-backend stubs, with no proxy in between."""
    from serving.repository import write_repository

    workspace = Path(tempfile.mkdtemp(prefix="freedeploy-serve-"))
    proc: subprocess.Popen | None = None
    stubs: dict[int, list[str]] = {}
    log = None
    with _stop_on_signals():
        try:
            write_repository(bundle_dir, workspace / "models", name=served["models"]["raw"],
                             max_batch=served["max_batch"], queue_delay_us=config.queue_delay_us,
                             instances=config.instances, early_exit=config.early_exit, thresholds=config.thresholds,
                             backend=backend, batching=config.batching, device=device, precision=precision)
            home, env = triton_home(workspace)
            h = config.host
            args = [str(home / "bin" / "tritonserver"), f"--model-repository={workspace / 'models'}",
                    f"--backend-directory={home / 'backends'}", f"--cache-directory={home / 'caches'}",
                    f"--http-address={h}", f"--http-port={config.http_port}", f"--grpc-address={h}",
                    f"--grpc-port={config.grpc_port}", f"--metrics-address={h}",
                    f"--metrics-port={config.metrics_port}", f"--log-verbose={config.log_verbose}",
                    "--exit-timeout-secs=5"]
            log = None if config.log_verbose else (workspace / "triton.log").open("wb")
            proc = subprocess.Popen(args, env=env, stdout=log or sys.stderr, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            if not http_ready(served["endpoints"]["http"], proc, READY_TIMEOUT_S):
                raise BackendUnavailableError(f"tritonserver did not become ready{_log_tail(workspace)}")
            stubs.update(_stubs(os.getpid()))
            if on_ready is not None:
                on_ready(served)
            while proc.poll() is None:
                time.sleep(0.5)
            raise BackendUnavailableError(f"tritonserver exited with code {proc.returncode}{_log_tail(workspace)}")
        except (_Stop, KeyboardInterrupt):
            pass
        finally:
            if proc is not None and proc.poll() is None:
                stubs.update(_stubs(os.getpid()))  # instances Triton restarted meanwhile too
                proc.send_signal(signal.SIGINT)  # Triton's own clean stop: unload the models, end the stubs
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if log is not None:
                log.close()
            _clean_up(stubs, workspace)
    return served


def _stubs(pid: int) -> dict[int, list[str]]:
    """The Triton Python-backend stubs below ``pid`` (from /proc; none elsewhere): pid -> command line,
    ``STUB MODEL.PY SHM-REGION ...``."""
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo += children.get(child, [])
        args = _cmdline(child)
        if len(args) > 2 and args[0].endswith("triton_python_backend_stub"):
            found[child] = args
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return [os.fsdecode(a) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return []


def _stub_leftovers(stubs: dict[int, list[str]]) -> list[Path]:
    """What the stubs were given on their command lines: the shared-memory region, and the folder
    Triton copied the model into when it was loaded from memory (``/tmp/folder`` and six random characters, PyTriton's
    case). Triton removes both when it unloads the models, but not when it ends at its exit timeout
    (clients still connected): then they are this server's to remove."""
    found: list[Path] = []
    for args in stubs.values():
        region = args[2]
        if region and "/" not in region and not region.startswith("."):
            found.append(Path("/dev/shm") / region)
        folder = Path(args[1]).parent.parent  # FOLDER/1/model.py
        if folder.parent == Path("/tmp") and folder.name.startswith("folder"):  # Triton's fixed template
            found.append(folder)
    return found


def _end(stubs: dict[int, list[str]], grace: float = 3.0) -> None:
    """Stubs that outlive their server (it ended at its exit timeout, before unloading them) end now:
    SIGTERM, then SIGKILL after ``grace`` seconds; a pid that now runs something else is left alone."""
    live = [p for p, args in stubs.items() if _cmdline(p) == args]
    for p in live:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGTERM)
    end = time.monotonic() + grace
    while live and time.monotonic() < end:
        time.sleep(0.05)
        live = [p for p in live if _cmdline(p) == stubs[p]]
    for p in live:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def _clean_up(stubs: dict[int, list[str]], workspace: Path) -> None:
    """After Triton: its stubs that outlived it, what they held, and the server's workspace."""
    _end(stubs)
    shutil.rmtree(workspace, ignore_errors=True)
    _remove(_stub_leftovers(stubs))


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _infer(runtime: Any, mode: str, early_exit: bool) -> Callable[[list], list]:
    """PyTriton's infer function: the requests of one batch, answered together."""
    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        return answer_requests(runtime, mode, [dict(r.items()) for r in requests], early_exit)
    return infer


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Triton's libraries print start-up notes (no NVML on a CPU box, ...) on file descriptor 1; stdout
    stays for the command's own output (--json)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _quiet(verbose: int) -> Iterator[None]:
    """PyTriton logs every start step at INFO; keep them for -v."""
    logger = logging.getLogger("pytriton")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _log_tail(workspace: Path, lines: int = 3) -> str:
    path = workspace / "triton.log"
    try:
        tail = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()][-lines:]
    except OSError:
        return ""
    return " (server log: " + " | ".join(tail) + ")" if tail else ""


def ready_line(served: dict[str, Any]) -> str:
    e = served["endpoints"]
    batching = f"dynamic batching up to {served['max_batch']}, {served['queue_delay_us']} us queue delay" \
        if served["batching"] else "no dynamic batching"
    return (f"serving {served['bundle']} with {served['engine']} as models {', '.join(served['models'].values())}: HTTP {e['http']}, "
            f"gRPC {e['grpc']}, metrics {e['metrics']}; {batching}; early exit "
            f"{'on' if served['early_exit'] else 'off'}. Ctrl-C or SIGTERM stops it.")

