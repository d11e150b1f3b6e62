"""A client for served bundles: one server (``Client``) or a fleet behind it (``Fleet``).

Standard library and numpy only (KServe v2 over HTTP, inputs in Triton's binary tensor format), so a
camera or robot process can call a server without Triton's client packages and with any numpy:

    from serving.client import Client, Fleet
    client = Client("http://edge-1:8000", "digits")
    client.infer([open("frame.png", "rb").read()])[0].label     # raw inputs: encoded images, texts
    client.infer({"pixel_values": batch})                       # preprocessed: the NAME_tensors model
    fleet = Fleet(["http://edge-1:8000", "http://edge-2:8000"], "digits")   # spread, fail over

Answers are ``runtimes.result.Prediction`` rows, the same a local ``Runtime.infer`` gives. A row the
server could not run raises its InputError (``errors="raise"``) or stands in the list as that
InputError (``errors="keep"``). A server that cannot be reached is a BackendUnavailableError.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from runtimes.errors import BackendUnavailableError, ConfigError, InputError
from runtimes.result import Prediction
from serving.protocol import DATATYPES, OUTPUTS, TENSORS_SUFFIX

__all__ = ["Client", "Fleet", "ServerStats"]


def _bytes_blob(values: Sequence[bytes]) -> bytes:
    """Triton's BYTES tensor layout: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _as_bytes(item: Any, index: int) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (os.PathLike,)):
        with open(item, "rb") as f:
            return f.read()
    raise InputError(f"input {index}: a served model takes encoded image bytes or text (str/bytes), got "
                     f"{type(item).__name__}; encode frames first (e.g. PNG or JPEG) or send the model's tensors")


def _encode_request(inputs: list[tuple[str, str, tuple[int, ...], bytes]]) -> tuple[bytes, int]:
    header = {"inputs": [{"name": n, "shape": list(shape), "datatype": dt, "parameters": {"binary_data_size": len(b)}}
                         for n, dt, shape, b in inputs],
              "outputs": [{"name": p.name, "parameters": {"binary_data": False}} for p in OUTPUTS]}
    head = json.dumps(header).encode()
    return head + b"".join(b for *_, b in inputs), len(head)


@dataclass(frozen=True)
class ServerStats:
    """From a server's Prometheus metrics, for one model: requests that succeeded and failed,
    inferences (rows), executions (batches run) and the time requests waited in the queue."""

    success: float
    failure: float
    inferences: float
    executions: float
    queue_us: float

    @property
    def mean_batch(self) -> float:
        """Rows per batch the model ran: what dynamic batching achieved."""
        return self.inferences / self.executions if self.executions else 0.0


class Client:
    """One server. Thread-safe: each thread keeps its own keep-alive connection."""

    def __init__(self, url: str, model: str, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ConfigError(f"server URL must look like http://HOST:PORT, got {url!r}")
        if not model or "/" in model:
            raise ConfigError(f"model name must be a plain name, got {model!r}")
        self.url, self.model, self.timeout = f"http://{parsed.netloc}", model, timeout
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._local = threading.local()
        self._max_batches: dict[str, int | None] = {}  # model -> its max_batch_size, read on first use

    def __repr__(self) -> str:
        return f"Client({self.url!r}, {self.model!r})"

    # transport ------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: one fresh retry
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            try:
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                conn.close()
                self._local.conn = None
                if attempt or not isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                   BrokenPipeError)):
                    raise BackendUnavailableError(f"server {self.url} cannot be reached: "
                                                  f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # health and metrics ---------------------------------------------------------------------------------
    def ready(self) -> bool:
        """The server and this model answer (``/v2/models/NAME/ready``)."""
        try:
            return self._request("GET", f"/v2/models/{self.model}/ready")[0] == 200
        except BackendUnavailableError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > end:
                raise BackendUnavailableError(f"model {self.model} on {self.url} not ready after {timeout:g} s")
            time.sleep(0.2)

    def stats(self, metrics_url: str | None = None) -> ServerStats:
        """This model's counters from the server's Prometheus metrics (by default on the HTTP port + 2)."""
        url = metrics_url or f"http://{self._host}:{self._port + 2}/metrics"
        parsed = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=self.timeout)
        try:
            conn.request("GET", parsed.path or "/metrics")
            text = conn.getresponse().read().decode()
        except OSError as exc:
            raise BackendUnavailableError(f"metrics at {url} cannot be read: {exc}") from None
        finally:
            conn.close()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("nv_inference_") and f'model="{self.model}"' in line:
                name, value = line.partition("{")[0], float(line.rsplit(" ", 1)[-1])
                values[name] = values.get(name, 0.0) + value
        return ServerStats(values.get("nv_inference_request_success", 0.0),
                           values.get("nv_inference_request_failure", 0.0), values.get("nv_inference_count", 0.0),
                           values.get("nv_inference_exec_count", 0.0), values.get("nv_inference_queue_duration_us", 0.0))

    # inference ------------------------------------------------------------------------------------------
    def infer(self, inputs: Any, question: str | Sequence[str] | None = None,
              errors: str = "raise") -> list[Prediction | InputError]:
        """Raw inputs (encoded image bytes or paths, texts; with ``question`` for image-plus-question
        bundles) go to the model NAME; a dict of preprocessed arrays to NAME_tensors."""
        if errors not in ("raise", "keep"):
            raise ConfigError(f"errors must be 'raise' or 'keep', got {errors!r}")
        rows: list[Prediction | InputError] = []
        for chunk, q in self._chunks(inputs, question):
            rows += self._infer(chunk, q)
        if errors == "raise":
            for row in rows:
                if isinstance(row, InputError):
                    raise row
        return rows

    def _max_batch(self, model: str) -> int | None:
        """The model's max_batch_size, read once from its config (None when it cannot be read)."""
        if model not in self._max_batches:
            try:
                status, data = self._request("GET", f"/v2/models/{model}/config")
                if status != 200:
                    return None
                self._max_batches[model] = int(json.loads(data).get("max_batch_size") or 0) or None
            except (BackendUnavailableError, ValueError, AttributeError, TypeError):
                return None
        return self._max_batches[model]

    def _chunks(self, inputs: Any, question: str | Sequence[str] | None) -> list[tuple[Any, Any]]:
        """More rows than the model's max batch go as several requests, as ``Runtime.infer`` splits."""
        if isinstance(inputs, dict):
            arrays = {k: np.asarray(v) for k, v in inputs.items()}
            n = len(next(iter(arrays.values()))) if arrays and next(iter(arrays.values())).ndim else 0
            step = self._max_batch(self.model + TENSORS_SUFFIX)
            if not step or n <= step:
                return [(inputs, question)]
            return [({k: v[i:i + step] for k, v in arrays.items()}, question) for i in range(0, n, step)]
        items = [inputs] if isinstance(inputs, (str, bytes, bytearray, os.PathLike)) else inputs
        if not isinstance(items, (list, tuple)):
            return [(inputs, question)]
        step = self._max_batch(self.model)
        if not step or len(items) <= step:
            return [(items, question)]
        many = question is not None and not isinstance(question, (str, bytes))
        if many and len(question) != len(items):
            raise InputError(f"{len(question)} questions for {len(items)} images: give one, or one per image")
        return [(items[i:i + step], list(question[i:i + step]) if many else question)
                for i in range(0, len(items), step)]

    def _infer(self, inputs: Any, question: Any) -> list[Prediction | InputError]:
        model, parts = self._parts(inputs, question)
        body, head_len = _encode_request(parts)
        status, data = self._request("POST", f"/v2/models/{model}/infer", body,
                                     {"Inference-Header-Content-Length": str(head_len),
                                      "Content-Type": "application/octet-stream"})
        if status != 200:
            message = _error_message(data)
            if status >= 500 and "unavailable" in message.lower():
                raise BackendUnavailableError(f"server {self.url}: {message}")
            raise InputError(f"server {self.url} refused the request ({status}): {message}")
        return _predictions(json.loads(data))

    def _parts(self, inputs: Any, question: str | Sequence[str] | None) -> tuple[str, list]:
        if isinstance(inputs, dict):
            if question is not None:
                raise InputError("question= cannot be combined with preprocessed arrays")
            parts = []
            for name, value in inputs.items():
                a = np.ascontiguousarray(value)
                if DATATYPES.get(a.dtype.name, "BYTES") == "BYTES":
                    raise InputError(f"input {name!r}: dtype {a.dtype} cannot be sent")
                parts.append((name, DATATYPES[a.dtype.name], a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes()))
            if not parts:
                raise InputError("empty dict of inputs")
            return self.model + TENSORS_SUFFIX, parts
        if isinstance(inputs, (str, bytes, bytearray, os.PathLike)):
            inputs = [inputs]
        items = list(inputs)
        if not items:
            raise InputError("empty batch: give at least one input")
        blobs = [_as_bytes(x, i) for i, x in enumerate(items)]
        if question is not None:
            questions = [question] * len(items) if isinstance(question, (str, bytes)) else list(question)
            if len(questions) != len(items):
                raise InputError(f"{len(questions)} questions for {len(items)} images: give one, or one per image")
            q = [_as_bytes(x, i) for i, x in enumerate(questions)]
            return self.model, [("image", "BYTES", (len(items), 1), _bytes_blob(blobs)),
                                ("question", "BYTES", (len(items), 1), _bytes_blob(q))]
        name = "text" if all(isinstance(x, str) for x in items) else "image"
        return self.model, [(name, "BYTES", (len(items), 1), _bytes_blob(blobs))]


def _error_message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", "")) or data.decode(errors="replace")[:200]
    except (ValueError, AttributeError):
        return data.decode(errors="replace")[:200]


def _predictions(response: dict[str, Any]) -> list[Prediction | InputError]:
    out = {o["name"]: o["data"] for o in response.get("outputs", [])}
    missing = [p.name for p in OUTPUTS if p.name not in out]
    if missing:
        raise BackendUnavailableError(f"the server's answer lacks {', '.join(missing)}: is it a freedeploy model?")
    rows: list[Prediction | InputError] = []
    for label, cls, conf, exit_index, block, error in zip(*(out[p.name] for p in OUTPUTS)):
        if error:
            rows.append(InputError(error))
        else:
            rows.append(Prediction(label, int(cls), float(conf) if conf is not None else math.nan, int(exit_index),
                                   int(block)))
    return rows


class Fleet:
    """Several servers of the same bundle: each request goes to the server with the fewest requests in
    flight from this process (ties in turn); a server that cannot be reached is set aside for
    ``retry_after`` seconds and the request goes to the next one. Thread-safe."""

    def __init__(self, urls: Sequence[str], model: str, timeout: float = 30.0, retry_after: float = 5.0) -> None:
        if isinstance(urls, str) or not urls:
            raise ConfigError("a fleet needs a list of one or more server URLs")
        self.clients = [Client(u, model, timeout) for u in urls]
        if len({c.url for c in self.clients}) != len(self.clients):
            raise ConfigError("a server URL is listed twice")
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._in_flight = [0] * len(self.clients)
        self._down_until = [0.0] * len(self.clients)
        self._turn = 0
        self.served = [0] * len(self.clients)  # requests each server answered

    def _pick(self, tried: set[int]) -> int | None:
        now = time.monotonic()
        with self._lock:
            up = [i for i in range(len(self.clients)) if i not in tried and self._down_until[i] <= now]
            if not up:
                return None
            self._turn += 1
            i = min(up, key=lambda j: (self._in_flight[j], (j - self._turn) % len(self.clients)))
            self._in_flight[i] += 1
            return i

    def infer(self, inputs: Any, question: str | Sequence[str] | None = None,
              errors: str = "raise") -> list[Prediction | InputError]:
        tried: set[int] = set()
        reasons = []
        while (i := self._pick(tried)) is not None:
            tried.add(i)
            try:
                rows = self.clients[i].infer(inputs, question, errors)
            except BackendUnavailableError as exc:
                with self._lock:
                    self._down_until[i] = time.monotonic() + self.retry_after
                reasons.append(str(exc))
                continue
            finally:
                with self._lock:
                    self._in_flight[i] -= 1
            with self._lock:
                self.served[i] += 1
            return rows
        raise BackendUnavailableError("no server of the fleet answered: " + ("; ".join(reasons) or
                                      f"all {len(self.clients)} set aside after failures, retry in "
                                      f"{self.retry_after:g} s"))

    def close(self) -> None:
        for c in self.clients:
            c.close()
