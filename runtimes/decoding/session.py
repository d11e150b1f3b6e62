"""A decoding session: one caller's KV store, its step runner and the encode + prefill of its row, in
the backend's decoding memory; sessions are pooled on the plan (``open_session``).

Every buffer lives in the backend's ``decode_memory()`` (host arrays by default, device memory on
TensorRT) and is allocated when the session is made: the cache, the masks, the hidden rows kept for
recomputation, the image, the prompt, and every step graph's inputs and outputs for up to ``MIN_NEW``
new tokens. Nothing of the size of the cache is allocated or copied per token.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from runtimes.backends.base import HostMemory
from runtimes.bundle import GraphSpec
from runtimes.decoding.plan import DecodePlan
from runtimes.decoding.step import StepRunner, tensor_dims
from runtimes.decoding.store import KVStore
from runtimes.errors import InputError

__all__ = ["DecodeSession", "Prefilled", "open_session"]


@dataclass(frozen=True)
class Prefilled:
    """A sample's encode + prefill, kept to decode it again without recomputing them."""

    keys: np.ndarray  # (layers, 1, start, width)
    values: np.ndarray
    token: int
    confidence: float


class DecodeSession:
    """One caller's decoding state on one backend: ``store`` (one row), ``runner`` (its step graphs)
    and the encode + prefill graphs bound to that row."""

    def __init__(self, plan: DecodePlan, backend: Any) -> None:
        self.plan, self.backend = plan, backend
        memory = backend.decode_memory() if hasattr(backend, "decode_memory") else HostMemory(backend)
        self.memory, self.row = memory, 0
        self.store = KVStore(memory, plan.num_layers, 1, plan.max_positions, plan.width, len(plan.stages))
        alloc = memory.alloc
        room = plan.max_positions - plan.num_query_tokens  # the prompt: up to every position the image leaves
        self._image = alloc((1, *plan.image_shape), np.float32)
        self._prompt = alloc((1, room), np.int64)
        self._prompt_mask = alloc((1, room), np.int64)
        memory.write(self._prompt_mask, 1)
        self._prefix = {t.name: alloc(tensor_dims(plan.encode, t, 0), np.dtype(t.dtype)) for t in plan.encode.outputs}
        self._first = {t.name: alloc(tensor_dims(plan.prefill, t, 0), np.dtype(t.dtype))
                       for t in plan.prefill.outputs if t.role not in ("new_keys", "new_values")}
        conf, token = (self._first[name] for name in plan.prefill.decision)
        self._decision = (token, conf)
        self._calls: dict[tuple[str, int], Callable[[], None]] = {}
        self.runner = StepRunner(plan, memory, self.store, self.row)

    def _check(self, image: np.ndarray, prompt_ids: Sequence[int], max_new: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.plan
        try:
            ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"the prompt must be a list of token ids, got {prompt_ids!r}") from exc
        start = p.num_query_tokens + ids.shape[1]
        if ids.ndim != 2 or ids.shape[1] < 1 or max_new < 1 or start + max_new > p.max_positions:
            raise InputError(f"a prompt of {ids.shape[1]} tokens and {max_new} new ones exceed the model's "
                             f"{p.max_positions} positions (of which {p.num_query_tokens} hold the image)")
        if ids.min() < 0 or ids.max() >= p.vocab_size:
            raise InputError(f"the prompt's token ids must be 0..{p.vocab_size - 1}, got {ids[0].tolist()}")
        shape = ", ".join(map(str, p.image_shape))
        try:
            pixels = np.asarray(image, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"the image must be a float array of shape (1, {shape})") from exc
        if pixels.shape != (1, *p.image_shape):
            raise InputError(f"the image must have shape (1, {shape}), got {pixels.shape}")
        return pixels, ids

    def prefill(self, image: np.ndarray, prompt_ids: Sequence[int], max_new: int) -> tuple[int, float]:
        """encode + prefill (once per sample): the row's cache holds the prefix and prompt, written by
        the prefill graph in place; returns the first token and its confidence (final head)."""
        p = self.plan
        pixels, ids = self._check(image, prompt_ids, max_new)
        n = ids.shape[1]
        self.memory.write(self._image, pixels)
        self.memory.write(self._prompt[:, :n], ids)
        for graph, key in ((p.encode, (p.encode.key, 0)), (p.prefill, (p.prefill.key, n))):
            call = self._calls.get(key)
            if call is None:
                call = self._calls[key] = self._bind_prefill(graph, n, p.num_query_tokens + n)
            call()
        token, conf = self.memory.read(*self._decision)
        self.store.reset(self.row, p.num_query_tokens + n)
        self.runner.counts = Counter({p.encode.key: 1, p.prefill.key: 1})
        return int(token[0]), float(conf[0])

    def _bind_prefill(self, graph: GraphSpec, prompt: int, start: int) -> Callable[[], None]:
        p, store, r = self.plan, self.store, self.row
        regions = {**self._prefix, **self._first, p.image_input: self._image}
        regions[p.prompt_ids], regions[p.prompt_mask] = self._prompt[:, :prompt], self._prompt_mask[:, :prompt]
        for layer, k, v in p.new[graph.key]:  # the prefill's keys and values land in the cache itself
            regions[k], regions[v] = store.keys[layer][r:r + 1, :start], store.values[layer][r:r + 1, :start]
        return self.memory.bind(graph.key, {t.name: regions[t.name] for t in (*graph.inputs, *graph.outputs)})

    def snapshot(self, token: int, confidence: float) -> Prefilled:
        """The cache as prefill left it, as host arrays (to decode the sample again: ``restore``)."""
        keys, values = self.store.snapshot(self.row)
        return Prefilled(keys, values, token, confidence)

    def restore(self, done: Prefilled, max_new: int) -> None:
        """The cache as ``prefill`` left it for this sample."""
        start = done.keys.shape[2]
        if max_new < 1 or start + max_new > self.plan.max_positions:
            raise InputError(f"{max_new} new tokens after {start} positions exceed the model's "
                             f"{self.plan.max_positions}")
        self.store.restore(self.row, done.keys, done.values)
        self.runner.counts = Counter()


@contextmanager
def open_session(plan: DecodePlan, backend: Any) -> Iterator[DecodeSession]:
    """A session of ``backend`` that no other caller holds while the block runs (pooled on ``plan``)."""
    session = plan.sessions.take(backend, lambda: DecodeSession(plan, backend))
    try:
        yield session
    finally:
        plan.sessions.give(backend, session)
