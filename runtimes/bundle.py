"""The bundle: the one contract between exporters and runtimes.

A bundle is a directory with ``bundle.json`` at its root::

    bundle.json                 this manifest (schema_version 1)
    onnx/segment_<k>.onnx       backbone segment k (the last one ends in the final head)
    onnx/exit_<k>.onnx          exit head k: logits, and in fp32 the confidence and predicted class
    onnx/full.onnx              the whole model in one graph: the baseline for parity and benchmarks
    onnx/fp16/..., onnx/int8/.. the same graphs with precision put into the ONNX (trt-fp16, trt-int8)
    validation.json             export validation report
    tokenizer.json              models that read text
    engines/<target-key>/       TensorRT plans + build.json, where a build ran (self-described)

Stage k runs ``segment_k`` and then, unless it is the last stage, ``exit_k``. Tensors move
between stages by name: a stage reads its inputs from the running state (the model inputs plus
every output produced so far) and adds its outputs to it. ``hidden_<e>`` is the output of block e
(1-based), so ``segment_0`` writes ``hidden_<e1>``, which ``exit_0`` and ``segment_1`` read.
Models with a token mask feed it to every graph after the embeddings: the model input
``attention_mask`` when the tokens are the input tokens (text), else ``token_mask``, which
``segment_0`` computes from the model inputs and writes (an image with a question: text mask +
image tokens).

Only this module reads or writes ``bundle.json``. Loading checks the schema version, field types,
that every path stays inside the bundle, and the sha256 of every file it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from runtimes.atomic import atomic_write_text
from runtimes.errors import BundleError, ConfigError
from runtimes.preprocess import Spec, spec_from_dict

__all__ = ["SCHEMA_VERSION", "MANIFEST", "TensorSpec", "GraphSpec", "ExitSpec", "StageSpec", "BatchSpec",
           "Bundle", "load_bundle", "save_bundle", "sha256_file", "PRECISIONS"]

SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
PRECISIONS = ("fp32", "fp16", "int8")
_DTYPES = ("float32", "float16", "int64", "int32", "bool")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # "batch" marks the dynamic batch axis


@dataclass(frozen=True)
class GraphSpec:
    files: Mapping[str, str]  # precision -> path relative to the bundle root; "fp32" always present
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ExitSpec:
    block: int  # 1-based: this exit reads block `block`'s output
    graph: GraphSpec
    confidence: str  # name of the confidence function computed in the graph (runtimes.confidence)
    threshold: float | None  # exit when confidence >= threshold; None: this exit never fires
    head: str = "full-block"  # cls-query: the head's block runs for the pooled token only
    cost: float = 1.0  # analytic cost of the head in backbone blocks (multiply-adds)


@dataclass(frozen=True)
class StageSpec:
    index: int
    blocks: tuple[int, int]  # 0-based half-open range of backbone blocks the segment runs
    segment: GraphSpec
    exit: ExitSpec | None  # None for the last stage, whose segment ends in the final head


@dataclass(frozen=True)
class BatchSpec:
    min: int
    opt: int
    max: int  # larger inputs are split by the runtime, not refused


@dataclass(frozen=True)
class Bundle:
    name: str
    labels: tuple[str, ...]
    preprocess: Spec
    inputs: tuple[TensorSpec, ...]
    batch: BatchSpec
    stages: tuple[StageSpec, ...]
    full: GraphSpec
    num_blocks: int
    files: Mapping[str, str]  # relative path -> sha256 of every file the manifest covers
    provenance: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] | None = None  # the certificate written by `freedeploy calibrate`
    schema_version: int = SCHEMA_VERSION
    root: Path | None = field(default=None, compare=False)  # where it was loaded from; not serialised

    @property
    def exits(self) -> tuple[ExitSpec, ...]:
        return tuple(s.exit for s in self.stages if s.exit is not None)

    @property
    def thresholds(self) -> tuple[float | None, ...]:
        return tuple(e.threshold for e in self.exits)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p in self.full.files)

    def graph_keys(self) -> list[str]:
        """``segment_0, exit_0, segment_1, ..., segment_K, full``: every graph, in chain order."""
        keys = []
        for s in self.stages:
            keys.append(f"segment_{s.index}")
            if s.exit is not None:
                keys.append(f"exit_{s.index}")
        return keys + ["full"]

    def graph(self, key: str) -> GraphSpec:
        """The graph named ``segment_<k>``, ``exit_<k>`` or ``full``."""
        if key == "full":
            return self.full
        kind, _, index = key.partition("_")
        if kind in ("segment", "exit") and index.isdigit() and int(index) < len(self.stages):
            stage = self.stages[int(index)]
            graph = stage.segment if kind == "segment" else (stage.exit.graph if stage.exit else None)
            if graph is not None:
                return graph
        raise BundleError(f"bundle {self.name!r} has no graph {key!r}; it has {', '.join(self.graph_keys())}")

    def path(self, relative: str) -> Path:
        if self.root is None:
            raise BundleError("this bundle was not loaded from a directory")
        return _inside(self.root, relative)

    def with_thresholds(self, thresholds: tuple[float | None, ...], calibration: Mapping[str, Any] | None) -> "Bundle":
        if len(thresholds) != len(self.exits):
            raise BundleError(f"{len(thresholds)} thresholds given for {len(self.exits)} exits")
        it = iter(thresholds)
        stages = tuple(s if s.exit is None else replace(s, exit=replace(s.exit, threshold=next(it)))
                       for s in self.stages)
        return replace(self, stages=stages, calibration=calibration)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        data["preprocess"] = self.preprocess.to_dict()
        return {"schema_version": data.pop("schema_version"), **data}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(bundle: Bundle, directory: str | os.PathLike) -> None:
    """Write ``bundle.json`` atomically (the files it lists must already be in place)."""
    text = json.dumps(bundle.to_dict(), indent=2) + "\n"
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest} is not valid JSON: {exc}") from None
    bundle = _parse(data, manifest)
    bundle = replace(bundle, root=root)
    for rel, digest in bundle.files.items():
        path = _inside(root, rel)
        try:
            if not path.is_file():
                raise BundleError(f"{manifest}: listed file {rel} is missing")
            if verify and sha256_file(path) != digest:
                raise BundleError(f"{manifest}: checksum mismatch for {rel}: the file was changed or corrupted")
        except OSError as exc:
            raise BundleError(f"{manifest}: listed file {rel[:80]} cannot be read: {exc.strerror}") from None
    for graph in _graphs(bundle):
        for rel in graph.files.values():
            _inside(root, rel)
            if rel not in bundle.files:
                raise BundleError(f"{manifest}: graph file {rel} has no checksum in 'files'")
    if verify:
        _no_extra_files(root, bundle)
    return bundle


def _no_extra_files(root: Path, bundle: Bundle) -> None:
    """Every file must be listed, except engine sets (self-described by their build.json) and the
    temporary file of an atomic manifest write in progress."""
    listed = set(bundle.files) | {MANIFEST}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel.split("/")[0] == "engines" or rel in listed:
            continue
        if path.name.startswith(f".{MANIFEST}.") and path.name.endswith(".tmp"):
            continue
        raise BundleError(f"{root / MANIFEST}: file {rel} is in the bundle but not listed in it (added or "
                          "left behind?); remove it or re-export")


def _graphs(bundle: Bundle) -> list[GraphSpec]:
    out = [bundle.full]
    for s in bundle.stages:
        out.append(s.segment)
        if s.exit is not None:
            out.append(s.exit.graph)
    return out


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


# -- parsing with type checks: every problem names the field ----------------------------------------------------

def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise BundleError(f"{where}: expected an object, found {type(obj).__name__}")
    if key not in obj:
        raise BundleError(f"{where}: field '{key}' is missing")
    value = obj[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BundleError(f"{where}: field '{key}' must be {_kinds(kind)}, found a boolean")
    if not isinstance(value, kind):
        raise BundleError(f"{where}: field '{key}' must be {_kinds(kind)}, found {type(value).__name__}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             type(None): "null", bool: "a boolean"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _tensor(obj: Any, where: str) -> TensorSpec:
    name = _need(obj, "name", str, where)
    dtype = _need(obj, "dtype", str, where)
    if dtype not in _DTYPES:
        raise BundleError(f"{where}: dtype {dtype!r} is not one of {_DTYPES}")
    shape = _need(obj, "shape", list, where)
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0):
            raise BundleError(f"{where}: shape entries must be non-negative integers or names, found {d!r}")
    return TensorSpec(name, dtype, tuple(shape))


def _graph(obj: Any, where: str) -> GraphSpec:
    files = _need(obj, "files", dict, where)
    if "fp32" not in files or not all(isinstance(k, str) and k in PRECISIONS and isinstance(v, str)
                                      for k, v in files.items()):
        raise BundleError(f"{where}: 'files' must map precisions {PRECISIONS} (fp32 required) to paths")
    inputs = tuple(_tensor(t, f"{where}.inputs") for t in _need(obj, "inputs", list, where))
    outputs = tuple(_tensor(t, f"{where}.outputs") for t in _need(obj, "outputs", list, where))
    if not inputs or not outputs:
        raise BundleError(f"{where}: a graph needs inputs and outputs")
    return GraphSpec(dict(files), inputs, outputs)


def _exit(obj: Any, where: str) -> ExitSpec:
    threshold = _need(obj, "threshold", (int, float, type(None)), where)
    head = _need(obj, "head", str, where) if "head" in obj else "full-block"
    cost = float(_need(obj, "cost", (int, float), where)) if "cost" in obj else 1.0
    if head not in ("cls-query", "full-block") or not 0.0 < cost <= 2.0:
        raise BundleError(f"{where}: head must be cls-query or full-block with a cost in (0, 2], found {head!r}, {cost}")
    return ExitSpec(block=_need(obj, "block", int, where), graph=_graph(_need(obj, "graph", dict, where), where + ".graph"),
                    confidence=_need(obj, "confidence", str, where),
                    threshold=None if threshold is None else float(threshold), head=head, cost=cost)


def _stage(obj: Any, where: str) -> StageSpec:
    blocks = _need(obj, "blocks", list, where)
    if len(blocks) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        raise BundleError(f"{where}: 'blocks' must be [start, end]")
    ex = _need(obj, "exit", (dict, type(None)), where)
    return StageSpec(index=_need(obj, "index", int, where), blocks=(blocks[0], blocks[1]),
                     segment=_graph(_need(obj, "segment", dict, where), where + ".segment"),
                     exit=None if ex is None else _exit(ex, where + ".exit"))


def _parse(data: Any, where: Path) -> Bundle:
    w = str(where)
    version = _need(data, "schema_version", int, w)
    if version > SCHEMA_VERSION:
        raise BundleError(f"{where} has schema version {version}; this freedeploy reads up to {SCHEMA_VERSION}: "
                          "upgrade freedeploy")
    if version < 1:
        raise BundleError(f"{where} has an invalid schema version {version}")
    stages = tuple(_stage(s, f"{w}: stages[{i}]") for i, s in enumerate(_need(data, "stages", list, w)))
    if len(stages) < 2 or stages[-1].exit is not None or any(s.exit is None for s in stages[:-1]):
        raise BundleError(f"{w}: stages must be two or more, each with an exit except the last")
    if [s.index for s in stages] != list(range(len(stages))):
        raise BundleError(f"{w}: stage indices must be 0, 1, 2, ... in order")
    batch = _need(data, "batch", dict, w)
    bmin, bopt, bmax = (_need(batch, k, int, f"{w}: batch") for k in ("min", "opt", "max"))
    if not 1 <= bmin <= bopt <= bmax:
        raise BundleError(f"{w}: batch sizes must satisfy 1 <= min <= opt <= max, found {bmin}, {bopt}, {bmax}")
    files = _need(data, "files", dict, w)
    if not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()):
        raise BundleError(f"{w}: 'files' must map relative paths to sha256 hex digests")
    labels = _need(data, "labels", list, w)
    if not labels or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"{w}: 'labels' must be a non-empty list of strings")
    calibration = _need(data, "calibration", (dict, type(None)), w)
    try:
        preprocess = spec_from_dict(_need(data, "preprocess", dict, w))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise BundleError(f"{w}: 'preprocess' is malformed ({type(exc).__name__}: {exc})") from None
    return Bundle(
        name=_need(data, "name", str, w), labels=tuple(labels), preprocess=preprocess,
        inputs=tuple(_tensor(t, f"{w}: inputs") for t in _need(data, "inputs", list, w)),
        batch=BatchSpec(bmin, bopt, bmax), stages=stages, full=_graph(_need(data, "full", dict, w), f"{w}: full"),
        num_blocks=_need(data, "num_blocks", int, w), files=dict(files),
        provenance=_need(data, "provenance", dict, w), calibration=calibration, schema_version=version)
