"""Greedy decoding with early exits on a generative bundle's graphs (no torch).

The loop reads everything from the plan (``Bundle.decoder`` and the stages): which graph to call,
which tensor carries which layer's keys and values, which output is a decision. Per sample:

1. ``encode`` turns the image into the prefix; ``prefill`` runs prefix and prompt through every
   layer, fills every layer's cache and decides the first token with the final head;
2. each later token runs stage by stage. After stage k, if exit k is on, its head reads the hidden
   state and the cache of the layer it shares; when its confidence reaches the threshold the token
   is emitted there, and ``fill_s`` writes the keys and values of every later stage's layers from
   that hidden state (state propagation); otherwise the next stage runs;
3. it stops at the end-of-sequence token or after ``max_new`` tokens.

**The cache and the buffers.** A ``_Session`` (one per caller, pooled on the plan) owns one
preallocated region per keys / values, of shape (layers, 1, max_positions, hidden), a past mask per
stage, and every buffer the graphs read and write at batch 1. Each graph is bound once
(``bind``) to its buffers: its past inputs are views of the cache's first ``bucket`` rows and of
its stage's mask, so a decoding step is one bound call, the new keys and values are copied into
their row of the cache (one copy per graph, of one row per layer), and one mask entry is set. Rows
past the sequence's length are masked, so the graph may read a longer past than the sequence has:
the bound past grows by doubling (16, 32, ... rows, up to max_positions - 1) and the graphs are
bound again only when it does. Prefill writes its keys and values straight into the cache. Nothing
of the size of the cache is allocated or copied per token.

**Where the buffers live.** The backend's ``decode_memory()`` says: host numpy arrays by default
(``runtimes.backends.base.HostMemory``: ONNX Runtime binds them in place), device memory on
TensorRT. The loops touch buffers only through its ``copy`` (region to region: commits, hidden
rows), ``write`` (host values in: tokens, positions, mask entries) and ``read`` (host values out:
only the decision of the row that decides, a token and a confidence), so on a device the cache
never leaves it and per token only those few bytes come back.

This is the rule of ``freedeploy.generative.decode.greedy`` (the torch reference the export
validates against); the only difference is masked rows, which add exact zeros to the attention.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from runtimes.backends.base import HostMemory
from runtimes.bundle import Bundle, GraphSpec, decision_field
from runtimes.errors import ConfigError, InputError

__all__ = ["Decoded", "DecodePlan", "Prefilled", "KV_MODES", "greedy_decode", "full_decode", "speculative_decode", "prefill",
           "graph_key", "MIN_BUCKET", "MIN_NEW", "MAX_WAITING"]

MIN_BUCKET = 16  # the shortest past a step graph is bound to; it doubles as the sequence grows
MIN_NEW = 16  # new tokens the first set of step buffers holds (a verification or recomputation of more: a second set)
# recomputation: an exit head carries the rows that wait for the next stage; past this many it is not
# asked (the token goes on and takes them along), so a long run of early tokens cannot make each
# head call longer without bound
MAX_WAITING = 16


@dataclass
class Decoded:
    tokens: list[int]
    exits: list[int] = field(default_factory=list)  # per token: the exit that emitted it; len(exits) = final head
    confidences: list[float] = field(default_factory=list)
    calls: int = 0  # graph calls made, encode and prefill included
    graph_calls: Counter = field(default_factory=Counter)  # the same, per graph key
    prefill_seconds: float = 0.0  # encode and prefill
    seconds: float = 0.0  # the whole sample, prefill included
    # early exit: the highest confidence of an exit that was asked and did not fire (0 if none was). Any
    # thresholds above it that keep the same exits on decode exactly the same tokens (calibration uses it)
    slack: float = 0.0


@dataclass(frozen=True)
class Prefilled:
    """A sample's encode + prefill, kept to decode it again without recomputing them."""

    keys: np.ndarray  # (layers, 1, start, hidden)
    values: np.ndarray
    token: int
    confidence: float


def _one(tensors: Sequence[Any], role: str, where: str) -> str:
    found = [t for t in tensors if t.role == role]
    if len(found) != 1:
        raise ConfigError(f"{where} has {len(found)} tensors with role {role!r}, expected one")
    return found[0].name


class DecodePlan:
    """What the loop needs from a generative bundle, looked up once; it also pools the per-caller
    decoding sessions (buffers and bound graphs) of each backend it serves."""

    def __init__(self, bundle: Bundle) -> None:
        if bundle.decoder is None:
            raise ConfigError(f"bundle {bundle.name!r} is a {bundle.task} bundle, not a generative one")
        self.bundle, d = bundle, bundle.decoder
        self.encode, self.prefill = d.encode, d.prefill
        self.stages = bundle.stages
        self.fills: dict[int, GraphSpec] = {i + 1: g for i, g in enumerate(d.fills)}
        self.image_input = d.encode.inputs[0].name
        self.image_shape = tuple(d.encode.inputs[0].shape[1:])
        if not all(isinstance(x, int) for x in self.image_shape):
            raise ConfigError(f"bundle {bundle.name!r}: the image input needs fixed sizes, "
                              f"has {d.encode.inputs[0].shape}")
        self.prompt_ids = _one(d.prefill.inputs, "token_ids", "prefill")
        self.prompt_mask = _one(d.prefill.inputs, "sequence_mask", "prefill")
        first = bundle.stages[0].segment
        self.token_ids = _one(first.inputs, "token_ids", first.key)
        self.positions = _one(first.inputs, "positions", first.key)
        self.past_mask = _one(first.inputs, "sequence_mask", first.key)
        self.hidden_out = {s.index: s.segment.output("hidden").name for s in bundle.stages if s.exit is not None}
        self.eos, self.max_positions, self.num_layers = d.eos_id, d.max_positions, d.num_layers
        # per graph, once: the (layer, keys, values) names it reads and writes
        self.past = {g.key: self.kv(g.inputs, past=True) for g in bundle.graphs}
        self.new = {g.key: self.kv(g.outputs, past=False) for g in bundle.graphs}
        widths = {t.shape[-1] for g in bundle.graphs for t in g.outputs if t.role == "new_keys"}
        if len(widths) != 1 or not all(isinstance(w, int) for w in widths):
            raise ConfigError(f"bundle {bundle.name!r}: the keys and values need one fixed width, found {sorted(map(str, widths))}")
        self.width = widths.pop()
        # which stage's past mask each graph reads: a segment its own, an exit the next stage's (it
        # shares that stage's first layer), the monolithic step the first (every stage is complete there)
        self.mask_of = {g.key: 0 for g in bundle.graphs}
        for st in bundle.stages:
            self.mask_of[st.segment.key] = st.index
            if st.exit is not None:
                self.mask_of[st.exit.graph.key] = st.index + 1
        self.hidden_in = {g.key: t.name for g in bundle.graphs for t in g.inputs if t.role == "hidden"}
        self.decides = {g.key for g in bundle.graphs
                        if {"confidence", "prediction"} <= {decision_field(t.role) for t in g.outputs}}
        self._idle: dict[int, tuple[Any, list[_Session]]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def kv(tensors: Sequence[Any], past: bool) -> list[tuple[int, str, str]]:
        """(layer, keys name, values name) of a graph's past (inputs) or new (outputs) entries."""
        roles = ("past_keys", "past_values") if past else ("new_keys", "new_values")
        keys = {t.layer: t.name for t in tensors if t.role == roles[0]}
        values = {t.layer: t.name for t in tensors if t.role == roles[1]}
        return [(layer, keys[layer], values[layer]) for layer in sorted(keys)]

    def acquire(self, backend: Any) -> "_Session":
        """A session of ``backend`` no other caller holds (a new one when every one is busy)."""
        with self._lock:
            owner, idle = self._idle.setdefault(id(backend), (backend, []))
            if owner is not backend:  # an earlier backend's id, reused: its sessions are stale
                owner, idle = self._idle[id(backend)] = (backend, [])
            if idle:
                return idle.pop()
        return _Session(self, backend)

    def release(self, session: "_Session") -> None:
        with self._lock:
            owner, idle = self._idle.setdefault(id(session.backend), (session.backend, []))
            if owner is session.backend:
                idle.append(session)


def graph_key(key: str, n: int) -> str:
    """How calls are counted: ``full_step`` for one new token, ``full_step@5`` for five (a verification)."""
    return key if n == 1 else f"{key}@{n}"


def _bucket(length: int, capacity: int) -> int:
    b = MIN_BUCKET
    while b < length:
        b *= 2
    return min(b, capacity)


class _Session:
    """One caller's batch-1 buffers, the cache among them, and its graphs bound to them.

    Every buffer lives in the backend's decoding memory (``Backend.decode_memory``: host arrays, or
    device memory on TensorRT), and the loops move data only through its calls: ``copy`` (region to
    region), ``write`` (host values into a region) and ``read`` (a region back to the host: a
    decision's few numbers). Buffers are allocated here, once: the cache, the past masks, the hidden
    rows kept for recomputation, the prompt's, and every step graph's inputs and outputs for up to
    ``MIN_NEW`` new tokens; a call on more new tokens than that allocates a set twice as large, once."""

    def __init__(self, plan: DecodePlan, backend: Any) -> None:
        self.plan, self.backend = plan, backend
        memory = backend.decode_memory() if hasattr(backend, "decode_memory") else HostMemory(backend)
        self.memory = memory
        self.copy, self.write, self.read, self._alloc = memory.copy, memory.write, memory.read, memory.alloc
        cap, width, d = plan.max_positions, plan.width, plan.bundle.decoder
        self._past_cap = cap - 1  # a step reads at most every position but its own
        self.keys = self._alloc((plan.num_layers, 1, cap, width), np.float32)
        self.values = self._alloc((plan.num_layers, 1, cap, width), np.float32)
        # the past mask per stage: which rows hold that stage's keys and values. With state propagation
        # every stage is complete and all agree; with recomputation a stage's rows wait for a deep token
        stages = len(plan.stages)
        self.masks = self._alloc((stages, 1, cap), np.int64)
        self.hidden = self._alloc((max(1, stages - 1), cap, width), np.float32)  # recomputation: stage outputs by row
        # encode and prefill: the image, the prefix, the prompt (up to every position the image leaves)
        room = cap - d.num_query_tokens
        self._image = self._alloc((1, *plan.image_shape), np.float32)
        self._prompt = self._alloc((1, room), np.int64)
        self._prompt_mask = self._alloc((1, room), np.int64)
        self.write(self._prompt_mask, 1)
        self._prefix = {t.name: self._alloc(self._dims(plan.encode, t, 0), np.dtype(t.dtype))
                        for t in plan.encode.outputs}
        self._first = {t.name: self._alloc(self._dims(plan.prefill, t, 0), np.dtype(t.dtype))
                       for t in plan.prefill.outputs if t.role not in ("new_keys", "new_values")}
        self._positions = np.arange(cap, dtype=np.int64)
        self.length = 0
        self.counts: Counter = Counter()
        self._sets: dict[int, dict[Any, Any]] = {}  # per capacity of new tokens: the full-size buffers
        self._shared: dict[int, dict[str, Any]] = {}  # per new-token count: ids, positions, hidden states
        self._outputs: dict[tuple[str, int], dict[str, Any]] = {}  # per (graph, n): what only it writes
        self._new: dict[tuple[str, int], tuple[Any, Any, int, bool]] = {}
        self._place: dict[int, tuple[Any, np.ndarray]] = {}
        self._last: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._calls: dict[tuple[str, int, int, str], Callable[[], None]] = {}
        for g in plan.bundle.graphs:  # the first set, for every step graph: nothing is allocated per token
            if g.key not in (plan.encode.key, plan.prefill.key):
                self.outputs(g, 1)

    @staticmethod
    def _dims(graph: GraphSpec, t: Any, n: int) -> tuple[int, ...]:
        dims = []
        for d in t.shape:
            if isinstance(d, int):
                dims.append(d)
            elif d in ("batch", "new") and (n or d == "batch"):
                dims.append(1 if d == "batch" else n)
            else:
                raise ConfigError(f"{graph.key}: tensor {t.name} has axis {d!r}; decoding binds batch and new only")
        return tuple(dims)

    def _set(self, n: int) -> tuple[int, dict[Any, Any]]:
        """The buffers that hold calls on ``n`` new tokens: those of the smallest capacity (MIN_NEW,
        doubling, up to max_positions) that fits; a call on fewer tokens uses the first rows of each."""
        size = MIN_NEW
        while size < n:
            size *= 2
        size = min(size, self.plan.max_positions)
        got = self._sets.get(size)
        if got is None:
            got = self._sets[size] = {}
        return size, got

    @staticmethod
    def _rows(region: Any, axis: int, n: int) -> Any:
        return region[(slice(None),) * axis + (slice(0, n),)]

    def _buffer(self, n: int, key: Any, graph: GraphSpec, t: Any) -> Any:
        """``t``'s buffer for ``n`` new tokens: the first ``n`` rows of its set's buffer."""
        size, found = self._set(n)
        base = found.get(key)
        if base is None:
            base = found[key] = self._alloc(self._dims(graph, t, size), np.dtype(t.dtype))
        return self._rows(base, list(t.shape).index("new"), n) if "new" in t.shape else base

    def shared(self, n: int) -> dict[str, Any]:
        got = self._shared.get(n)
        if got is None:
            p = self.plan
            size, found = self._set(n)
            block = found.get("inputs")
            if block is None:  # token ids and positions side by side: one write places both
                block = found["inputs"] = self._alloc((2, 1, size), np.int64)
            got = self._shared[n] = {p.token_ids: block[0][:, :n], p.positions: block[1][:, :n]}
            self._place[n] = (block[:, :, :n], np.zeros((2, 1, n), np.int64))
        return got

    def outputs(self, graph: GraphSpec, n: int) -> dict[str, Any]:
        got = self._outputs.get((graph.key, n))
        if got is None:
            got, shared = {}, self.shared(n)
            new = self.plan.new[graph.key]
            if new:
                size, found = self._set(n)
                blocks = found.get((graph.key, "new"))
                if blocks is None:
                    shape = (len(new), 1, size, self.plan.width)
                    blocks = (self._alloc(shape, np.float32), self._alloc(shape, np.float32))
                    found[(graph.key, "new")] = blocks
                k, v = (b[:, :, :n] for b in blocks)
                for i, (_, kn, vn) in enumerate(new):
                    got[kn], got[vn] = k[i], v[i]
                first = new[0][0]
                contiguous = [layer for layer, _, _ in new] == list(range(first, first + len(new)))
                self._new[(graph.key, n)] = (k, v, first, contiguous)
            for t in graph.outputs:
                if t.role == "hidden":
                    if t.name not in shared:
                        shared[t.name] = self._buffer(n, t.name, graph, t)
                    got[t.name] = shared[t.name]
                elif t.name not in got:
                    got[t.name] = self._buffer(n, (graph.key, t.name), graph, t)
            if graph.key in self.plan.decides:
                conf, token = (got[name] for name in graph.decision)
                self._last[(graph.key, n)] = (token[0, n - 1:n], conf[0, n - 1:n])
            self._outputs[(graph.key, n)] = got
        return got

    def _bind(self, graph: GraphSpec, n: int, bucket: int, source: str) -> Callable[[], None]:
        shared = self.shared(n)
        regions = dict(self.outputs(graph, n))
        for t in graph.inputs:
            if t.role == "past_keys":
                regions[t.name] = self.keys[t.layer][:, :bucket]
            elif t.role == "past_values":
                regions[t.name] = self.values[t.layer][:, :bucket]
            elif t.role == "sequence_mask":
                regions[t.name] = self.masks[self.plan.mask_of[graph.key]][:, :bucket]
            elif t.role == "hidden" and source:
                regions[t.name] = shared[source]
            elif t.name in shared:
                regions[t.name] = shared[t.name]
            elif t.role == "hidden":
                regions[t.name] = shared[t.name] = self._buffer(n, t.name, graph, t)
            else:
                raise ConfigError(f"{graph.key}: input {t.name} ({t.role}) has no buffer in the decoding loop")
        return self.memory.bind(graph.key, regions)

    def run(self, graph: GraphSpec, n: int = 1, source: str = "", past: int | None = None) -> None:
        """Call ``graph`` on ``n`` new tokens placed after ``past`` rows (the cache's length by default;
        ``source``: the hidden state a fill graph reads)."""
        rows = self.length if past is None else past
        bucket = _bucket(rows, self._past_cap) if self.plan.past[graph.key] else 0
        key = (graph.key, n, bucket, source)
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = self._bind(graph, n, bucket, source)
        call()
        self.counts[graph.key if n == 1 else graph_key(graph.key, n)] += 1

    def commit(self, graph: GraphSpec, n: int, at: int) -> None:
        """The new keys and values ``graph`` wrote for ``n`` tokens, into the cache at row ``at``."""
        k, v, first, contiguous = self._new[(graph.key, n)]
        if contiguous:
            self.copy(self.keys[first:first + len(k), :, at:at + n], k)
            self.copy(self.values[first:first + len(k), :, at:at + n], v)
        else:
            for i, (layer, _, _) in enumerate(self.plan.new[graph.key]):
                self.copy(self.keys[layer, :, at:at + n], k[i])
                self.copy(self.values[layer, :, at:at + n], v[i])

    def last(self, graph: GraphSpec, n: int = 1) -> tuple[int, np.floating]:
        """The token and confidence ``graph`` decided for the last of its ``n`` new tokens (on a device
        the only numbers that come back: a token and a confidence). The confidence keeps the graph's
        dtype, so a threshold compares with it as with the graph's own output."""
        tokens, confs = self.read(*self._last[(graph.key, n)])
        return int(tokens[0]), confs[0]

    def decision(self, graph: GraphSpec, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The tokens and confidences ``graph`` decided for all its ``n`` new tokens."""
        conf_name, token_name = graph.decision
        out = self._outputs[(graph.key, n)]
        return self.read(out[token_name][0], out[conf_name][0])

    def place(self, tokens: Sequence[int]) -> int:
        """Write ``tokens`` as the next inputs, after the cache's length; returns how many."""
        n = len(tokens)
        if n not in self._place:
            self.shared(n)
        region, values = self._place[n]
        values[0, 0] = tokens
        values[1, 0] = self._positions[self.length:self.length + n]
        self.write(region, values)
        return n

    def reset(self, length: int) -> None:
        """Every stage's past holds rows [0, length) (what is in them is the caller's)."""
        self.write(self.masks, 0)
        self.write(self.masks[:, :, :length], 1)
        self.length = length

    def prefill(self, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int) -> tuple[int, float]:
        """encode + prefill (once per sample): the cache holds the prefix and prompt, written by the
        prefill graph in place; the first token and its confidence (final head)."""
        p, d = self.plan, bundle.decoder
        try:
            ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"the prompt must be a list of token ids, got {prompt_ids!r}") from exc
        start = d.num_query_tokens + ids.shape[1]
        if ids.ndim != 2 or ids.shape[1] < 1 or max_new < 1 or start + max_new > p.max_positions:
            raise InputError(f"a prompt of {ids.shape[1]} tokens and {max_new} new ones exceed the model's "
                             f"{p.max_positions} positions (of which {d.num_query_tokens} hold the image)")
        if ids.min() < 0 or ids.max() >= d.vocab_size:
            raise InputError(f"the prompt's token ids must be 0..{d.vocab_size - 1}, got {ids[0].tolist()}")
        try:
            pixels = np.asarray(image, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"the image must be a float array of shape "
                             f"(1, {', '.join(map(str, p.image_shape))})") from exc
        if pixels.shape != (1, *p.image_shape):
            raise InputError(f"the image must have shape (1, {', '.join(map(str, p.image_shape))}), got {pixels.shape}")
        self.write(self._image, pixels)
        self.write(self._prompt[:, :ids.shape[1]], ids)
        for graph, key in ((p.encode, (p.encode.key, 0)), (p.prefill, (p.prefill.key, ids.shape[1]))):
            call = self._calls.get(key + (0, ""))
            if call is None:
                call = self._calls[key + (0, "")] = self._bind_prefill(graph, ids.shape[1], start)
            call()
        token, conf = self.read(*self._last[(p.prefill.key, 0)])
        self.reset(start)
        self.counts = Counter({p.encode.key: 1, p.prefill.key: 1})
        return int(token[0]), float(conf[0])

    def _bind_prefill(self, graph: GraphSpec, prompt: int, start: int) -> Callable[[], None]:
        p = self.plan
        regions = {**self._prefix, **self._first}
        regions[p.image_input] = self._image
        regions[p.prompt_ids], regions[p.prompt_mask] = self._prompt[:, :prompt], self._prompt_mask[:, :prompt]
        for layer, k, v in p.new[graph.key]:  # the prefill's keys and values land in the cache itself
            regions[k], regions[v] = self.keys[layer][:, :start], self.values[layer][:, :start]
        if graph.key == p.prefill.key and (p.prefill.key, 0) not in self._last:
            conf, token = (self._first[name] for name in graph.decision)
            self._last[(p.prefill.key, 0)] = (token, conf)
        return self.memory.bind(graph.key, {t.name: regions[t.name] for t in (*graph.inputs, *graph.outputs)})

    def snapshot(self, token: int, confidence: float) -> Prefilled:
        """The cache as prefill left it, as host arrays (to decode the sample again: ``restore``)."""
        start = self.length
        keys, values = self.read(self.keys[:, :, :start], self.values[:, :, :start])
        return Prefilled(np.array(keys), np.array(values), token, confidence)

    def restore(self, done: Prefilled, max_new: int) -> None:
        """The cache as ``prefill`` left it for this sample."""
        start = done.keys.shape[2]
        if max_new < 1 or start + max_new > self.plan.max_positions:
            raise InputError(f"{max_new} new tokens after {start} positions exceed the model's {self.plan.max_positions}")
        self.write(self.keys[:, :, :start], done.keys)
        self.write(self.values[:, :, :start], done.values)
        self.reset(start)
        self.counts = Counter()

    def advance(self, n: int = 1) -> None:
        """The ``n`` placed tokens are part of the sequence now, in every stage's cache."""
        self.write(self.masks[:, 0, self.length:self.length + n], 1)
        self.length += n

    def hidden_in(self, graph: GraphSpec, n: int) -> Any:
        """The (1, n, hidden) buffer ``graph`` reads its hidden state from, at ``n`` new tokens."""
        name = self.plan.hidden_in[graph.key]
        shared = self.shared(n)
        got = shared.get(name)
        if got is None:
            t = next(t for t in graph.inputs if t.name == name)
            got = shared[name] = self._buffer(n, name, graph, t)
        return got


def prefill(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
            plan: DecodePlan | None = None) -> Prefilled:
    """encode + prefill of one sample, to decode it several times (``prefilled=``) without redoing them."""
    plan = plan or DecodePlan(bundle)
    session = plan.acquire(backend)
    try:
        return session.snapshot(*session.prefill(bundle, image, prompt_ids, max_new))
    finally:
        plan.release(session)


def _decode(backend: Any, bundle: Bundle, plan: DecodePlan | None, image: np.ndarray, prompt_ids: Sequence[int],
            max_new: int, loop: Callable[[_Session, DecodePlan, Decoded], None],
            prefilled: Prefilled | None = None) -> Decoded:
    plan = plan or DecodePlan(bundle)
    session = plan.acquire(backend)
    try:
        t0 = time.perf_counter()
        if prefilled is None:
            token, confidence = session.prefill(bundle, image, prompt_ids, max_new)
        else:
            session.restore(prefilled, max_new)
            token, confidence = prefilled.token, prefilled.confidence
        result = Decoded([token], [len(plan.stages) - 1], [confidence])
        result.prefill_seconds = time.perf_counter() - t0
        loop(session, plan, result)
        result.seconds = time.perf_counter() - t0
        result.graph_calls = Counter(session.counts)
        result.calls = sum(session.counts.values())
    finally:
        plan.release(session)
    return result


KV_MODES = ("recompute", "propagate")


def greedy_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                  thresholds: Sequence[float | None] | None = None, plan: DecodePlan | None = None,
                  prefilled: Prefilled | None = None, kv: str = "recompute") -> Decoded:
    """Decode one sample: ``image`` is the model input (1, C, H, W), ``prompt_ids`` starts with BOS.

    ``kv``: how the layers a token skipped get its keys and values.
    ``recompute`` (the default): they wait; the next token that goes deeper than it carries the
    waiting rows through those layers in the same call (several new tokens at once, as
    verification does), so every cache row a decision reads is the full model's own, exactly. A
    sequence whose early tokens all equal the full model's is the full model's sequence.
    ``propagate``: at once, from the exited hidden state, by the state-fill graphs (CALM's state
    propagation, what the torch reference does): the cache rows are approximations, and later tokens
    may change even when every early token was right."""
    n_exits = len(bundle.exits)
    thresholds = list(bundle.thresholds if thresholds is None else thresholds)
    if len(thresholds) != n_exits:
        raise ConfigError(f"{len(thresholds)} thresholds for {n_exits} exits")
    if kv not in KV_MODES:
        raise ConfigError(f"kv must be one of {', '.join(KV_MODES)}, got {kv!r}")
    if kv == "recompute":
        return _decode(backend, bundle, plan, image, prompt_ids, max_new,
                       lambda s, p, result: _recompute_loop(s, p, result, thresholds, max_new), prefilled)

    def loop(s: _Session, p: DecodePlan, result: Decoded) -> None:
        token, stages = result.tokens[0], p.stages
        while len(result.tokens) < max_new and token != p.eos:
            at = s.length
            s.place([token])
            for stage in stages:
                seg = stage.segment
                s.run(seg)
                s.commit(seg, 1, at)
                if stage.exit is None:
                    token, conf = s.last(seg)
                    exit_ = n_exits
                    break
                limit = thresholds[stage.index]
                if limit is None:
                    continue
                head = stage.exit.graph
                s.run(head)
                t, c = s.last(head)
                if c < limit:
                    if c > result.slack:
                        result.slack = float(c)
                else:
                    token, conf, exit_ = t, c, stage.index
                    source = p.hidden_out[stage.index]
                    for k in range(stage.index + 1, len(stages)):  # state propagation
                        fill = p.fills[k]
                        s.run(fill, 1, source)
                        s.commit(fill, 1, at)
                    break
            s.advance()
            result.tokens.append(token)
            result.exits.append(exit_)
            result.confidences.append(float(conf))
    return _decode(backend, bundle, plan, image, prompt_ids, max_new, loop, prefilled)


def _recompute_loop(s: _Session, p: DecodePlan, result: Decoded, thresholds: list[float | None], max_new: int) -> None:
    """Early exit with deferred, batched recomputation of skipped layers.

    ``pending[k]``: the first row whose keys and values stage ``k`` lacks. Rows that wait form a
    suffix at every stage (a token that reaches stage k carries all of stage k's waiting rows with
    it), and deeper stages wait for at least as many (``pending`` never rises with k). Stage k's
    output hidden state of each row is kept (``s.hidden[k]``) until a deeper stage takes it."""
    stages, n_exits, eos = p.stages, len(p.stages) - 1, p.eos
    token = result.tokens[0]
    pending = [s.length] * len(stages)
    masks, store, copy, write = s.masks, s.hidden, s.copy, s.write
    while len(result.tokens) < max_new and token != eos:
        at = s.length
        s.place([token])
        for stage in stages:  # stage 0 always runs: the token's row is in the first stage's past after it
            k, seg = stage.index, stage.segment
            lo = at if k == 0 else pending[k]
            n = at + 1 - lo
            if k:
                copy(s.hidden_in(seg, n)[0], store[k - 1, lo:at + 1])
            s.run(seg, n, past=lo)
            s.commit(seg, n, lo)
            write(masks[k, 0, lo:at + 1], 1)
            pending[k] = at + 1
            if stage.exit is None:
                token, conf = s.last(seg, n)
                exit_ = n_exits
                break
            copy(store[k, lo:at + 1], s.shared(n)[p.hidden_out[k]][0])
            limit = thresholds[k]
            lo2 = pending[k + 1]  # the head shares the next stage's first layer: its waiting rows come along
            n2 = at + 1 - lo2
            if limit is None or n2 > MAX_WAITING:
                continue
            head = stage.exit.graph
            copy(s.hidden_in(head, n2)[0], store[k, lo2:at + 1])
            s.run(head, n2, past=lo2)
            t, c = s.last(head, n2)
            if c < limit:
                if c > result.slack:
                    result.slack = float(c)
            else:
                token, conf, exit_ = t, c, k
                break
        s.length += 1
        result.tokens.append(token)
        result.exits.append(exit_)
        result.confidences.append(float(conf))


def full_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                plan: DecodePlan | None = None, prefilled: Prefilled | None = None) -> Decoded:
    """The baseline: greedy decoding with the monolithic decode step (``full_step``), on the same
    cache and buffers as the chain."""
    n_exits, full = len(bundle.exits), bundle.full

    def loop(s: _Session, p: DecodePlan, result: Decoded) -> None:
        token = result.tokens[0]
        while len(result.tokens) < max_new and token != p.eos:
            at = s.length
            s.place([token])
            s.run(full)
            s.commit(full, 1, at)
            token, conf = s.last(full)
            s.advance()
            result.tokens.append(token)
            result.exits.append(n_exits)
            result.confidences.append(float(conf))
    return _decode(backend, bundle, plan, image, prompt_ids, max_new, loop, prefilled)


def speculative_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                       draft_exit: int = 0, draft_len: int = 4, plan: DecodePlan | None = None,
                       prefilled: Prefilled | None = None) -> Decoded:
    """Lossless self-speculation: exit ``draft_exit`` drafts up to ``draft_len`` tokens (the stages up to
    it, then its head, which carries the drafts' rows of the layer it shares), then ``full_step`` checks the last token and
    every draft in one call; the drafts that match the full model's own greedy tokens are kept, with
    the full model's next token after them. The text is the full model's greedy text.

    ``Decoded.exits`` marks each token's source: the draft exit's index for an accepted draft, the
    number of exits (the final head) for a token the full model wrote."""
    n_exits = len(bundle.exits)
    if isinstance(draft_exit, bool) or isinstance(draft_len, bool) or not isinstance(draft_exit, int) \
            or not isinstance(draft_len, int) or not 0 <= draft_exit < n_exits or draft_len < 1:
        raise ConfigError(f"draft exit must be 0..{n_exits - 1} and draft length 1 or more, "
                          f"got {draft_exit!r} and {draft_len!r}")
    full = bundle.full

    def loop(s: _Session, p: DecodePlan, result: Decoded) -> None:
        stages = p.stages[:draft_exit + 1]
        head = stages[-1].exit.graph
        hidden = p.hidden_out[draft_exit]
        store, masks, copy, write = s.hidden[draft_exit], s.masks, s.copy, s.write
        token = result.tokens[0]
        while len(result.tokens) < max_new and token != p.eos:
            start = s.length
            room = min(draft_len, max_new - len(result.tokens) - 1, p.max_positions - start - 2)
            drafts: list[int] = []
            last = token
            while len(drafts) < room:
                # draft: the stages up to the exit; the head shares the next stage's first layer, whose
                # rows for the drafts so far are missing, so they come along as new tokens (recomputed)
                at = s.length
                s.place([last])
                for stage in stages:
                    s.run(stage.segment)
                    s.commit(stage.segment, 1, at)
                copy(store[at:at + 1], s.shared(1)[hidden][0])
                n = at + 1 - start
                copy(s.hidden_in(head, n)[0], store[start:at + 1])
                s.run(head, n, past=start)
                last = s.last(head, n)[0]
                write(masks[:draft_exit + 1, 0, at:at + 1], 1)  # only the stages that ran hold the draft's row
                s.length += 1
                drafts.append(last)
                if last == p.eos:
                    break
            # verify: the full model over the last token and every draft, in one call
            write(masks[:, 0, start:s.length], 0)
            s.length = start
            n = s.place([token, *drafts])
            s.run(full, n)
            s.commit(full, n, start)
            tokens, confs = s.decision(full, n)
            verified = tokens.tolist()
            m = 0
            while m < len(drafts) and drafts[m] == verified[m] and drafts[m] != p.eos:
                m += 1
            accepted = drafts[:m] + [verified[m]]
            if m < len(drafts) and drafts[m] == p.eos and verified[m] == p.eos:
                accepted = drafts[:m + 1]
            for i, t in enumerate(accepted):
                if len(result.tokens) >= max_new:
                    break
                result.tokens.append(int(t))
                result.exits.append(draft_exit if i < m else n_exits)
                result.confidences.append(float(confs[i]))
                if t == p.eos:
                    break
            s.advance(len(accepted))  # the keys and values of the last token and the accepted drafts
            token = result.tokens[-1]
    return _decode(backend, bundle, plan, image, prompt_ids, max_new, loop, prefilled)
