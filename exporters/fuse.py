"""One graph per stage: a segment and its exit head fused (``stage2onnx``), and the identity graph
that measures what a call costs by itself (``identity2onnx``).

The fused graph reads what the segment reads and writes what both write: the carried hidden state
(and token mask) for the next segment, and the exit's logits, confidence and prediction. Nothing is
recomputed: the head's nodes read the segment's output tensor inside the one graph. The head's
internal names are prefixed so that they cannot collide with the segment's; inputs both graphs
read (a text model's ``attention_mask``) stay one input.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

__all__ = ["stage2onnx", "identity2onnx"]


def stage2onnx(segment: Path, head: Path, out: Path) -> Path:
    """Fuse ``segment`` and the exit ``head`` that reads its output into one ONNX file at ``out``."""
    seg, ex = onnx.load(str(segment)), onnx.load(str(head))
    if {o.domain or "": o.version for o in seg.opset_import} != {o.domain or "": o.version for o in ex.opset_import}:
        raise ValueError(f"{segment.name} and {head.name} use different opsets")
    seg_out = {o.name for o in seg.graph.output}
    seg_in = {i.name for i in seg.graph.input}
    shared = {i.name for i in ex.graph.input if i.name in seg_out | seg_in}
    if not shared & seg_out:
        raise ValueError(f"{head.name} reads none of {segment.name}'s outputs")
    keep = shared | {o.name for o in ex.graph.output}  # the head's interface keeps its names
    internal = {n for node in ex.graph.node for n in (*node.input, *node.output)} | \
        {t.name for t in ex.graph.initializer}
    renames = {n: f"exit/{n}" for n in internal - keep if n}
    g2 = _renamed(ex.graph, renames)
    graph = helper.make_graph(
        [*seg.graph.node, *g2.node], f"{segment.stem}+{head.stem}",
        [*seg.graph.input, *(i for i in g2.input if i.name not in shared)],
        [*seg.graph.output, *g2.output],
        [*seg.graph.initializer, *g2.initializer],
        value_info=[*seg.graph.value_info, *g2.value_info])
    model = helper.make_model(graph, opset_imports=list(seg.opset_import), producer_name="freedeploy")
    model.ir_version = seg.ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def _renamed(graph: onnx.GraphProto, names: dict[str, str]) -> onnx.GraphProto:
    """A copy of ``graph`` with its tensors and nodes renamed (``names``: old -> new tensor name)."""
    g = onnx.GraphProto()
    g.CopyFrom(graph)
    for node in g.node:
        node.name = f"exit/{node.name}" if node.name else node.name
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for t in (*g.initializer, *g.value_info):
        t.name = names.get(t.name, t.name)
    return g


def identity2onnx(name: str, dtype: int, shape: list, out: Path, opset: int = 20) -> Path:
    """A graph that only copies its input: what calling ONNX Runtime costs before any work."""
    x = helper.make_tensor_value_info(name, dtype, shape)
    y = helper.make_tensor_value_info(f"{name}_copy", dtype, shape)
    graph = helper.make_graph([helper.make_node("Identity", [name], [f"{name}_copy"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="freedeploy")
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out
