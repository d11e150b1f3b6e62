"""Measuring served bundles: start ``freedeploy serve`` as a child process (possibly from another
Python environment, the serving one), and load it with concurrent clients.

    with ServerProcess(serve_python, "bundles/digits", "--no-batching") as server:
        figures = load_test(Client(server.url, server.model), items, clients=8, requests=400)

``load_test`` reports requests per second and latency percentiles from the clients' side, and the
mean batch Triton ran from the server's own metrics.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtimes.errors import BackendUnavailableError
from serving.server import http_ready

__all__ = ["ServerProcess", "RepositoryServer", "triton_home", "free_ports", "load_test"]

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on localhost right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess:
    """``freedeploy serve --json`` as a child process on free local ports; ready once its ready line
    came. ``stop`` sends SIGTERM (or the given signal) and returns the exit code."""

    def __init__(self, python: str, bundle: str | os.PathLike, *args: str, timeout: float = 120.0) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        self.proc = subprocess.Popen(
            [python, "-m", "freedeploy", "serve", os.fspath(bundle), "--json", "--host", "127.0.0.1",
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self._first = threading.Event()
        self._errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()
        if not self._first.wait(timeout) or self.proc.poll() is not None or not self.lines:
            self.proc.kill()
            self.proc.wait()
            raise BackendUnavailableError(f"the server did not start: {''.join(self._errors)[-1500:].strip()}")
        self.info = json.loads(self.lines[0])
        self.url = f"http://127.0.0.1:{self.http}"
        self.metrics_url = self.info["endpoints"]["metrics"]
        self.model = self.info["models"]["raw"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._first.set()
        self._first.set()

    def _read_errors(self) -> None:
        for line in self.proc.stderr:
            self._errors.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._errors)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def triton_home(python: str, into: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """``serving.server.triton_home`` run by ``python`` (the serving environment's): the
    server's private copy under ``into``, and the environment it needs."""
    code = ("import json, sys; from pathlib import Path; from serving.server import triton_home; "
            "home, env = triton_home(Path(sys.argv[1])); print(json.dumps([str(home), env]))")
    home, env = json.loads(subprocess.run([python, "-c", code, os.fspath(into)], check=True, capture_output=True,
                                          text=True, timeout=120, cwd=ROOT).stdout)
    return Path(home), env


class RepositoryServer:
    """A plain ``tritonserver`` (PyTriton's copy, see ``triton_home``) on a model repository that
    ``freedeploy triton-repo`` wrote, in its own process group; ``workdir`` holds its copy and log."""

    def __init__(self, python: str, repository: str | os.PathLike, workdir: str | os.PathLike,
                 timeout: float = 60.0) -> None:
        self.home, env = triton_home(python, workdir)
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = Path(workdir) / "tritonserver.log"
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [str(self.home / "bin" / "tritonserver"), f"--model-repository={os.fspath(repository)}",
                 f"--backend-directory={self.home / 'backends'}", "--http-port", str(self.http), "--grpc-port",
                 str(self.grpc), "--metrics-port", str(self.metrics)],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.http}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics}/metrics"
        if not http_ready(self.url, self.proc, timeout):
            self.stop()
            raise BackendUnavailableError(f"tritonserver did not start: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its stubs: the group it leads
            return self.proc.wait()

    def __enter__(self) -> "RepositoryServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_test(client: Any, items: Sequence[Any], clients: int, requests: int, warmup: int = 20,
              metrics_url: str | None = None) -> dict[str, Any]:
    """``clients`` threads send ``requests`` requests in all (one input each, ``items`` cycled) as
    fast as answers come back. Returns requests/s, p50/p99/mean latency in ms, and the mean batch the
    server ran (from its metrics, over this test only)."""
    for i in range(warmup):
        client.infer([items[i % len(items)]])
    before = client.stats(metrics_url) if metrics_url else None
    latencies = np.empty(requests)
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            client.infer([items[i % len(items)]])
            latencies[i] = time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    seconds = time.perf_counter() - start
    out = {"clients": clients, "requests": requests, "seconds": seconds, "requests_per_s": requests / seconds,
           "p50_ms": float(np.percentile(latencies, 50) * 1e3), "p99_ms": float(np.percentile(latencies, 99) * 1e3),
           "mean_ms": float(latencies.mean() * 1e3)}
    if before is not None:
        after = client.stats(metrics_url)
        executions = after.executions - before.executions
        out["mean_batch"] = (after.inferences - before.inferences) / executions if executions else 0.0
    return out
