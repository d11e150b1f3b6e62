"""The rules a bundle's plan must satisfy, checked at load so that nothing inconsistent surfaces
later as a traceback or, worse, as a silently wrong answer.

``check_bundle``: the manifest against itself (chain shape, block ranges, roles, dataflow, one
layout per tensor name, labels against the class count, preprocessing against the model inputs,
certificates against the exits). ``check_graph_files``: the manifest against each ONNX file's
actual inputs and outputs (names, element types, ranks, fixed sizes, the dynamic batch axis).
Every problem is one ``BundleError`` naming the field or file.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from runtimes.errors import BundleError, FreedeployError
from runtimes.onnx_io import read_graph_io
from runtimes.preprocess import ImageSpec, ImageTextSpec, TextSpec
from runtimes.roles import EXIT_DECISION, FINAL_DECISION, decision_field

if TYPE_CHECKING:
    from runtimes.bundle import Bundle, DecoderHead, GraphSpec, TensorSpec

__all__ = ["check_bundle", "check_graph_files"]

_Error = type[FreedeployError]


def check_bundle(b: "Bundle", where: str, error: _Error = BundleError) -> None:
    """The one place that asks what a bundle's head is: a classifier's or a decoder's rules follow."""
    w = where.rstrip(":")
    generative = b.head.task == "generate"
    _check_chain(b, w, error)
    if generative:
        _check_decoder(b, b.head, w, error)
    else:
        _check_tensors(b, w, error)
        _check_decisions(b, len(b.head.labels), w, error)
    _check_preprocess(b, w, error)
    for key, cert in (b.calibration or {}).items():
        if cert.key != key:
            raise error(f"{w}: calibration.{key} holds a certificate for {cert.key!r}")
        if len(cert.thresholds) != len(b.exits):
            raise error(f"{w}: calibration.{key} has {len(cert.thresholds)} thresholds for {len(b.exits)} exits")
        if cert.speculative is not None:
            block = cert.speculative.draft_block
            if block not in [e.block for e in b.exits]:
                raise error(f"{w}: calibration.{key}.speculative drafts from block {block}, which has no exit")
            if not generative:
                raise error(f"{w}: calibration.{key}.speculative applies to generative bundles only")


def _check_chain(b: "Bundle", w: str, error: _Error) -> None:
    if b.num_blocks < 2:
        raise error(f"{w}: 'num_blocks' must be at least 2 (a segment before and after an exit), found {b.num_blocks}")
    if len(b.stages) < 2 or b.stages[-1].exit is not None or any(s.exit is None for s in b.stages[:-1]):
        raise error(f"{w}: stages must be two or more, each with an exit except the last")
    if [s.index for s in b.stages] != list(range(len(b.stages))):
        raise error(f"{w}: stage indices must be 0, 1, 2, ... in order")
    start = 0
    for s in b.stages:
        lo, hi = s.blocks
        if lo != start or not lo < hi <= b.num_blocks:
            raise error(f"{w}: stages[{s.index}].blocks {list(s.blocks)} must continue at block {start} and end "
                        f"after it, within the depth {b.num_blocks}")
        start = hi
        if s.exit is not None and s.exit.block != hi:
            raise error(f"{w}: stages[{s.index}].exit reads block {s.exit.block}, but its segment ends at block {hi}"
                        " (exit blocks must be sorted, unique and inside the depth)")
    if start != b.num_blocks:
        raise error(f"{w}: the stages end at block {start}, the model has {b.num_blocks} blocks")
    generative = b.head.task == "generate"
    step = "decode_step" if generative else None
    kinds = [(s.segment, step or "segment", f"stages[{s.index}].segment") for s in b.stages]
    kinds += [(s.exit.graph, "exit", f"stages[{s.index}].exit.graph") for s in b.stages if s.exit]
    kinds.append((b.full, step or "full", "full"))
    if generative:
        d = b.head
        kinds += [(d.encode, "encode", "head.encode"), (d.prefill, "prefill", "head.prefill")]
        kinds += [(g, "state_fill", f"head.fills[{i}]") for i, g in enumerate(d.fills)]
    for graph, kind, at in kinds:
        if graph.kind != kind:
            raise error(f"{w}: {at} must be a graph of kind {kind!r}, found {graph.kind!r}")
    keys = [g.key for g in b.graphs]
    if len(set(keys)) != len(keys):
        raise error(f"{w}: graph keys must be unique, found {', '.join(keys)}")
    precisions = {tuple(sorted(g.files)) for g in b.graphs}
    if len(precisions) != 1:
        raise error(f"{w}: every graph needs the same precisions, found {sorted(precisions)}")


def _roles(g: "GraphSpec", side: str) -> list[str]:
    return [t.role for t in (g.inputs if side == "in" else g.outputs)]


def _check_tensors(b: "Bundle", w: str, error: _Error) -> None:
    model = {t.name: t for t in b.inputs}
    if not model or any(t.role != "model_input" for t in b.inputs):
        raise error(f"{w}: 'inputs' must list the model inputs, each with role 'model_input'")
    seen: dict[str, tuple] = {t.name: (t.dtype, t.shape, t.role) for t in b.inputs}
    available = set(model)
    for g in b.graphs:
        for t in (*g.inputs, *g.outputs):
            if not t.role:
                raise error(f"{w}: tensor {t.name} of graph {g.key} has no role")
            if not t.shape or t.shape[0] != "batch":
                raise error(f"{w}: tensor {t.name} of graph {g.key} must have 'batch' as its first axis, "
                            f"found shape {list(t.shape)}")
            if seen.setdefault(t.name, (t.dtype, t.shape, t.role)) != (t.dtype, t.shape, t.role):
                raise error(f"{w}: tensor {t.name} is declared with two different dtypes, shapes or roles "
                            f"(graph {g.key})")
        pool = set(model) if g.kind == "full" else available
        missing = [t.name for t in g.inputs if t.name not in pool]
        if missing:
            raise error(f"{w}: graph {g.key} reads {missing}, which no model input or earlier graph provides")
        if g.kind != "full":
            available |= {t.name for t in g.outputs}
    for s in b.stages:
        final = s.exit is None
        want = list(FINAL_DECISION) if final else ["hidden"]
        got = [r for r in _roles(s.segment, "out") if r != "token_mask"]
        if got != want:
            raise error(f"{w}: stages[{s.index}].segment must output roles {want} (and optionally a token_mask), "
                        f"found {got}")
        if s.exit is not None:
            if _roles(s.exit.graph, "out") != list(EXIT_DECISION):
                raise error(f"{w}: stages[{s.index}].exit.graph must output exit logits, confidence and prediction")
            hidden = s.segment.output("hidden").name
            if hidden not in [t.name for t in s.exit.graph.inputs]:
                raise error(f"{w}: stages[{s.index}].exit.graph does not read {hidden}, its segment's output")
    if _roles(b.full, "out") != list(FINAL_DECISION):
        raise error(f"{w}: 'full' must output the final logits, confidence and prediction")


def _kv_layers(g: "GraphSpec", side: str, role: str) -> list[int]:
    return sorted(t.layer for t in (g.inputs if side == "in" else g.outputs) if t.role == role)


def _check_decoder(b: "Bundle", d: "DecoderHead", w: str, error: _Error) -> None:
    """A generative plan: each graph reads and writes the keys and values of exactly its layers, every
    tensor name means one tensor, each graph's other inputs come from the caller, the loop or an
    earlier graph, and each decode graph's past mask is a stage's."""
    if d.num_layers != b.num_blocks:
        raise error(f"{w}: head.num_layers is {d.num_layers}, the chain covers {b.num_blocks} blocks")
    if d.tokenizer_file not in b.files:
        raise error(f"{w}: head.tokenizer_file {d.tokenizer_file!r:.80} is not one of the bundle's files")
    if len(d.fills) != len(b.stages) - 1:
        raise error(f"{w}: head.fills must hold one state fill per stage after the first "
                    f"({len(b.stages) - 1}), found {len(d.fills)}")
    seen: dict[str, tuple] = {t.name: (t.dtype, t.shape, t.role, t.layer) for t in b.inputs}
    for g in b.graphs:
        for t in (*g.inputs, *g.outputs):
            if not t.shape or t.shape[0] != "batch":
                raise error(f"{w}: tensor {t.name} of graph {g.key} must have 'batch' as its first axis")
            if seen.setdefault(t.name, (t.dtype, t.shape, t.role, t.layer)) != (t.dtype, t.shape, t.role, t.layer):
                raise error(f"{w}: tensor {t.name} is declared with two different dtypes, shapes, roles or layers "
                            f"(graph {g.key})")
            if t.layer is not None and t.layer >= d.num_layers:
                raise error(f"{w}: tensor {t.name} of graph {g.key} names layer {t.layer} of {d.num_layers}")
    every = list(range(d.num_layers))

    def expect(g: "GraphSpec", side: str, role: str, layers: list[int], at: str) -> None:
        if _kv_layers(g, side, role) != layers:
            raise error(f"{w}: {at} must {'read' if side == 'in' else 'write'} {role} of layers {layers}, "
                        f"found {_kv_layers(g, side, role)}")

    for role in ("new_keys", "new_values"):
        expect(d.prefill, "out", role, every, "head.prefill")
        expect(b.full, "out", role, every, "full")
    for role in ("past_keys", "past_values"):
        expect(b.full, "in", role, every, "full")
    for s in b.stages:
        mine = list(range(*s.blocks))
        for role in ("past_keys", "past_values", "new_keys", "new_values"):
            expect(s.segment, "in" if role.startswith("past") else "out", role, mine, f"stages[{s.index}].segment")
        if s.index > 0:
            for role in ("new_keys", "new_values"):
                expect(d.fills[s.index - 1], "out", role, mine, f"head.fills[{s.index - 1}]")
        if s.exit is not None:  # the exit attends over the cache of the layer that runs next
            for role in ("past_keys", "past_values"):
                expect(s.exit.graph, "in", role, [s.exit.block], f"stages[{s.index}].exit.graph")
            if _roles(s.exit.graph, "out") != list(EXIT_DECISION):
                raise error(f"{w}: stages[{s.index}].exit.graph must output exit logits, confidence and prediction")
            if [r for r in _roles(s.segment, "out") if r not in ("new_keys", "new_values")] != ["hidden"]:
                raise error(f"{w}: stages[{s.index}].segment must output the hidden state and its layers' keys "
                            "and values")
        elif [r for r in _roles(s.segment, "out") if r not in ("new_keys", "new_values")] != list(FINAL_DECISION):
            raise error(f"{w}: the last stage's segment must output the final decision and its layers' keys and values")
    for g, at in ((b.full, "full"), (d.prefill, "head.prefill")):
        if [r for r in _roles(g, "out") if r not in ("new_keys", "new_values")] != list(FINAL_DECISION):
            raise error(f"{w}: {at} must output the final decision and every layer's keys and values")
    if _roles(d.encode, "out") != ["prefix"] or "prefix" not in _roles(d.prefill, "in"):
        raise error(f"{w}: head.encode must output the image prefix, and head.prefill read it")
    _check_mask_stages(b, d, w, error)


def _check_mask_stages(b: "Bundle", d: "DecoderHead", w: str, error: _Error) -> None:
    """Each decode graph reads the past mask of the stage whose cache it reads: a segment its own, an exit
    the next stage's (the layer it shares), the monolithic step the first; no other graph names a stage."""
    want = {s.segment.key: s.index for s in b.stages}
    want.update({s.exit.graph.key: s.index + 1 for s in b.stages if s.exit is not None})
    want[b.full.key] = 0
    for g in b.graphs:
        got = [t.stage for t in g.inputs if t.role == "sequence_mask"]
        if g.key in want and got != [want[g.key]]:
            raise error(f"{w}: graph {g.key} must read one sequence_mask, of stage {want[g.key]}; found stages {got}")
        if g.key not in want and any(x is not None for x in got):
            raise error(f"{w}: graph {g.key} names a stage on its sequence_mask; only decode steps and exits read "
                        "a past mask")


def _check_decisions(b: "Bundle", classes: int, w: str, error: _Error) -> None:
    for g in b.graphs:
        for t in g.outputs:
            kind = decision_field(t.role)
            if kind == "logits" and (len(t.shape) != 2 or t.shape[1] != classes):
                raise error(f"{w}: {t.name} of graph {g.key} has shape {list(t.shape)}, but there are {classes} labels "
                            "(the labels must match the class count)")
            if kind == "confidence" and (t.shape != ("batch",) or t.dtype not in ("float32", "float16")):
                raise error(f"{w}: {t.name} of graph {g.key} must be a float of shape [batch]")
            if kind == "prediction" and (t.shape != ("batch",) or t.dtype not in ("int64", "int32")):
                raise error(f"{w}: {t.name} of graph {g.key} must be an integer of shape [batch]")


def _check_preprocess(b: "Bundle", w: str, error: _Error) -> None:
    spec = b.preprocess
    parts = (spec.image, spec.text) if isinstance(spec, ImageTextSpec) else (spec,)
    names = {t.name: t for t in b.inputs}
    wanted: list[str] = []
    for p in parts:
        if isinstance(p, ImageSpec):
            values = (*p.mean, *p.std)
            if (min(p.size) < 1 or max(p.size) > 16384 or p.channels not in (1, 3)
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or min(p.std) <= 0):
                raise error(f"{w}: preprocess needs an image size of 1 to 16384 pixels, 1 or 3 channels, finite "
                            f"means and positive finite stds; found size {list(p.size)}, channels {p.channels}, "
                            f"mean {list(p.mean)}, std {list(p.std)}")
            t = names.get(p.input_name)
            if t is not None and tuple(t.shape[1:]) != (p.channels, *p.size):
                raise error(f"{w}: preprocess makes {p.input_name} of shape [batch, {p.channels}, "
                            f"{', '.join(map(str, p.size))}], the model input is {list(t.shape)}")
            wanted.append(p.input_name)
        elif isinstance(p, TextSpec):
            if not 1 <= p.max_length <= 1 << 20:
                raise error(f"{w}: preprocess.max_length must be 1 or more, found {p.max_length}")
            for n in p.input_names:
                t = names.get(n)
                if t is not None and tuple(t.shape[1:]) != (p.max_length,):
                    raise error(f"{w}: preprocess makes {n} of {p.max_length} tokens, the model input is "
                                f"{list(t.shape)}")
            if p.tokenizer_file not in b.files:
                raise error(f"{w}: the tokenizer file {p.tokenizer_file!r:.80} is not one of the bundle's files")
            wanted += list(p.input_names)
    if sorted(wanted) != sorted(names):
        raise error(f"{w}: preprocess makes the inputs {sorted(wanted)}, the model takes {sorted(names)}")


def check_graph_files(b: "Bundle") -> None:
    """Each ONNX file's inputs and outputs against the manifest, for every precision."""
    for g in b.graphs:
        for precision, rel in g.files.items():
            inputs, outputs = read_graph_io(b.path(rel))
            where = f"{rel} ({g.key}, {precision})"
            _same_io(where, "inputs", g.inputs, inputs)
            _same_io(where, "outputs", g.outputs, outputs)


def _same_io(where: str, side: str, want: "tuple[TensorSpec, ...]", got: tuple) -> None:
    names = sorted(t.name for t in got)
    if names != sorted(t.name for t in want):
        raise BundleError(f"{where}: the file's {side} are {names}, the manifest says "
                          f"{sorted(t.name for t in want)} (a file swapped or a manifest edited?)")
    actual = {t.name: t for t in got}
    for t in want:
        a = actual[t.name]
        if a.dtype != t.dtype:
            raise BundleError(f"{where}: {t.name} is {a.dtype or f'ONNX type {a.elem_type}'} in the file, "
                              f"{t.dtype} in the manifest")
        if a.shape is None:
            continue  # the file leaves the rank open: any shape is accepted
        if len(a.shape) != len(t.shape):
            raise BundleError(f"{where}: {t.name} has rank {len(a.shape)} in the file, {len(t.shape)} in the manifest")
        for axis, (fd, md) in enumerate(zip(a.shape, t.shape)):
            if md == "batch" and isinstance(fd, int):
                raise BundleError(f"{where}: {t.name} has a fixed batch axis of {fd} in the file; the manifest "
                                  "needs it dynamic: re-export the bundle")
            if isinstance(md, int) and isinstance(fd, int) and md != fd:
                raise BundleError(f"{where}: {t.name} axis {axis} is {fd} in the file, {md} in the manifest")
