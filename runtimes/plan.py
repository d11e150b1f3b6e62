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
from runtimes.bundle import EXIT_DECISION, FINAL_DECISION, BatchSpec, Bundle, ExitSpec, GraphSpec, StageSpec, TensorSpec
from runtimes.errors import BundleError
from runtimes.preprocess import Spec

__all__ = ["GraphLayout", "classifier_layout", "classifier_bundle", "segment_bounds"]


@dataclass(frozen=True)
class GraphLayout:
    key: str
    kind: str  # segment, exit or full
    inputs: tuple[tuple[str, str], ...]  # (tensor name, role), in the graph's argument order
    outputs: tuple[tuple[str, str], ...]
    stage: int | None = None  # chain position of a segment or exit; None for the full graph
    blocks: tuple[int, int] | None = None  # a segment's 0-based half-open block range

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
        specs.append(tuple(replace(t, role=role) for t, (_, role) in zip(got, want)))
    return GraphSpec(g.key, g.kind, {p: naming.onnx_file(g.key, p) for p in precisions}, specs[0], specs[1])


def classifier_bundle(layout: Sequence[GraphLayout], io: Mapping[str, tuple[Sequence[TensorSpec], Sequence[TensorSpec]]],
                      *, name: str, labels: Sequence[str], preprocess: Spec, num_blocks: int, batch: BatchSpec,
                      confidence: str = "max_softmax", head: str = "full-block",
                      head_costs: Sequence[float] | None = None, thresholds: Sequence[float | None] | None = None,
                      precisions: Sequence[str] = ("fp32",), files: Mapping[str, str] | None = None,
                      provenance: Mapping[str, Any] | None = None) -> Bundle:
    """A bundle from a layout and the specs of the graphs written for it (``io[key] = (inputs, outputs)``)."""
    graphs = {g.key: _graph(g, io, precisions) for g in layout}
    segments = [g for g in layout if g.kind == "segment"]
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
    full = graphs[naming.FULL]
    return Bundle(name=name, labels=tuple(labels), preprocess=preprocess, inputs=full.inputs, batch=batch,
                  stages=tuple(stages), full=full, num_blocks=num_blocks, files=dict(files or {}),
                  provenance=dict(provenance or {}))

