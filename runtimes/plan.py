"""The one builder of bundle plans: the exporter, the scripted fake backend and the TensorRT test
fakes all lay out and assemble bundles here, so a fake cannot drift from the real format.

Two steps, because the exporter has to name its torch modules' inputs and outputs before it knows
their dtypes and shapes::

    layout = classifier_layout(model_inputs=("pixel_values",), exits=(2, 4), num_blocks=8)
    for g in layout:                     # chain order, then the monolithic graph
        io[g.key] = export(g.key, [n for n, _ in g.inputs], [n for n, _ in g.outputs])  # TensorSpecs
    bundle = classifier_bundle(layout, io, name=..., labels=..., ...)

``classifier_bundle`` gives every tensor its role, every graph its key, kind and files, and
checks that what was exported is what the layout asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from runtimes import naming
from runtimes.bundle import (BatchSpec, Bundle, ClassifierHead, DecoderHead, ExitSpec, GraphSpec, StageSpec,
                             TensorSpec)
from runtimes.errors import BundleError
from runtimes.preprocess import Spec
from runtimes.roles import EXIT_DECISION, FINAL_DECISION

__all__ = ["GraphLayout", "classifier_layout", "classifier_bundle", "segment_bounds", "decoder_layout",
           "decoder_bundle"]


@dataclass(frozen=True)
class GraphLayout:
    key: str
    kind: str  # one of runtimes.roles.GRAPH_KINDS
    inputs: tuple[tuple[str, str], ...]  # (tensor name, role), in the graph's argument order
    outputs: tuple[tuple[str, str], ...]
    stage: int | None = None  # chain position of a segment or exit; None for the full graph
    blocks: tuple[int, int] | None = None  # a segment's 0-based half-open block range
    layers: Mapping[str, int] | None = None  # a decoder's key/value tensors: name -> 0-based layer
    mask_stage: int | None = None  # a decode graph: the stage whose past mask its sequence_mask input is

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.outputs)


def segment_bounds(exits: Sequence[int], num_blocks: int) -> list[tuple[int, int]]:
    """0-based half-open block ranges ``[start, end)`` of each segment, one more than there are exits."""
    cuts = [0, *exits, num_blocks]
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise BundleError(f"exit blocks {list(exits)} must be increasing, between 1 and {num_blocks - 1}")
    return list(zip(cuts[:-1], cuts[1:]))


def classifier_layout(model_inputs: Sequence[str], exits: Sequence[int], num_blocks: int,
                      mask: str | None = None) -> tuple[GraphLayout, ...]:
    """Every graph of an early-exit classifier, in chain order, then ``full``.

    ``mask``: the (B, T) token mask every graph after the embeddings reads; a model input (text),
    or computed and written by ``segment_0`` when it is not one (an image with a question)."""
    bounds = segment_bounds(exits, num_blocks)
    given = tuple((n, "model_input") for n in model_inputs)
    carried = () if mask is None else ((mask, "model_input" if mask in model_inputs else "token_mask"),)
    emits = bool(carried) and carried[0][1] == "token_mask"
    final = tuple(zip(naming.FINAL_DECISION, FINAL_DECISION))
    out: list[GraphLayout] = []
    for k, blocks in enumerate(bounds):
        ins = given if k == 0 else ((naming.hidden_name(exits[k - 1]), "hidden"), *carried)
        if k == len(exits):
            out.append(GraphLayout(naming.segment_key(k), "segment", ins, final, k, blocks))
            break
        hidden = (naming.hidden_name(exits[k]), "hidden")
        outs = (hidden, *carried) if emits and k == 0 else (hidden,)
        out.append(GraphLayout(naming.segment_key(k), "segment", ins, outs, k, blocks))
        out.append(GraphLayout(naming.exit_key(k), "exit", (hidden, *carried),
                               tuple(zip(naming.exit_decision(k), EXIT_DECISION)), k))
    out.append(GraphLayout(naming.FULL, "full", given, final))
    return tuple(out)


def _graph(g: GraphLayout, io: Mapping[str, tuple[Sequence[TensorSpec], Sequence[TensorSpec]]],
           precisions: Sequence[str]) -> GraphSpec:
    if g.key not in io:
        raise BundleError(f"no exported inputs and outputs for graph {g.key}")
    specs = []
    for side, want, got in (("inputs", g.inputs, io[g.key][0]), ("outputs", g.outputs, io[g.key][1])):
        names = [t.name for t in got]
        if names != [n for n, _ in want]:
            raise BundleError(f"{g.key} was exported with {side} {names}, its layout says {[n for n, _ in want]}")
        layers = g.layers or {}
        specs.append(tuple(replace(t, role=role, layer=layers.get(t.name),
                                   stage=g.mask_stage if role == "sequence_mask" else None)
                           for t, (_, role) in zip(got, want)))
    return GraphSpec(g.key, g.kind, {p: naming.onnx_file(g.key, p) for p in precisions}, specs[0], specs[1])


def _stages(segments: Sequence[GraphLayout], graphs: Mapping[str, GraphSpec], confidence: str, head: str,
            thresholds: Sequence[float | None] | None, head_costs: Sequence[float] | None) -> tuple[StageSpec, ...]:
    """The chain: each segment (a decoder's decode step) with the exit after it, but the last."""
    n_exits = len(segments) - 1
    thresholds = list(thresholds) if thresholds is not None else [None] * n_exits
    costs = list(head_costs) if head_costs is not None else [1.0] * n_exits
    if len(thresholds) != n_exits or len(costs) != n_exits:
        raise BundleError(f"{n_exits} exits need {n_exits} thresholds and head costs, got {len(thresholds)} and "
                          f"{len(costs)}")
    stages = []
    for g in segments:
        k = g.stage
        exit_spec = None
        if k < n_exits:
            exit_spec = ExitSpec(g.blocks[1], graphs[naming.exit_key(k)], confidence, thresholds[k], head, costs[k])
        stages.append(StageSpec(k, g.blocks, graphs[g.key], exit_spec))
    return tuple(stages)


def classifier_bundle(layout: Sequence[GraphLayout], io: Mapping[str, tuple[Sequence[TensorSpec], Sequence[TensorSpec]]],
                      *, name: str, labels: Sequence[str], preprocess: Spec, num_blocks: int, batch: BatchSpec,
                      confidence: str = "max_softmax", head: str = "full-block",
                      head_costs: Sequence[float] | None = None, thresholds: Sequence[float | None] | None = None,
                      precisions: Sequence[str] = ("fp32",), files: Mapping[str, str] | None = None,
                      provenance: Mapping[str, Any] | None = None) -> Bundle:
    """A bundle from a layout and the specs of the graphs written for it (``io[key] = (inputs, outputs)``)."""
    graphs = {g.key: _graph(g, io, precisions) for g in layout}
    stages = _stages([g for g in layout if g.kind == "segment"], graphs, confidence, head, thresholds, head_costs)
    full = graphs[naming.FULL]
    return Bundle(name=name, head=ClassifierHead(tuple(labels)), preprocess=preprocess, inputs=full.inputs, batch=batch,
                  stages=stages, full=full, num_blocks=num_blocks, files=dict(files or {}),
                  provenance=dict(provenance or {}))



def _kv(layers: Sequence[int], past: bool) -> tuple[tuple[tuple[str, str], ...], dict[str, int]]:
    """(name, role) pairs of the keys and values of ``layers``, going in (past) or coming out (new)."""
    pairs, index = [], {}
    for layer in layers:
        names = naming.past_kv(layer) if past else naming.new_kv(layer)
        roles = ("past_keys", "past_values") if past else ("new_keys", "new_values")
        pairs += list(zip(names, roles))
        index.update({n: layer for n in names})
    return tuple(pairs), index


def decoder_layout(image_input: str, exits: Sequence[int], num_blocks: int) -> tuple[GraphLayout, ...]:
    """Every graph of an early-exit decoder: encode, prefill, then per stage its decode step, exit and
    state fill, then the monolithic decode step ``full_step``."""
    bounds = segment_bounds(exits, num_blocks)
    every = range(num_blocks)
    step_in = ((naming.TOKEN_IDS, "token_ids"), (naming.POSITIONS, "positions"))
    mask = ((naming.PAST_MASK, "sequence_mask"),)
    final = tuple(zip(naming.FINAL_DECISION, FINAL_DECISION))
    new_all, new_index = _kv(every, past=False)
    past_all, past_index = _kv(every, past=True)
    out = [GraphLayout(naming.ENCODE, "encode", ((image_input, "model_input"),), ((naming.PREFIX, "prefix"),)),
           GraphLayout(naming.PREFILL, "prefill", ((naming.PREFIX, "prefix"), (naming.PROMPT_IDS, "token_ids"),
                                                    (naming.PROMPT_MASK, "sequence_mask")),
                       (*zip(naming.FIRST_DECISION, FINAL_DECISION), *new_all), layers=new_index)]
    fills = []
    for k, (lo, hi) in enumerate(bounds):
        past, pidx = _kv(range(lo, hi), past=True)
        new, nidx = _kv(range(lo, hi), past=False)
        ins = step_in if k == 0 else ((naming.hidden_name(exits[k - 1]), "hidden"),)
        last = k == len(exits)
        outs = final if last else ((naming.hidden_name(exits[k]), "hidden"),)
        out.append(GraphLayout(naming.step_key(k), "decode_step", (*ins, *mask, *past), (*outs, *new), k, (lo, hi),
                               {**pidx, **nidx}, mask_stage=k))
        if not last:
            shared, sidx = _kv((exits[k],), past=True)  # the exit reads the next layer's cache
            out.append(GraphLayout(naming.exit_key(k), "exit", ((naming.hidden_name(exits[k]), "hidden"), *mask, *shared),
                                   tuple(zip(naming.exit_decision(k), EXIT_DECISION)), k, layers=sidx,
                                   mask_stage=k + 1))  # it reads the next stage's first layer's cache
        if k > 0:
            fills.append(GraphLayout(naming.fill_key(k), "state_fill", ((naming.EXIT_HIDDEN, "hidden"),), new, k,
                                     (lo, hi), nidx))
    out += fills
    out.append(GraphLayout(naming.FULL_STEP, "decode_step", (*step_in, *mask, *past_all), (*final, *new_all),
                           layers={**past_index, **new_index}, mask_stage=0))
    return tuple(out)


def decoder_bundle(layout: Sequence[GraphLayout], io: Mapping[str, tuple[Sequence[TensorSpec], Sequence[TensorSpec]]],
                   *, name: str, preprocess: Spec, num_blocks: int, batch: BatchSpec, tokens: Mapping[str, int],
                   tokenizer_file: str, num_query_tokens: int, max_positions: int,
                   confidence: str = "max_softmax", thresholds: Sequence[float | None] | None = None,
                   head_costs: Sequence[float] | None = None, precisions: Sequence[str] = ("fp32",),
                   files: Mapping[str, str] | None = None, provenance: Mapping[str, Any] | None = None) -> Bundle:
    """A generative bundle (task ``generate``) from a decoder layout and the specs of its graphs;
    ``tokens`` holds bos, eos, pad and vocab_size."""
    graphs = {g.key: _graph(g, io, precisions) for g in layout}
    steps = [g for g in layout if g.kind == "decode_step" and g.stage is not None]
    stages = _stages(steps, graphs, confidence, "full-block", thresholds, head_costs)
    head = DecoderHead(encode=graphs[naming.ENCODE], prefill=graphs[naming.PREFILL],
                       fills=tuple(graphs[naming.fill_key(k)] for k in range(1, len(steps))),
                       tokenizer_file=tokenizer_file, bos_id=int(tokens["bos"]), eos_id=int(tokens["eos"]),
                       pad_id=int(tokens["pad"]), vocab_size=int(tokens["vocab_size"]), num_layers=num_blocks,
                       num_query_tokens=num_query_tokens, max_positions=max_positions)
    return Bundle(name=name, head=head, preprocess=preprocess, inputs=head.encode.inputs, batch=batch,
                  stages=stages, full=graphs[naming.FULL_STEP], num_blocks=num_blocks, files=dict(files or {}),
                  provenance=dict(provenance or {}))
