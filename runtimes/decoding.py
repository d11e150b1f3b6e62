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

The cache is one preallocated array per layer and per keys / values, of shape (1, max_positions,
hidden): a graph reads the first ``past`` rows as a view (contiguous at batch 1, so nothing is
copied) and its new rows are written in place. This is the same rule as
``freedeploy.generative.decode.greedy`` (the torch reference the export validates against).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from runtimes.bundle import Bundle, GraphSpec
from runtimes.errors import ConfigError, InputError

__all__ = ["Decoded", "DecodePlan", "greedy_decode"]


@dataclass
class Decoded:
    tokens: list[int]
    exits: list[int] = field(default_factory=list)  # per token: the exit that emitted it; len(exits) = final head
    confidences: list[float] = field(default_factory=list)
    calls: int = 0  # graph calls made, encode and prefill included


def _by_role(tensors: Sequence[Any], role: str) -> list[Any]:
    return [t for t in tensors if t.role == role]


def _one(tensors: Sequence[Any], role: str, where: str) -> str:
    found = _by_role(tensors, role)
    if len(found) != 1:
        raise ConfigError(f"{where} has {len(found)} tensors with role {role!r}, expected one")
    return found[0].name


class DecodePlan:
    """What the loop needs from a generative bundle, looked up once."""

    def __init__(self, bundle: Bundle) -> None:
        if bundle.decoder is None:
            raise ConfigError(f"bundle {bundle.name!r} is a {bundle.task} bundle, not a generative one")
        self.bundle, d = bundle, bundle.decoder
        self.encode, self.prefill = d.encode, d.prefill
        self.stages = bundle.stages
        self.fills: dict[int, GraphSpec] = {i + 1: g for i, g in enumerate(d.fills)}
        self.image_input = d.encode.inputs[0].name
        self.prefix = _one(d.encode.outputs, "prefix", "encode")
        self.prompt_ids = _one(d.prefill.inputs, "token_ids", "prefill")
        self.prompt_mask = _one(d.prefill.inputs, "sequence_mask", "prefill")
        first = bundle.stages[0].segment
        self.token_ids = _one(first.inputs, "token_ids", first.key)
        self.positions = _one(first.inputs, "positions", first.key)
        self.past_mask = _one(first.inputs, "sequence_mask", first.key)
        self.exit_hidden = {k: _one(g.inputs, "hidden", g.key) for k, g in self.fills.items()}
        self.hidden_out = {s.index: s.segment.output("hidden").name for s in bundle.stages if s.exit is not None}
        self.eos, self.max_positions, self.num_layers = d.eos_id, d.max_positions, d.num_layers

    @staticmethod
    def kv(tensors: Sequence[Any], past: bool) -> list[tuple[int, str, str]]:
        """(layer, keys name, values name) of a graph's past (inputs) or new (outputs) entries."""
        roles = ("past_keys", "past_values") if past else ("new_keys", "new_values")
        keys = {t.layer: t.name for t in tensors if t.role == roles[0]}
        values = {t.layer: t.name for t in tensors if t.role == roles[1]}
        return [(layer, keys[layer], values[layer]) for layer in sorted(keys)]


class _Cache:
    def __init__(self, layers: int, capacity: int, width: int) -> None:
        self.keys = np.zeros((layers, 1, capacity, width), np.float32)
        self.values = np.zeros((layers, 1, capacity, width), np.float32)
        self.ones = np.ones((1, capacity), np.int64)
        self.length = 0

    def feed(self, state: dict[str, Any], names: list[tuple[int, str, str]]) -> None:
        for layer, k, v in names:
            state[k] = self.keys[layer, :, :self.length]
            state[v] = self.values[layer, :, :self.length]

    def store(self, out: dict[str, np.ndarray], names: list[tuple[int, str, str]], at: int) -> None:
        for layer, k, v in names:
            n = out[k].shape[1]
            self.keys[layer, :, at:at + n] = out[k]
            self.values[layer, :, at:at + n] = out[v]


def greedy_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                  thresholds: Sequence[float | None] | None = None, plan: DecodePlan | None = None) -> Decoded:
    """Decode one sample: ``image`` is the model input (1, C, H, W), ``prompt_ids`` starts with BOS."""
    plan = plan or DecodePlan(bundle)
    n_exits = len(bundle.exits)
    thresholds = list(bundle.thresholds if thresholds is None else thresholds)
    if len(thresholds) != n_exits:
        raise ConfigError(f"{len(thresholds)} thresholds for {n_exits} exits")
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    start = bundle.decoder.num_query_tokens + ids.shape[1]
    if max_new < 1 or start + max_new > plan.max_positions:
        raise InputError(f"a prompt of {ids.shape[1]} tokens and {max_new} new ones exceed the model's "
                         f"{plan.max_positions} positions (of which {bundle.decoder.num_query_tokens} hold the image)")
    state = backend.start({plan.image_input: np.ascontiguousarray(image, dtype=np.float32)})
    backend.run(plan.encode.key, state)
    state.update({plan.prompt_ids: ids, plan.prompt_mask: np.ones_like(ids)})
    backend.run(plan.prefill.key, state)
    out = backend.fetch(state, [t.name for t in plan.prefill.outputs])
    calls = 2
    width = out[plan.kv(plan.prefill.outputs, past=False)[0][1]].shape[-1]
    cache = _Cache(plan.num_layers, plan.max_positions, width)
    cache.store(out, plan.kv(plan.prefill.outputs, past=False), 0)
    cache.length = start
    conf_name, token_name = plan.prefill.decision
    token, conf = int(out[token_name][0]), float(out[conf_name][0])
    result = Decoded([token], [n_exits], [conf])
    while len(result.tokens) < max_new and token != plan.eos:
        at = cache.length
        state = backend.start({plan.token_ids: np.asarray([[token]], np.int64),
                               plan.positions: np.asarray([[at]], np.int64),
                               plan.past_mask: cache.ones[:, :at]})
        for stage in plan.stages:
            seg = stage.segment
            cache.feed(state, plan.kv(seg.inputs, past=True))
            backend.run(seg.key, state)
            calls += 1
            new = plan.kv(seg.outputs, past=False)
            cache.store(backend.fetch(state, [n for _, k, v in new for n in (k, v)]), new, at)
            if stage.exit is None:
                conf_name, token_name = seg.decision
                got = backend.fetch(state, [conf_name, token_name])
                token, conf = int(got[token_name][0, -1]), float(got[conf_name][0, -1])
                result.exits.append(n_exits)
                break
            if thresholds[stage.index] is None:
                continue
            head = stage.exit.graph
            cache.feed(state, plan.kv(head.inputs, past=True))
            backend.run(head.key, state)
            calls += 1
            conf_name, token_name = head.decision
            got = backend.fetch(state, [conf_name, token_name])
            conf = float(got[conf_name][0, -1])
            if conf >= thresholds[stage.index]:
                token = int(got[token_name][0, -1])
                hidden = backend.fetch(state, [plan.hidden_out[stage.index]])[plan.hidden_out[stage.index]]
                for k in range(stage.index + 1, len(plan.stages)):
                    fill = plan.fills[k]
                    fstate = backend.start({plan.exit_hidden[k]: hidden})
                    backend.run(fill.key, fstate)
                    calls += 1
                    new = plan.kv(fill.outputs, past=False)
                    cache.store(backend.fetch(fstate, [n for _, k2, v in new for n in (k2, v)]), new, at)
                result.exits.append(stage.index)
                break
        cache.length = at + 1
        result.tokens.append(token)
        result.confidences.append(conf)
    result.calls = calls
    return result
