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

__all__ = ["Decoded", "DecodePlan", "greedy_decode", "full_decode", "speculative_decode"]


@dataclass
class Decoded:
    tokens: list[int]
    exits: list[int] = field(default_factory=list)  # per token: the exit that emitted it; len(exits) = final head
    confidences: list[float] = field(default_factory=list)
    calls: int = 0  # graph calls made, encode and prefill included


def _one(tensors: Sequence[Any], role: str, where: str) -> str:
    found = [t for t in tensors if t.role == role]
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
        # per graph, once: the (layer, keys, values) names it reads and writes, and the names to fetch
        self.past = {g.key: self.kv(g.inputs, past=True) for g in bundle.graphs}
        self.new = {g.key: self.kv(g.outputs, past=False) for g in bundle.graphs}
        self.new_names = {key: [n for _, k, v in kvs for n in (k, v)] for key, kvs in self.new.items()}

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


def _prefill(backend: Any, bundle: Bundle, plan: DecodePlan, image: np.ndarray, prompt_ids: Sequence[int],
             max_new: int) -> tuple[_Cache, int, float, int]:
    """encode + prefill: the cache filled for the prompt, the first token (final head), its confidence,
    and the calls made."""
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    start = bundle.decoder.num_query_tokens + ids.shape[1]
    if ids.shape[1] < 1 or max_new < 1 or start + max_new > plan.max_positions:
        raise InputError(f"a prompt of {ids.shape[1]} tokens and {max_new} new ones exceed the model's "
                         f"{plan.max_positions} positions (of which {bundle.decoder.num_query_tokens} hold the image)")
    state = backend.start({plan.image_input: np.ascontiguousarray(image, dtype=np.float32)})
    backend.run(plan.encode.key, state)
    state.update({plan.prompt_ids: ids, plan.prompt_mask: np.ones_like(ids)})
    backend.run(plan.prefill.key, state)
    out = backend.fetch(state, [t.name for t in plan.prefill.outputs])
    new = plan.new[plan.prefill.key]
    cache = _Cache(plan.num_layers, plan.max_positions, out[new[0][1]].shape[-1])
    cache.store(out, new, 0)
    cache.length = start
    conf_name, token_name = plan.prefill.decision
    return cache, int(out[token_name][0]), float(out[conf_name][0]), 2


def _step_state(backend: Any, plan: DecodePlan, cache: _Cache, tokens: Sequence[int]) -> dict[str, Any]:
    """The first stage's inputs for ``tokens`` placed after the cache's current length."""
    at, n = cache.length, len(tokens)
    return backend.start({plan.token_ids: np.asarray([list(tokens)], np.int64),
                          plan.positions: np.arange(at, at + n, dtype=np.int64)[None, :],
                          plan.past_mask: cache.ones[:, :at]})


def _run_stage(backend: Any, plan: DecodePlan, cache: _Cache, state: dict[str, Any], graph: GraphSpec) -> None:
    """One decode-step graph: its layers' past in, its new keys and values written at the cache's end."""
    cache.feed(state, plan.past[graph.key])
    backend.run(graph.key, state)
    cache.store(backend.fetch(state, plan.new_names[graph.key]), plan.new[graph.key], cache.length)


def _exit_decision(backend: Any, plan: DecodePlan, cache: _Cache, state: dict[str, Any], head: GraphSpec) -> tuple[int, float]:
    cache.feed(state, plan.past[head.key])
    backend.run(head.key, state)
    conf_name, token_name = head.decision
    got = backend.fetch(state, [conf_name, token_name])
    return int(got[token_name][0, -1]), float(got[conf_name][0, -1])


def _fill(backend: Any, plan: DecodePlan, cache: _Cache, state: dict[str, Any], after: int, upto: int) -> int:
    """State propagation from the exit after stage ``after``: stages ``after + 1 .. upto - 1``."""
    name = plan.hidden_out[after]
    hidden = backend.fetch(state, [name])[name]
    for k in range(after + 1, upto):
        fill = plan.fills[k]
        fstate = backend.start({plan.exit_hidden[k]: hidden})
        backend.run(fill.key, fstate)
        cache.store(backend.fetch(fstate, plan.new_names[fill.key]), plan.new[fill.key], cache.length)
    return max(0, upto - after - 1)


def greedy_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                  thresholds: Sequence[float | None] | None = None, plan: DecodePlan | None = None) -> Decoded:
    """Decode one sample: ``image`` is the model input (1, C, H, W), ``prompt_ids`` starts with BOS."""
    plan = plan or DecodePlan(bundle)
    n_exits = len(bundle.exits)
    thresholds = list(bundle.thresholds if thresholds is None else thresholds)
    if len(thresholds) != n_exits:
        raise ConfigError(f"{len(thresholds)} thresholds for {n_exits} exits")
    cache, token, conf, calls = _prefill(backend, bundle, plan, image, prompt_ids, max_new)
    result = Decoded([token], [n_exits], [conf])
    while len(result.tokens) < max_new and token != plan.eos:
        state = _step_state(backend, plan, cache, [token])
        for stage in plan.stages:
            _run_stage(backend, plan, cache, state, stage.segment)
            calls += 1
            if stage.exit is None:
                conf_name, token_name = stage.segment.decision
                got = backend.fetch(state, [conf_name, token_name])
                token, conf = int(got[token_name][0, -1]), float(got[conf_name][0, -1])
                result.exits.append(n_exits)
                break
            if thresholds[stage.index] is None:
                continue
            candidate, conf = _exit_decision(backend, plan, cache, state, stage.exit.graph)
            calls += 1
            if conf >= thresholds[stage.index]:
                token = candidate
                calls += _fill(backend, plan, cache, state, stage.index, len(plan.stages))
                result.exits.append(stage.index)
                break
        cache.length += 1
        result.tokens.append(token)
        result.confidences.append(conf)
    result.calls = calls
    return result


def full_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                plan: DecodePlan | None = None) -> Decoded:
    """The baseline: greedy decoding with the monolithic decode step (``full_step``) and the same cache."""
    plan = plan or DecodePlan(bundle)
    n_exits = len(bundle.exits)
    cache, token, conf, calls = _prefill(backend, bundle, plan, image, prompt_ids, max_new)
    result = Decoded([token], [n_exits], [conf])
    full = bundle.full
    while len(result.tokens) < max_new and token != plan.eos:
        state = _step_state(backend, plan, cache, [token])
        _run_stage(backend, plan, cache, state, full)
        calls += 1
        conf_name, token_name = full.decision
        got = backend.fetch(state, [conf_name, token_name])
        token, conf = int(got[token_name][0, -1]), float(got[conf_name][0, -1])
        cache.length += 1
        result.tokens.append(token)
        result.exits.append(n_exits)
        result.confidences.append(conf)
    result.calls = calls
    return result


def speculative_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                       draft_exit: int = 0, draft_len: int = 4, plan: DecodePlan | None = None) -> Decoded:
    """Lossless self-speculation: exit ``draft_exit`` drafts up to ``draft_len`` tokens (the stages up to
    it, and the fill of the layer its next draft reads), then ``full_step`` checks the last token and
    every draft in one call; the drafts that match the full model's own greedy tokens are kept, with
    the full model's next token after them. The text is the full model's greedy text.

    ``Decoded.exits`` marks each token's source: the draft exit's index for an accepted draft, the
    number of exits (the final head) for a token the full model wrote."""
    plan = plan or DecodePlan(bundle)
    n_exits = len(bundle.exits)
    if not 0 <= draft_exit < n_exits or draft_len < 1:
        raise ConfigError(f"draft exit must be 0..{n_exits - 1} and draft length 1 or more, "
                          f"got {draft_exit} and {draft_len}")
    cache, token, conf, calls = _prefill(backend, bundle, plan, image, prompt_ids, max_new)
    result = Decoded([token], [n_exits], [conf])
    stages = plan.stages[:draft_exit + 1]
    full = bundle.full
    while len(result.tokens) < max_new and token != plan.eos:
        start = cache.length
        room = min(draft_len, max_new - len(result.tokens) - 1, plan.max_positions - start - 2)
        drafts: list[int] = []
        last = token
        while len(drafts) < room:  # draft: the stages up to the exit, then the layer it reads, filled
            state = _step_state(backend, plan, cache, [last])
            for stage in stages:
                _run_stage(backend, plan, cache, state, stage.segment)
            last, _ = _exit_decision(backend, plan, cache, state, stages[-1].exit.graph)
            calls += len(stages) + 1 + _fill(backend, plan, cache, state, draft_exit, draft_exit + 2)
            cache.length += 1
            drafts.append(last)
            if last == plan.eos:
                break
        cache.length = start  # verify: the full model over the last token and every draft, in one call
        state = _step_state(backend, plan, cache, [token, *drafts])
        _run_stage(backend, plan, cache, state, full)
        calls += 1
        conf_name, token_name = full.decision
        got = backend.fetch(state, [conf_name, token_name])
        verified, confs = got[token_name][0].tolist(), got[conf_name][0].tolist()
        m = 0
        while m < len(drafts) and drafts[m] == verified[m] and drafts[m] != plan.eos:
            m += 1
        accepted = drafts[:m] + [verified[m]]
        if m < len(drafts) and drafts[m] == plan.eos and verified[m] == plan.eos:
            accepted = drafts[:m + 1]
        for i, t in enumerate(accepted):
            if len(result.tokens) >= max_new:
                break
            result.tokens.append(int(t))
            result.exits.append(draft_exit if i < m else n_exits)
            result.confidences.append(float(confs[i]))
            if t == plan.eos:
                break
        cache.length = start + len(accepted)  # the keys and values of the last token, the accepted drafts
        token = result.tokens[-1]
    result.calls = calls
    return result
