"""``freedeploy export``, ``freedeploy build`` and ``freedeploy inspect``."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from exporters.config import HEAD_WEIGHTS, TARGETS, BuildDefaults, ExportConfig
from freedeploy.cli.choices import CONFIDENCE_CHOICES, TRT_TARGETS
from freedeploy.cli.output import emit_json, note, table
from freedeploy.settings import AUTO, EXIT_HEADS

if TYPE_CHECKING:
    from runtimes.records import ValidationReport


def export_default(name: str) -> Any:
    """``ExportConfig``'s default for field ``name``."""
    return ExportConfig.__dataclass_fields__[name].default


def build_default(name: str) -> Any:
    """``BuildDefaults``' default for ``name``, which ``build_engines`` uses too."""
    return BuildDefaults.__dataclass_fields__[name].default


class TargetType(click.ParamType):
    """``--target`` with a suggestion for a misspelt value."""

    name = "target"

    def __init__(self, choices: tuple[str, ...] = tuple(TARGETS)) -> None:
        self.choices = choices

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if value in self.choices:
            return value
        close = difflib.get_close_matches(str(value), self.choices, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        self.fail(f"{value!r} is not a target: choose one of {', '.join(self.choices)}{hint}", param, ctx)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--target", type=TargetType(), default=export_default("target"), show_default=True,
              help=f"onnx | {' | '.join(TRT_TARGETS)} (precision goes into the ONNX; engines are built where "
                   "TensorRT and a GPU exist).")
@click.option("--out", type=click.Path(file_okay=False), help="Bundle dir to write [default: bundles/<run name>].")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=export_default("max_batch"), show_default=True)
@click.option("--opt-batch", type=click.IntRange(1, 4096), default=export_default("opt_batch"), show_default=True,
              help="Batch size TensorRT tunes for (1: the camera case).")
@click.option("--opset", type=click.IntRange(17, 22), default=export_default("opset"), show_default=True)
@click.option("--calib-samples", type=click.IntRange(1), default=export_default("calib_samples"), show_default=True,
              help="Training samples that calibrate int8 activations.")
@click.option("--confidence", type=click.Choice(CONFIDENCE_CHOICES), default=export_default("confidence"),
              show_default=True)
@click.option("--exit-head", type=click.Choice((AUTO, *EXIT_HEADS)), default=export_default("exit_head"),
              show_default=True,
              help="auto: exit graphs evaluate their block for the pooled [CLS] token only where the model pools it "
                   "(same results, a fraction of the cost); full-block keeps the whole block.")
@click.option("--head-weights", type=click.Choice(HEAD_WEIGHTS), default=export_default("head_weights"),
              show_default=True,
              help="int8: also write the exit heads with int8 weights (precision int8-heads, validated against fp32; "
                   "ONNX Runtime uses it by default). At batch 1 a head's time is reading its weights.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 1), default=export_default("max_accuracy_drop"),
              show_default=True,
              help="fp16 / int8 / int8-heads: allowed test-accuracy loss against fp32, at any head, before the "
                   "export fails.")
@click.option("--no-validate", is_flag=True, help="Skip validation against torch (not recommended).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True)
def export(run_dir: str, target: str, out: str | None, max_batch: int, opt_batch: int, opset: int,
           calib_samples: int, confidence: str, exit_head: str, head_weights: str, max_accuracy_drop: float,
           no_validate: bool, overwrite: bool, as_json: bool) -> None:
    """Export a run dir to a bundle: every segment and exit head as ONNX, validated against torch."""
    from freedeploy.cli.export_run import export_run

    out_path = Path(out or f"bundles/{Path(run_dir).name}")
    result = export_run(Path(run_dir), out_path, target=target, max_batch=max_batch, opt_batch=opt_batch,
                        opset=opset, calib_samples=calib_samples, confidence=confidence, exit_head=exit_head,
                        head_weights=head_weights, max_accuracy_drop=max_accuracy_drop, validate=not no_validate, overwrite=overwrite,
                        progress=None if as_json else note)
    build = _maybe_build(out_path, target, as_json)
    if as_json:
        emit_json({"out": str(out_path), "target": target, "seconds": round(result.seconds, 1),
                   "timings": result.timings, "validation": result.validation.to_dict(), "engines": build})
        return
    click.echo(_export_summary(result.validation))
    click.echo(f"\nwrote {out_path} in {result.seconds:.0f} s")
    click.echo(f"next: freedeploy inspect {out_path}")


def _maybe_build(bundle_dir: Path, target: str, quiet: bool) -> dict[str, Any] | None:
    if not target.startswith("trt-"):
        return None
    from exporters.tensorrt import build_engines, detect_device
    from runtimes.errors import BackendUnavailableError

    precision = target.split("-", 1)[1]
    try:
        detect_device()
    except BackendUnavailableError as exc:
        if not quiet:
            note(f"TensorRT engines not built here ({exc})")
            note(f"build them on the device: freedeploy build {bundle_dir} --target {target}")
        return {"built": False, "reason": str(exc), "command": f"freedeploy build {bundle_dir} --target {target}"}
    res = build_engines(bundle_dir, precision, progress=None if quiet else _progress_line)
    return {"built": True, "key": res.key, "directory": str(res.directory), "seconds": res.seconds}


def _progress_line(message: str, fraction: float) -> None:
    note(f"  [{100 * fraction:5.1f}%] {message}")


def _export_summary(v: "ValidationReport") -> str:
    if not v.validated:
        return "validation skipped (--no-validate)"
    worst: dict[str, float] = {}
    for row in v.files:
        worst[row.file] = max(worst.get(row.file, 0.0), row.max_abs_diff)
    batches = " and ".join(str(b) for b in sorted({r.batch for r in v.files}))
    pasts = sorted({r.past for r in v.files if r.past is not None})
    at = f"batch {batches}" + (f", past {' and '.join(map(str, pasts))}" if pasts else "")
    lines = [table(["file", f"max abs diff vs torch ({at})"], [[f, f"{d:.2e}"] for f, d in worst.items()])]
    p = v.chain_parity
    if p is not None:
        lines.append(f"chained ONNX Runtime vs torch on {p.n} test samples: "
                     f"{'identical predictions' if p.equal else 'MISMATCH'} (per head: {list(p.mismatches_per_head)})")
    d = v.decoding
    if d is not None:
        lines.append(f"greedy decoding, chained ONNX Runtime vs torch on {d.sequences} test samples: exits off "
                     f"{d.sequences - d.mismatched_exits_off} identical ({d.tokens_exits_off} tokens), every exit on at "
                     f"{d.threshold:g} {d.sequences - d.mismatched_exits_on} identical ({d.tokens_exits_on} tokens; "
                     "tokens per exit block: " + ", ".join(f"{k}: {n}" for k, n in d.exits_taken.items()) + f"; {d.kv})")
        if d.tokens_propagate is not None:
            lines.append(f"  with state propagation: {d.sequences - d.mismatched_propagate} identical "
                         f"({d.tokens_propagate} tokens)")
    for r in (v.precision, v.head_weights):
        if r is None:
            continue
        lines.append(f"{r.precision} vs fp32: exit-decision agreement at threshold {r.reference_threshold}: "
                     + ", ".join(f"{100 * a:.2f}%" for a in r.exit_decision_agreement)
                     + f"; test accuracy {100 * r.final_accuracy:.2f}% ({100 * r.accuracy_change:+.2f} points)"
                     + (f", exit heads {', '.join(f'{100 * c:+.2f}' for c in r.exit_accuracy_change)} points"
                        if r.exit_accuracy_change else ""))
    return "\n".join(lines)


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--target", type=TargetType(TRT_TARGETS), default="trt-fp16", show_default=True)
@click.option("--workspace-gb", type=click.FloatRange(0.1), default=build_default("workspace_gb"), show_default=True)
@click.option("--opt-level", type=click.IntRange(0, 5), default=build_default("optimization_level"),
              show_default=True,
              help="TensorRT builder optimization level (lower builds faster, e.g. on Jetson).")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def build(bundle_dir: str, target: str, workspace_gb: float, opt_level: int, overwrite: bool, as_json: bool) -> None:
    """Build TensorRT engines for a bundle on this machine (needs TensorRT and a GPU, not torch)."""
    from exporters.tensorrt import build_engines

    res = build_engines(Path(bundle_dir), target.split("-", 1)[1], workspace_gb=workspace_gb,
                        optimization_level=opt_level, overwrite=overwrite,
                        progress=None if as_json else _progress_line)
    info = {"key": res.key, "directory": str(res.directory), "plans": {k: str(v) for k, v in res.plans.items()},
            "seconds": round(res.seconds, 1)}
    if as_json:
        emit_json(info)
        return
    click.echo(f"built {len(res.plans)} engines into {res.directory} in {res.seconds:.0f} s")
    click.echo(f"next: freedeploy calibrate {bundle_dir} --backend tensorrt")
