"""What the decoding loop reads from a generative bundle, looked up once: the graphs, and per graph
its wiring (the layer of each key/value tensor, the stage whose past mask it reads, the input that
takes a hidden state, whether it decides). Nothing here is known by naming or position: a reader in
another language needs the same fields of ``bundle.json`` and no convention.

The plan also pools each backend's decoding sessions, one per concurrent caller (``SessionPool``).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from runtimes.bundle import Bundle, DecoderHead, GraphSpec, TensorSpec, decision_field
from runtimes.errors import ConfigError

__all__ = ["DecodePlan", "SessionPool", "graph_key"]


def graph_key(key: str, n: int) -> str:
    """How calls are counted: ``full_step`` for one new token, ``full_step@5`` for five (a verification)."""
    return key if n == 1 else f"{key}@{n}"


def decoder_head(bundle: Bundle) -> DecoderHead:
    """The bundle's decoder head (encode, prefill, fills and the token facts): the one place the loop
    reaches it. A ConfigError for a bundle that classifies."""
    return bundle.expect(DecoderHead, "decoding")


def _one(tensors: Sequence[TensorSpec], role: str, where: str) -> str:
    found = [t for t in tensors if t.role == role]
    if len(found) != 1:
        raise ConfigError(f"{where} has {len(found)} tensors with role {role!r}, expected one")
    return found[0].name


def kv_names(tensors: Sequence[TensorSpec], past: bool) -> list[tuple[int, str, str]]:
    """(layer, keys name, values name) of a graph's past (inputs) or new (outputs) keys and values."""
    roles = ("past_keys", "past_values") if past else ("new_keys", "new_values")
    keys = {t.layer: t.name for t in tensors if t.role == roles[0]}
    values = {t.layer: t.name for t in tensors if t.role == roles[1]}
    return [(layer, keys[layer], values[layer]) for layer in sorted(keys)]


class SessionPool:
    """Idle decoding sessions per backend: a caller takes one no other caller holds (a new one when
    every one is busy) and gives it back when done."""

    def __init__(self) -> None:
        self._idle: dict[int, tuple[Any, list[Any]]] = {}
        self._lock = threading.Lock()

    def take(self, backend: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            owner, idle = self._idle.setdefault(id(backend), (backend, []))
            if owner is not backend:  # an earlier backend's id, reused: its sessions are stale
                owner, idle = self._idle[id(backend)] = (backend, [])
            if idle:
                return idle.pop()
        return make()

    def give(self, backend: Any, session: Any) -> None:
        with self._lock:
            owner, idle = self._idle.setdefault(id(backend), (backend, []))
            if owner is backend:
                idle.append(session)


class DecodePlan:
    """What the loop needs from a generative bundle, looked up once (see the module)."""

    def __init__(self, bundle: Bundle) -> None:
        d = decoder_head(bundle)
        self.bundle, self.head = bundle, d
        self.encode, self.prefill, self.full = d.encode, d.prefill, bundle.full
        self.stages = bundle.stages
        self.fills: dict[int, GraphSpec] = {i + 1: g for i, g in enumerate(d.fills)}  # by the stage each serves
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
        self.eos, self.bos, self.vocab_size = d.eos_id, d.bos_id, d.vocab_size
        self.max_positions, self.num_layers, self.num_query_tokens = d.max_positions, d.num_layers, d.num_query_tokens
        self.num_blocks = bundle.num_blocks
        # per stage, the block of the exit that leaves there; the last stage's final head: num_blocks
        self.blocks = tuple(st.exit.block if st.exit is not None else bundle.num_blocks for st in bundle.stages)
        self.exit_blocks = tuple(e.block for e in bundle.exits)
        self.hidden_out = {s.index: s.segment.output("hidden").name for s in bundle.stages if s.exit is not None}
        graphs = bundle.graphs
        self.past = {g.key: kv_names(g.inputs, past=True) for g in graphs}
        self.new = {g.key: kv_names(g.outputs, past=False) for g in graphs}
        widths = {t.shape[-1] for g in graphs for t in g.outputs if t.role == "new_keys"}
        if len(widths) != 1 or not all(isinstance(w, int) for w in widths):
            raise ConfigError(f"bundle {bundle.name!r}: the keys and values need one fixed width, "
                              f"found {sorted(map(str, widths))}")
        self.width = widths.pop()
        # which stage's past mask each decode graph reads: the plan says (TensorSpec.stage, checked at load)
        self.mask_of = {g.key: t.stage for g in graphs for t in g.inputs if t.role == "sequence_mask" and t.stage is not None}
        self.hidden_in = {g.key: t.name for g in graphs for t in g.inputs if t.role == "hidden"}
        self.decides = {g.key for g in graphs
                        if {"confidence", "prediction"} <= {decision_field(t.role) for t in g.outputs}}
        self.sessions = SessionPool()

    def step_graphs(self) -> list[GraphSpec]:
        """Every graph a decoding step may call (all but encode and prefill)."""
        once = (self.encode.key, self.prefill.key)
        return [g for g in self.bundle.graphs if g.key not in once]

    def block_of(self, stage: int) -> int:
        """The block of the head that decides at ``stage`` (``num_blocks`` for the final head)."""
        return self.blocks[stage]
