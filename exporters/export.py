"""``export_bundle``: an early-exit model -> a validated bundle directory, written atomically.

The caller (the CLI) loads the model and encodes the data; this module never imports freedeploy.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from calibration.int8_data import FeedReader, collect_feeds
from exporters.graphs import GraphDef, graph_defs, head_cost
from exporters.config import HEAD_WEIGHTS, TARGETS, ExportConfig
from exporters.onnx_export import module2onnx
from exporters.precision import onnx2fp16, onnx2int8, onnx2int8_weights
from exporters.validate import chain_parity, compare_files, precision_report, record_all, torch_record
from runtimes.atomic import atomic_directory
from runtimes.backends.onnxruntime import OrtBackend
from runtimes import naming
from runtimes.bundle import BUNDLE_DIR, INT8_HEADS, MANIFEST, BatchSpec, Bundle, GraphSpec, load_bundle, save_bundle, sha256_file
from runtimes.plan import classifier_bundle
from runtimes.errors import ConfigError, ValidationError
from runtimes.records import VALIDATION_FILE, PrecisionCheck, ValidationReport
from runtimes.preprocess import spec_from_dict

__all__ = ["TARGETS", "ExportConfig", "ExportData", "ExportResult", "export_bundle", "write_manifest"]

log = logging.getLogger(__name__)

@dataclass
class ExportData:
    """Encoded model inputs (numpy) for tracing, validation and int8 calibration."""

    test: dict[str, np.ndarray]
    test_labels: np.ndarray
    calib: dict[str, np.ndarray]


@dataclass
class ExportResult:
    out: Path
    bundle: Bundle
    validation: ValidationReport
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def export_bundle(model: torch.nn.Module, run: dict[str, Any], data: ExportData, out: Path, cfg: ExportConfig,
                  extra_files: dict[str, Path] | None = None, progress: Callable[[str], None] | None = None,
                  sources: Sequence[Path] = ()) -> ExportResult:
    """Write ``out`` (a bundle) from a loaded early-exit model and its run manifest; ``out`` may not
    be, contain or lie inside any of ``sources`` (the run dir), and replaces only a bundle."""
    if cfg.target not in TARGETS:
        raise ConfigError(f"unknown target {cfg.target!r}; choose one of {', '.join(TARGETS)}")
    if cfg.head_weights not in HEAD_WEIGHTS:
        raise ConfigError(f"unknown head weights {cfg.head_weights!r}; choose one of {', '.join(HEAD_WEIGHTS)}")
    if not 1 <= cfg.opt_batch <= cfg.max_batch:
        raise ConfigError(f"batch sizes must satisfy 1 <= opt ({cfg.opt_batch}) <= max ({cfg.max_batch})")
    say = progress or (lambda m: log.info(m))
    t0, timings = time.perf_counter(), {}
    model = model.eval().float()
    model.set_exit_head(cfg.exit_head)
    defs = graph_defs(model, cfg.confidence)
    precision = TARGETS[cfg.target]
    with atomic_directory(out, overwrite=cfg.overwrite, kind=BUNDLE_DIR, inputs=sources) as tmp:
        (tmp / "onnx").mkdir()
        specs = _write_onnx(defs, data.test, tmp, cfg, say)
        timings["onnx_export_s"] = time.perf_counter() - t0
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        config = getattr(model.hf.config, "vision_config", model.hf.config)
        run = {**run, "exit_head": model.exit_head, "attention_heads": int(config.num_attention_heads)}
        bundle = write_manifest(tmp, _assemble(defs, specs, run, cfg, out.name))
        validation = ValidationReport(cfg.target, cfg.validate)
        fp32 = OrtBackend(bundle, "fp32", threads=None)
        if cfg.validate:
            say("validating fp32 graphs against torch")
            validation = _validate_fp32(bundle, fp32, {d.key: d.module for d in defs}, data, cfg)
        if precision != "fp32":
            t1 = time.perf_counter()
            bundle = write_manifest(tmp, _add_precision(bundle, tmp, precision, fp32, data.calib, say))
            timings[f"{precision}_transform_s"] = time.perf_counter() - t1
            if cfg.validate:
                say(f"validating {precision} graphs against fp32")
                validation = replace(validation, precision=_validate_precision(bundle, precision, fp32, data, cfg))
        if cfg.head_weights == "int8":
            t1 = time.perf_counter()
            bundle = write_manifest(tmp, _add_int8_heads(bundle, tmp, say))
            timings["int8_heads_transform_s"] = time.perf_counter() - t1
            if cfg.validate:
                say(f"validating {INT8_HEADS} against fp32")
                validation = replace(validation, head_weights=_validate_precision(bundle, INT8_HEADS, fp32, data, cfg))
        (tmp / VALIDATION_FILE).write_text(json.dumps(validation.to_dict(), indent=2) + "\n")
        bundle = write_manifest(tmp, bundle)
    timings["total_s"] = time.perf_counter() - t0
    return ExportResult(out, load_bundle(out), validation, time.perf_counter() - t0, timings)


def _write_onnx(defs: list[GraphDef], test: dict[str, np.ndarray], tmp: Path, cfg: ExportConfig,
                say: Callable[[str], None]) -> dict[str, tuple]:
    """Trace every graph on two real rows, feeding each graph what the chain before it produced."""
    state = {k: torch.from_numpy(v[:2]) for k, v in test.items()}
    if len(next(iter(state.values()))) < 2:
        raise ConfigError("export needs at least 2 test samples to trace the graphs")
    model_inputs = dict(state)
    specs = {}
    for d in defs:
        say(f"exporting {d.key}")
        full = d.layout.kind == "full"
        source = model_inputs if full else state
        args = [source[n] for n in d.inputs]
        specs[d.key] = module2onnx(d.module, args, d.inputs, d.outputs, tmp / naming.onnx_file(d.key),
                                   opset=cfg.opset, max_batch=cfg.max_batch)
        if not full:
            with torch.no_grad():
                outs = d.module(*args)
            state.update(zip(d.outputs, outs if isinstance(outs, tuple) else (outs,)))
    return specs


def _assemble(defs: list[GraphDef], specs: dict[str, tuple], run: dict[str, Any], cfg: ExportConfig,
              name: str) -> Bundle:
    layout = [d.layout for d in defs]

    def cost(key: str) -> float:  # an exit head reads hidden_<e>: (batch, T, C)
        tokens, width = specs[key][0][0].shape[1], specs[key][0][0].shape[2]
        return head_cost(run["exit_head"], tokens, width, run["attention_heads"])

    return classifier_bundle(layout, specs, name=name, labels=run["labels"],
                             preprocess=spec_from_dict(run["preprocess"]), num_blocks=run["num_blocks"],
                             batch=BatchSpec(1, cfg.opt_batch, cfg.max_batch), confidence=cfg.confidence,
                             head=run["exit_head"], head_costs=[cost(g.key) for g in layout if g.kind == "exit"],
                             provenance=_provenance(run, cfg))


def write_manifest(tmp: Path, bundle: Bundle) -> Bundle:
    """Hash every file in the directory (but the manifest and engines), write bundle.json, reload."""
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
             if p.is_file() and p.name != MANIFEST and "engines" not in p.relative_to(tmp).parts}
    save_bundle(replace(bundle, files=files), tmp)
    return load_bundle(tmp)


def _add_precision(bundle: Bundle, tmp: Path, precision: str, fp32: OrtBackend, calib: dict[str, np.ndarray],
                   say: Callable[[str], None]) -> Bundle:
    (tmp / "onnx" / precision).mkdir()
    feeds = None
    if precision == "int8":
        say(f"collecting int8 calibration data ({len(next(iter(calib.values())))} samples)")
        n, step = len(next(iter(calib.values()))), 32
        feeds = collect_feeds(fp32, ({k: v[i:i + step] for k, v in calib.items()} for i in range(0, n, step)))

    def convert(g: GraphSpec) -> GraphSpec:
        say(f"{precision}: {g.key}")
        src, rel = tmp / g.files["fp32"], naming.onnx_file(g.key, precision)
        if precision == "fp16":
            onnx2fp16(src, tmp / rel)
        else:
            onnx2int8(src, tmp / rel, FeedReader(feeds[g.key]))
        return replace(g, files={**g.files, precision: rel})

    return _map_graphs(bundle, convert, convert)


def _map_graphs(bundle: Bundle, body: Callable[[GraphSpec], GraphSpec], head: Callable[[GraphSpec], GraphSpec]) -> Bundle:
    """The bundle with ``body`` applied to every segment and the full graph, ``head`` to every exit head."""
    stages = tuple(replace(s, segment=body(s.segment),
                           exit=None if s.exit is None else replace(s.exit, graph=head(s.exit.graph)))
                   for s in bundle.stages)
    return replace(bundle, stages=stages, full=body(bundle.full))


def _add_int8_heads(bundle: Bundle, tmp: Path, say: Callable[[str], None]) -> Bundle:
    """Precision int8-heads: each exit head with int8 weights; segments and the full graph are the fp32 files."""
    (tmp / "onnx" / INT8_HEADS).mkdir()

    def same(g: GraphSpec) -> GraphSpec:
        return replace(g, files={**g.files, INT8_HEADS: g.files["fp32"]})

    def head(g: GraphSpec) -> GraphSpec:
        say(f"{INT8_HEADS}: {g.key}")
        rel = naming.onnx_file(g.key, INT8_HEADS)
        onnx2int8_weights(tmp / g.files["fp32"], tmp / rel)
        return replace(g, files={**g.files, INT8_HEADS: rel})

    return _map_graphs(bundle, same, head)


def _validate_fp32(bundle: Bundle, fp32: OrtBackend, modules: dict[str, torch.nn.Module], data: ExportData,
                   cfg: ExportConfig) -> ValidationReport:
    rows, failures = compare_files(bundle, modules, fp32, data.test, batches=(1, 5), tolerance=cfg.tolerance)
    reference, gaps = torch_record(bundle, modules, data.test)
    parity, _ = chain_parity(bundle, fp32, reference, gaps, data.test, cfg.tolerance)
    report = ValidationReport(cfg.target, True, cfg.tolerance, tuple(rows), tuple(failures),
                              max(r.max_abs_diff for r in rows), parity,
                              float((reference.predictions[:, -1] == data.test_labels).mean()))
    problems = [str(f) for f in failures]
    if not parity.equal:
        problems.append(f"chained ONNX Runtime predictions differ from torch on {list(parity.real_mismatches_per_head)} "
                        f"of {parity.n} test samples per head")
    if problems:
        raise ValidationError(f"{len(problems)} validation failure(s): " + "; ".join(problems[:5]) +
                              ("; ..." if len(problems) > 5 else "") + " (use --no-validate to keep the bundle anyway)")
    return report


def _validate_precision(bundle: Bundle, precision: str, fp32: OrtBackend, data: ExportData,
                        cfg: ExportConfig) -> PrecisionCheck:
    reference = record_all(bundle, fp32, data.test)
    report = precision_report(bundle, OrtBackend(bundle, precision), reference, data.test, data.test_labels)
    if -report.worst_accuracy_change > cfg.max_accuracy_drop:
        where = "at the final head" if report.worst_accuracy_change == report.accuracy_change else "at an exit head"
        raise ValidationError(f"{precision} loses {-100 * report.worst_accuracy_change:.1f} points of test accuracy {where} "
                              f"(allowed: {100 * cfg.max_accuracy_drop:.1f}); use --max-accuracy-drop or --no-validate")
    return report


def _provenance(run: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    import onnx
    import onnxruntime

    from runtimes.bundle import SCHEMA_VERSION

    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "export_settings": asdict(cfg),
        "versions": {**run.get("versions", {}), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "schema_version": SCHEMA_VERSION,
        "source": {k: run.get(k) for k in ("adapter", "model_class", "exits", "source_model", "data")},
        "train_config": run.get("train_config", {}),
    }
