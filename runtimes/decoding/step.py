"""The step runner: binds and runs one row's step graphs at ``n`` new tokens (ExecuTorch's text
decoder runner).

Every graph is bound once per (new tokens, past bucket) to buffers in the backend's decoding memory:
its past inputs are views of the store's cache and of the mask of the stage the plan names for it,
its token, position and hidden inputs and its outputs are the runner's own buffers, allocated once.
So a decoding step is one bound call; ``commit`` copies the new keys and values into their rows of the
cache (one copy per graph, of a row of every layer), ``last`` reads back one decision. The bound
past grows by doubling (``MIN_BUCKET``, 32, ... rows, up to max_positions - 1): rows past the
sequence's length are masked, so a graph may read a longer past than the sequence has, and graphs are
bound again only when the bucket grows.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from runtimes.bundle import GraphSpec, TensorSpec
from runtimes.decoding.plan import DecodePlan, graph_key
from runtimes.decoding.store import KVStore
from runtimes.errors import ConfigError

__all__ = ["StepRunner", "MIN_BUCKET", "MIN_NEW"]

MIN_BUCKET = 16  # the shortest past a step graph is bound to; it doubles as the sequence grows
MIN_NEW = 16  # new tokens the first set of step buffers holds (a verification or recomputation of more: a second set)


def _bucket(length: int, capacity: int) -> int:
    b = MIN_BUCKET
    while b < length:
        b *= 2
    return min(b, capacity)


def tensor_dims(graph: GraphSpec, t: TensorSpec, n: int) -> tuple[int, ...]:
    """``t``'s shape for one row and ``n`` new tokens (0: a graph without new tokens)."""
    dims = []
    for d in t.shape:
        if isinstance(d, int):
            dims.append(d)
        elif d in ("batch", "new") and (n or d == "batch"):
            dims.append(1 if d == "batch" else n)
        else:
            raise ConfigError(f"{graph.key}: tensor {t.name} has axis {d!r}; decoding binds batch and new only")
    return tuple(dims)


class StepRunner:
    """One row of a ``KVStore`` and the step graphs bound to it (see the module). ``counts``: calls
    per graph key (``graph_key``) since the caller last cleared it."""

    def __init__(self, plan: DecodePlan, memory: Any, store: KVStore, row: int = 0) -> None:
        if not 0 <= row < store.batch:
            raise ConfigError(f"row {row} is not one of the store's {store.batch} rows")
        self.plan, self.memory, self.store, self.row = plan, memory, store, row
        self.copy, self.write, self.read, self._alloc = memory.copy, memory.write, memory.read, memory.alloc
        self._past_cap = plan.max_positions - 1  # a step reads at most every position but its own
        self._positions = np.arange(plan.max_positions, dtype=np.int64)
        self.counts: Counter = Counter()
        self._sets: dict[int, dict[Any, Any]] = {}  # per capacity of new tokens: the full-size buffers
        self._shared: dict[int, dict[str, Any]] = {}  # per new-token count: ids, positions, hidden states
        self._outputs: dict[tuple[str, int], dict[str, Any]] = {}  # per (graph, n): what only it writes
        self._new: dict[tuple[str, int], tuple[Any, Any, int, bool]] = {}
        self._place: dict[int, tuple[Any, np.ndarray]] = {}
        self._last: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._calls: dict[tuple[str, int, int, str], Callable[[], None]] = {}
        for g in plan.step_graphs():  # the first set, for every step graph: nothing is allocated per token
            self.outputs(g, 1)

    # buffers -----------------------------------------------------------------------------------------------
    def _set(self, n: int) -> tuple[int, dict[Any, Any]]:
        """The buffers that hold calls on ``n`` new tokens: those of the smallest capacity (MIN_NEW,
        doubling, up to max_positions) that fits; a call on fewer tokens uses the first rows of each."""
        size = MIN_NEW
        while size < n:
            size *= 2
        size = min(size, self.plan.max_positions)
        return size, self._sets.setdefault(size, {})

    def _buffer(self, n: int, key: Any, graph: GraphSpec, t: TensorSpec) -> Any:
        """``t``'s buffer for ``n`` new tokens: the first ``n`` rows of its set's buffer."""
        size, found = self._set(n)
        base = found.get(key)
        if base is None:
            base = found[key] = self._alloc(tensor_dims(graph, t, size), np.dtype(t.dtype))
        if "new" not in t.shape:
            return base
        return base[(slice(None),) * list(t.shape).index("new") + (slice(0, n),)]

    def shared(self, n: int) -> dict[str, Any]:
        """Buffers several graphs share at ``n`` new tokens, by tensor name: token ids, positions, and
        each hidden state (a producer's output is its consumers' input)."""
        got = self._shared.get(n)
        if got is None:
            p, (size, found) = self.plan, self._set(n)
            block = found.get("inputs")
            if block is None:  # token ids and positions side by side: one write places both
                block = found["inputs"] = self._alloc((2, 1, size), np.int64)
            got = self._shared[n] = {p.token_ids: block[0][:, :n], p.positions: block[1][:, :n]}
            self._place[n] = (block[:, :, :n], np.zeros((2, 1, n), np.int64))
        return got

    def output(self, name: str, n: int) -> Any:
        """The (1, n, ...) buffer of a shared tensor (a hidden state) at ``n`` new tokens."""
        return self.shared(n)[name]

    def outputs(self, graph: GraphSpec, n: int) -> dict[str, Any]:
        """``graph``'s output buffers at ``n`` new tokens, by tensor name."""
        got = self._outputs.get((graph.key, n))
        if got is None:
            got = self._outputs[(graph.key, n)] = self._make_outputs(graph, n)
        return got

    def _make_outputs(self, graph: GraphSpec, n: int) -> dict[str, Any]:
        got: dict[str, Any] = {}
        shared, new = self.shared(n), self.plan.new[graph.key]
        if new:
            size, found = self._set(n)
            blocks = found.get((graph.key, "new"))
            if blocks is None:
                shape = (len(new), 1, size, self.plan.width)
                blocks = found[(graph.key, "new")] = (self._alloc(shape, np.float32), self._alloc(shape, np.float32))
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
        return got

    def hidden_in(self, graph: GraphSpec, n: int) -> Any:
        """The (1, n, hidden) buffer ``graph`` reads its hidden state from, at ``n`` new tokens."""
        name = self.plan.hidden_in[graph.key]
        shared = self.shared(n)
        got = shared.get(name)
        if got is None:
            t = next(t for t in graph.inputs if t.name == name)
            got = shared[name] = self._buffer(n, name, graph, t)
        return got

    # binding -----------------------------------------------------------------------------------------------
    def _bind(self, graph: GraphSpec, n: int, bucket: int, source: str) -> Callable[[], None]:
        shared, store, rows = self.shared(n), self.store, slice(self.row, self.row + 1)
        regions = dict(self.outputs(graph, n))
        for t in graph.inputs:
            if t.role == "past_keys":
                regions[t.name] = store.keys[t.layer][rows, :bucket]
            elif t.role == "past_values":
                regions[t.name] = store.values[t.layer][rows, :bucket]
            elif t.role == "sequence_mask":
                regions[t.name] = store.masks[self.plan.mask_of[graph.key]][rows, :bucket]
            elif t.role == "hidden" and source:
                regions[t.name] = shared[source]
            elif t.name in shared:
                regions[t.name] = shared[t.name]
            elif t.role == "hidden":
                regions[t.name] = self.hidden_in(graph, n)
            else:
                raise ConfigError(f"{graph.key}: input {t.name} ({t.role}) has no buffer in the decoding loop")
        return self.memory.bind(graph.key, regions)

    # stepping ----------------------------------------------------------------------------------------------
    def place(self, tokens: Sequence[int]) -> int:
        """Write ``tokens`` as the next inputs, at the row's next positions; returns how many."""
        n = len(tokens)
        if n not in self._place:
            self.shared(n)
        region, values = self._place[n]
        values[0, 0] = tokens
        at = self.store.positions[self.row]
        values[1, 0] = self._positions[at:at + n]
        self.write(region, values)
        return n

    def run(self, graph: GraphSpec, n: int = 1, past: int | None = None, source: str = "") -> None:
        """Call ``graph`` on ``n`` placed tokens after ``past`` rows (the row's length by default;
        ``source``: the hidden state a fill graph reads)."""
        rows = self.store.lengths[self.row] if past is None else past
        bucket = _bucket(rows, self._past_cap) if self.plan.past[graph.key] else 0
        key = (graph.key, n, bucket, source)
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = self._bind(graph, n, bucket, source)
        call()
        self.counts[graph.key if n == 1 else graph_key(graph.key, n)] += 1

    def commit(self, graph: GraphSpec, n: int, at: int) -> None:
        """The new keys and values ``graph`` wrote for ``n`` tokens, into the cache from row ``at``."""
        k, v, first, contiguous = self._new[(graph.key, n)]
        store, r = self.store, self.row
        if contiguous:
            self.copy(store.keys[first:first + len(k), r:r + 1, at:at + n], k)
            self.copy(store.values[first:first + len(k), r:r + 1, at:at + n], v)
        else:
            for i, (layer, _, _) in enumerate(self.plan.new[graph.key]):
                self.copy(store.keys[layer, r:r + 1, at:at + n], k[i])
                self.copy(store.values[layer, r:r + 1, at:at + n], v[i])

    def last(self, graph: GraphSpec, n: int = 1) -> tuple[int, np.floating]:
        """The token and confidence ``graph`` decided for the last of its ``n`` new tokens (on a device
        the only numbers that come back). The confidence keeps the graph's dtype, so a threshold
        compares with it as with the graph's own output."""
        tokens, confs = self.read(*self._last[(graph.key, n)])
        return int(tokens[0]), confs[0]

    def decision(self, graph: GraphSpec, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The tokens and confidences ``graph`` decided for all its ``n`` new tokens."""
        conf_name, token_name = graph.decision
        out = self._outputs[(graph.key, n)]
        return self.read(out[token_name][0], out[conf_name][0])
