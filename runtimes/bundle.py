"""The bundle: the one contract between exporters and runtimes.

A bundle is a directory with ``bundle.json`` at its root::

    bundle.json                 this manifest: the plan (schema_version 3)
    onnx/segment_<k>.onnx       backbone segment k (the last one ends in the final head)
    onnx/exit_<k>.onnx          exit head k: logits, and in fp32 the confidence and predicted class
    onnx/full.onnx              the whole model in one graph: the baseline for parity and benchmarks
    onnx/fp16/..., onnx/int8/.. the same graphs with precision put into the ONNX (trt-fp16, trt-int8)
    validation.json             export validation report (``runtimes.records.ValidationReport``)
    tokenizer.json              models that read text
    engines/<target-key>/       TensorRT plans + build.json, where a build ran (self-described)

**The plan is data.** ``stages`` lists the chain in order; each stage holds its segment graph and
(but the last) its exit: the block it reads, its head graph, confidence function and threshold.
``full`` is the monolithic graph (a decoder's monolithic decode step). ``head`` is what the bundle does,
a tagged union on ``task``: a ``ClassifierHead`` (``classify``: the labels) or a ``DecoderHead``
(``generate``: the graphs that run once per sample, and the token facts). Every graph carries its
``key`` (how backends and engine sets name it), its ``kind`` (``runtimes.roles.GRAPH_KINDS``) and its
files per precision; every tensor it reads or writes carries its name, dtype, shape ("batch" marks
the dynamic batch axis) and ``role``:

    model_input        fed by the caller (after preprocessing)
    hidden             the hidden state carried from a segment to its exit head and the next segment
    token_mask         a (batch, tokens) mask a segment computes and later graphs read
    exit_logits, exit_confidence, exit_prediction      an exit's decision
    final_logits, final_confidence, final_prediction   the final head's decision
    prefix, token_ids, positions, sequence_mask        a decoder's image prefix, tokens and masks
    past_keys, past_values, new_keys, new_values       a decoder's cache, per layer (``layer``)

A decode graph's ``sequence_mask`` input names the stage whose past mask it reads (``stage``): a
segment its own, an exit the next stage's (it reads that stage's first layer's cache), the monolithic
step the first.

A stage's graphs read their inputs from the running state (the model inputs plus every output
produced so far) and add their outputs to it, so a tensor name means one tensor everywhere.
Readers look roles and names up here; only ``runtimes.naming`` (used by the builder in
``runtimes.plan`` and the migration of version-1 manifests) knows how names are made.
The normative description is ``docs/bundle.md``; a JSON Schema generated from these dataclasses is
``docs/schema/bundle.schema.json``.

Only this module reads or writes ``bundle.json``. Loading checks every field (``Bundle.check`` and
``runtimes.contract``), that every path stays inside the bundle, the sha256 of every file, and
each ONNX file's actual inputs and outputs against the plan. Version-1 manifests (the plan implied
by names) and version 2 (task, labels and decoder at the top level) are migrated on load
(``runtimes.migrate``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

from runtimes.atomic import LOCK_FILE, Replaceable, atomic_write_text
from runtimes.confidence import CONFIDENCE
from runtimes.contract import check_bundle, check_graph_files
from runtimes.errors import BundleError, ConfigError, FreedeployError
from runtimes.migrate import SCHEMA_VERSION, migrate
from runtimes.preprocess import ImageSpec, ImageTextSpec, Spec, TextSpec
from runtimes.records import ENGINE_PRECISIONS, INT8_HEADS, PRECISIONS, Certificate
from runtimes.roles import (DECODER_ROLES, DTYPES, EXIT_DECISION, FINAL_DECISION, GRAPH_KINDS, HEADS, KV_ROLES, ROLES,
                            TASKS, decision_field)
from runtimes.thresholds import check_thresholds
from runtimes.typed import from_dict, to_dict

__all__ = ["SCHEMA_VERSION", "MANIFEST", "TensorSpec", "GraphSpec", "ExitSpec", "StageSpec", "BatchSpec",
           "Bundle", "load_bundle", "save_bundle", "sha256_file", "PRECISIONS", "ENGINE_PRECISIONS", "INT8_HEADS",
           "ROLES", "GRAPH_KINDS", "HEADS", "ClassifierHead", "DecoderHead", "Head", "DECODER_ROLES",
           "KV_ROLES", "TASKS", "DTYPES", "by_exit", "decision_field", "BUNDLE_DIR", "EXIT_DECISION", "FINAL_DECISION"]

MANIFEST = "bundle.json"
BUNDLE_DIR = Replaceable("a freedeploy bundle", MANIFEST, "stages")  # what export --overwrite may replace
MAX_BATCH = 1 << 20
_Error = type[FreedeployError]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str = field(metadata={"choices": DTYPES})  # numpy dtype name
    shape: tuple[int | str, ...]  # "batch" marks the dynamic batch axis; other names are symbolic sizes
    role: str = field(default="", metadata={"choices": ROLES, "required": True})  # set by the builder (runtimes.plan)
    layer: int | None = field(default=None, metadata={"omit_none": True})  # the 0-based decoder layer of a key/value tensor (KV_ROLES); None elsewhere
    stage: int | None = field(default=None, metadata={"omit_none": True})  # a decode graph's sequence_mask input: the stage whose past mask it reads

    def check(self, where: str, error: _Error = BundleError) -> None:
        if not self.name or len(self.name) > 256:
            raise error(f"{where}: a tensor needs a name of 1 to 256 characters")
        if (self.role in KV_ROLES) != (self.layer is not None) or self.layer is not None and self.layer < 0:
            raise error(f"{where}: tensor {self.name} needs a non-negative 'layer' exactly when its role is one of "
                        f"{', '.join(KV_ROLES)}")
        if self.stage is not None and (self.role != "sequence_mask" or self.stage < 0):
            raise error(f"{where}: tensor {self.name}: only a sequence_mask names a 'stage', a non-negative one")
        if any(isinstance(d, int) and d < 0 for d in self.shape):
            raise error(f"{where}: shape entries must be non-negative integers or names, found {list(self.shape)}")


@dataclass(frozen=True)
class GraphSpec:
    key: str  # how backends and engine sets name this graph: segment_0, exit_0, ..., full
    kind: str = field(metadata={"choices": GRAPH_KINDS})
    files: Mapping[str, str]  # precision -> path relative to the bundle root; "fp32" always present
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def check(self, where: str, error: _Error = BundleError) -> None:
        if "fp32" not in self.files or any(p not in PRECISIONS for p in self.files):
            raise error(f"{where}: 'files' must map precisions {', '.join(PRECISIONS)} (fp32 required) to paths, "
                        f"found {', '.join(map(str, self.files))[:80]}")
        if not self.inputs or not self.outputs:
            raise error(f"{where}: graph {self.key} needs inputs and outputs")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise error(f"{where}: graph {self.key} names a tensor twice ({', '.join(names)})")

    @cached_property
    def decision(self) -> tuple[str, str]:
        """(confidence, prediction) names of the decision this graph outputs (an exit's or the final
        head's): what the loop reads."""
        fields = {decision_field(t.role): t.name for t in self.outputs}
        if "confidence" not in fields or "prediction" not in fields:
            raise BundleError(f"graph {self.key} outputs no exit or final decision")
        return fields["confidence"], fields["prediction"]

    def output(self, role: str) -> TensorSpec:
        """The one output with ``role``."""
        found = [t for t in self.outputs if t.role == role]
        if len(found) != 1:
            raise BundleError(f"graph {self.key} has {len(found)} outputs with role {role!r}, expected one")
        return found[0]


@dataclass(frozen=True)
class ExitSpec:
    block: int  # 1-based: this exit reads block `block`'s output
    graph: GraphSpec
    confidence: str = field(metadata={"choices": tuple(CONFIDENCE)})  # computed in the graph (runtimes.confidence)
    threshold: float | None  # exit when confidence >= threshold; None: this exit never fires
    head: str = field(default="full-block", metadata={"choices": HEADS})  # cls-query: the block runs for one token
    cost: float = 1.0  # analytic cost of the head in backbone blocks (multiply-adds)

    def check(self, where: str, error: _Error = BundleError) -> None:
        check_thresholds((self.threshold,), where, error)
        if not 0.0 < self.cost <= 2.0:
            raise error(f"{where}: 'cost' must be in (0, 2] backbone blocks, found {self.cost}")

    @property
    def decision(self) -> tuple[str, str]:
        """(confidence, prediction) tensor names: what the loop reads."""
        return self.graph.decision


@dataclass(frozen=True)
class StageSpec:
    index: int
    blocks: tuple[int, int]  # 0-based half-open range of backbone blocks the segment runs
    segment: GraphSpec
    exit: ExitSpec | None  # None for the last stage, whose segment ends in the final head


@dataclass(frozen=True)
class ClassifierHead:
    """A classifier's head (task ``classify``): every decision's logits index these labels."""

    labels: tuple[str, ...]
    task: str = field(default="classify", metadata={"choices": ("classify",)})
    engine_precisions: ClassVar[tuple[str, ...]] = ENGINE_PRECISIONS  # what TensorRT builds for this head

    def check(self, where: str, error: _Error = BundleError) -> None:
        if not self.labels:
            raise error(f"{where}: a classifier needs one or more labels")

    def axis_ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, typical, max) of each named axis besides the batch: a classifier's sizes are all fixed."""
        return {}

    def graphs_around(self) -> tuple[tuple[GraphSpec, ...], tuple[GraphSpec, ...]]:
        """The head's own graphs, before the chain and after it: a classifier has none."""
        return (), ()


@dataclass(frozen=True)
class DecoderHead:
    """A text decoder's head (task ``generate``): the graphs that run once per sample or per exit taken
    beside the chain of decode-step segments and exits, and the token facts the decoding loop needs.

    - ``encode``: image -> prefix (the query tokens as the language model reads them);
    - ``prefill``: prefix, prompt tokens, positions and mask -> every layer's keys and values for the
      whole prompt, and the final head's decision for the first new token;
    - ``fills[i]`` serves stage ``i + 1``: a hidden state copied up from an exit -> the keys and values of
      that stage's layers (state propagation, the optional KV rule; recomputation needs no graph).
    """

    encode: GraphSpec
    prefill: GraphSpec
    fills: tuple[GraphSpec, ...]
    tokenizer_file: str
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    num_layers: int
    num_query_tokens: int
    max_positions: int  # the longest sequence (prefix + prompt + generated) the position table covers
    task: str = field(default="generate", metadata={"choices": ("generate",)})
    engine_precisions: ClassVar[tuple[str, ...]] = ("fp32",)  # fp16 and weight-only decoders: not yet

    def axis_ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, typical, max) of each named axis besides the batch: the prompt, the new tokens of a step
        (one, typically) and the past, bounded by the positions (the image prefix takes
        ``num_query_tokens`` of them)."""
        room, positions = self.max_positions - self.num_query_tokens, self.max_positions
        return {"prompt": (1, min(16, room), room), "new": (1, 1, positions),
                "past": (1, min(positions - 1, self.num_query_tokens + 32), positions - 1)}

    def check(self, where: str, error: _Error = BundleError) -> None:
        ids = (self.bos_id, self.eos_id, self.pad_id)
        if self.vocab_size < 2 or not all(0 <= i < self.vocab_size for i in ids):
            raise error(f"{where}: token ids {list(ids)} must lie in the vocabulary of {self.vocab_size}")
        if self.num_layers < 2 or self.num_query_tokens < 0 or self.max_positions <= self.num_query_tokens + 1:
            raise error(f"{where}: needs 2 or more layers and room for the prefix and a token "
                        f"(layers {self.num_layers}, query tokens {self.num_query_tokens}, "
                        f"positions {self.max_positions})")

    def graphs_around(self) -> tuple[tuple[GraphSpec, ...], tuple[GraphSpec, ...]]:
        """The head's own graphs, before the chain (encode, prefill) and after it (the state fills)."""
        return (self.encode, self.prefill), self.fills


Head = ClassifierHead | DecoderHead
H = TypeVar("H", ClassifierHead, DecoderHead)
_HEADS: dict[str, type] = {"classify": ClassifierHead, "generate": DecoderHead}


@dataclass(frozen=True)
class BatchSpec:
    min: int
    opt: int
    max: int  # larger inputs are split by the runtime, not refused

    def check(self, where: str, error: _Error = BundleError) -> None:
        if not 1 <= self.min <= self.opt <= self.max <= MAX_BATCH:
            raise error(f"{where}: batch sizes must satisfy 1 <= min <= opt <= max <= {MAX_BATCH}, found "
                        f"{self.min}, {self.opt}, {self.max}")


def _spec_dump(spec: Spec) -> dict[str, Any]:
    return spec.to_dict()


def _spec_parse(data: Any, where: str, error: _Error) -> Spec:
    """A preprocessing spec, typed field by field; its ``kind`` says which."""
    kinds = {"image": ImageSpec, "text": TextSpec, "image-text": ImageTextSpec}
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str) or kind not in kinds:
        raise error(f"{where}: 'kind' must be one of {', '.join(kinds)}, found {str(kind)[:40]!r}")
    return from_dict(kinds[kind], data, where, error)


def _head_dump(head: Head) -> dict[str, Any]:
    data = to_dict(head)
    return {"task": data.pop("task"), **data}


def _head_parse(data: Any, where: str, error: _Error) -> Head:
    """The head, typed by its ``task``: the one place a bundle's kind is decided."""
    task = data.get("task") if isinstance(data, dict) else None
    if not isinstance(task, str) or task not in _HEADS:
        raise error(f"{where}: 'task' must be one of {', '.join(TASKS)}, found {str(task)[:40]!r}")
    return from_dict(_HEADS[task], data, where, error)


_PREPROCESS_SCHEMA = {"type": "object", "required": ["kind"],
                      "properties": {"kind": {"enum": ["image", "text", "image-text"]}},
                      "description": "how raw inputs become the model inputs (runtimes.preprocess)"}


@dataclass(frozen=True)
class Bundle:
    name: str
    head: Head = field(metadata={"parse": _head_parse, "dump": _head_dump})
    preprocess: Spec = field(metadata={"parse": _spec_parse, "dump": _spec_dump, "schema": _PREPROCESS_SCHEMA})
    inputs: tuple[TensorSpec, ...]  # the model inputs, as the caller feeds them
    batch: BatchSpec
    stages: tuple[StageSpec, ...]
    full: GraphSpec
    num_blocks: int
    files: Mapping[str, str]  # relative path -> sha256 of every file the manifest covers
    schema_version: int = SCHEMA_VERSION
    provenance: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Certificate] | None = None  # certificates by calibration key (freedeploy calibrate)
    root: Path | None = field(default=None, compare=False, metadata={"json": False})  # where it was loaded from
    loaded_version: int | None = field(default=None, compare=False, metadata={"json": False})  # before migration

    def check(self, where: str, error: _Error = BundleError) -> None:
        check_bundle(self, where, error)

    @property
    def exits(self) -> tuple[ExitSpec, ...]:
        return tuple(s.exit for s in self.stages if s.exit is not None)

    @property
    def thresholds(self) -> tuple[float | None, ...]:
        return tuple(e.threshold for e in self.exits)

    def expect(self, kind: type[H], use: str) -> H:
        """The head, when it is a ``kind`` (``ClassifierHead`` or ``DecoderHead``); else a ConfigError saying
        that ``use`` needs the other kind of bundle. What a consumer that runs one kind asks."""
        if not isinstance(self.head, kind):
            raise ConfigError(f"bundle {self.name!r} is a {self.head.task} bundle: {use} takes {kind.task} bundles")
        return self.head

    @property
    def task(self) -> str:
        """``classify`` or ``generate``: the head's tag, for messages and reports (dispatch on the head's type)."""
        return self.head.task

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p in self.full.files)

    @cached_property
    def graphs(self) -> tuple[GraphSpec, ...]:
        """Every graph in chain order (segment_0, exit_0, segment_1, ...), then the full graph; a decoder's
        encode and prefill come first and its state fills after the chain."""
        chain = []
        for s in self.stages:
            chain.append(s.segment)
            if s.exit is not None:
                chain.append(s.exit.graph)
        before, after = self.head.graphs_around()
        return (*before, *chain, *after, self.full)

    @cached_property
    def _by_key(self) -> dict[str, GraphSpec]:
        return {g.key: g for g in self.graphs}

    def graph_keys(self) -> list[str]:
        return [g.key for g in self.graphs]

    def graph(self, key: str) -> GraphSpec:
        try:
            return self._by_key[key]
        except KeyError:
            raise BundleError(f"bundle {self.name!r} has no graph {key!r}; it has {', '.join(self._by_key)}") from None

    @property
    def final_decision(self) -> tuple[str, str]:
        """(confidence, prediction) names of the final head at the end of the chain."""
        return self.stages[-1].segment.decision

    def path(self, relative: str) -> Path:
        if self.root is None:
            raise BundleError("this bundle was not loaded from a directory")
        return _inside(self.root, relative)

    def with_thresholds(self, thresholds: tuple[float | None, ...],
                        calibration: Mapping[str, Certificate] | None) -> "Bundle":
        if len(thresholds) != len(self.exits):
            raise BundleError(f"{len(thresholds)} thresholds given for {len(self.exits)} exits")
        check_thresholds(tuple(thresholds), "thresholds", BundleError)
        it = iter(thresholds)
        stages = tuple(s if s.exit is None else replace(s, exit=replace(s.exit, threshold=next(it)))
                       for s in self.stages)
        return replace(self, stages=stages, calibration=calibration)

    def to_dict(self) -> dict[str, Any]:
        data = to_dict(self)
        return {"schema_version": data.pop("schema_version"), **data}

    @classmethod
    def from_dict(cls, data: Any, where: str = "bundle.json:", error: _Error = BundleError) -> "Bundle":
        return from_dict(cls, data, where, error)


def by_exit(blocks: Sequence[int], values: Sequence[Any]) -> dict[str, Any]:
    """Per-head values (every exit in chain order, then the final head) keyed the way users see
    exits: by the block each reads (``"2"``), and ``"final"``; ``blocks`` holds each exit's block."""
    if len(values) != len(blocks) + 1:
        raise BundleError(f"{len(values)} values for {len(blocks)} exits and the final head")
    return {**{str(b): v for b, v in zip(blocks, values)}, "final": values[-1]}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(bundle: Bundle, directory: str | os.PathLike) -> None:
    """Write ``bundle.json`` atomically (the files it lists must already be in place), always in the
    current schema version."""
    text = json.dumps(replace(bundle, schema_version=SCHEMA_VERSION).to_dict(), indent=2) + "\n"
    atomic_write_text(Path(directory) / MANIFEST, text)


def load_bundle(directory: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read and check a bundle; ``verify`` also checks every file's sha256 (a read of every file)."""
    root = Path(directory)
    manifest = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory")
    if not manifest.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and integers past Python's digit limit
        raise BundleError(f"{manifest} is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise BundleError(f"{manifest} is not a usable manifest: its JSON is nested too deeply") from None
    except OSError as exc:
        raise BundleError(f"{manifest} cannot be read: {exc.strerror}") from None
    bundle = replace(Bundle.from_dict(migrate(data, manifest), f"{manifest}:"), root=root,
                     loaded_version=data.get("schema_version"))
    for rel, digest in bundle.files.items():
        path = _inside(root, rel)
        try:
            if not path.is_file():
                raise BundleError(f"{manifest}: listed file {rel} is missing")
            if verify and sha256_file(path) != digest:
                raise BundleError(f"{manifest}: checksum mismatch for {rel}: the file was changed or corrupted")
        except OSError as exc:
            raise BundleError(f"{manifest}: listed file {rel[:80]} cannot be read: {exc.strerror}") from None
    for graph in bundle.graphs:
        for rel in graph.files.values():
            _inside(root, rel)
            if rel not in bundle.files:
                raise BundleError(f"{manifest}: graph file {rel} has no checksum in 'files'")
    if verify:
        _no_extra_files(root, bundle)
    check_graph_files(bundle)
    return bundle


def _no_extra_files(root: Path, bundle: Bundle) -> None:
    """Every file must be listed, except engine sets (self-described by their build.json) and the
    temporary file of an atomic manifest write in progress."""
    listed = set(bundle.files) | {MANIFEST, LOCK_FILE}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel.split("/")[0] == "engines" or rel in listed:
            continue
        if path.name.startswith(f".{MANIFEST}.") and path.name.endswith(".tmp"):
            continue
        raise BundleError(f"{root / MANIFEST}: file {rel} is in the bundle but not listed in it (added or "
                          "left behind?); remove it or re-export")


def _inside(root: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``root``; refuse absolute paths, '..' and symlinks leading outside."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise BundleError(f"bundle path {relative!r} must be relative to the bundle directory")
    if "\x00" in relative or len(relative) > 1024:
        raise BundleError(f"bundle path {relative[:80]!r} is not a usable file name")
    if ".." in Path(relative).parts:
        raise BundleError(f"bundle path {relative!r} leaves the bundle directory")
    try:
        base = root.resolve()
        path = (root / relative).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # too long, a symlink loop, ...
        raise BundleError(f"bundle path {relative[:80]!r} cannot be resolved: {exc}") from None
    if path != base and base not in path.parents:
        raise BundleError(f"bundle path {relative!r} resolves outside the bundle (a symlink?)")
    return path
