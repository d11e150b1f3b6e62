"""``freedeploy inspect``: what a bundle holds, and whether it runs here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from freedeploy.cli.output import emit_json, table


def describe(bundle_dir: Path) -> dict[str, Any]:
    from runtimes.bundle import load_bundle
    from runtimes.records import VALIDATION_FILE, ValidationReport, read_json_record

    b = load_bundle(bundle_dir)
    stages = []
    for s in b.stages:
        row = {"stage": s.index, "blocks": list(s.blocks), "segment": dict(s.segment.files),
               "segment_inputs": [(t.name, t.dtype, list(t.shape)) for t in s.segment.inputs],
               "segment_outputs": [(t.name, t.dtype, list(t.shape)) for t in s.segment.outputs]}
        if s.exit is not None:
            row.update(exit_block=s.exit.block, exit=dict(s.exit.graph.files), confidence=s.exit.confidence,
                       threshold=s.exit.threshold)
        stages.append(row)
    validation = None
    if (bundle_dir / VALIDATION_FILE).is_file():
        v = read_json_record(ValidationReport, bundle_dir / VALIDATION_FILE).to_dict()
        per_file: dict[str, float] = {}
        for f in v.get("files", []):
            per_file[f["file"]] = max(per_file.get(f["file"], 0.0), float(f["max_abs_diff"]))
        validation = {"validated": v.get("validated"), "max_abs_diff": v.get("max_abs_diff"),
                      "tolerance": v.get("tolerance"), "per_file": per_file,
                      "chain_parity": (v.get("chain_parity") or {}).get("equal"), "precision": v.get("precision"),
                      "head_weights": v.get("head_weights"), "decoding": v.get("decoding")}
    # the head's facts, its graphs apart (they are listed with the stages): a classifier's labels, a decoder's tokens
    facts = {k: v for k, v in vars(b.head).items() if k not in ("encode", "prefill", "fills", "task")}
    return {"name": b.name, "schema_version": b.schema_version, "file_schema_version": b.loaded_version,
            "labels": list(facts.pop("labels", ())),
            "preprocess": b.preprocess.to_dict(), "inputs": [(t.name, t.dtype, list(t.shape)) for t in b.inputs],
            "batch": vars(b.batch), "num_blocks": b.num_blocks, "precisions": list(b.precisions),
            "stages": stages, "files": len(b.files), "task": b.task,
            "decoder": facts or None,
            "calibration": {k: c.to_dict() for k, c in (b.calibration or {}).items()} or None, "validation": validation,
            "engines": _engines(bundle_dir)}


def _engines(bundle_dir: Path) -> list[dict[str, Any]]:
    from exporters.tensorrt import detect_device, list_engine_sets
    from runtimes.errors import BackendUnavailableError

    try:
        device = detect_device()
    except BackendUnavailableError:
        device = None
    return list_engine_sets(bundle_dir, device)


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle_dir: str, as_json: bool) -> None:
    """Show a bundle's stages, files, shapes, thresholds, validation and engine sets."""
    info = describe(Path(bundle_dir))
    if as_json:
        emit_json(info)
        return
    migrated = info["file_schema_version"] != info["schema_version"]
    schema = f"schema {info['file_schema_version']}, read as {info['schema_version']}" if migrated else \
        f"schema {info['schema_version']}"
    d = info["decoder"]
    what = (f"a decoder: vocabulary {d['vocab_size']}, {d['num_query_tokens']} image tokens, "
            f"{d['max_positions']} positions" if d else f"{len(info['labels'])} classes")
    click.echo(f"bundle {info['name']} ({schema}, {info['task']}): {info['num_blocks']} blocks, "
               f"{what}, precisions {', '.join(info['precisions'])}, "
               f"batch {info['batch']['min']}..{info['batch']['max']} (opt {info['batch']['opt']})")
    click.echo("inputs: " + ", ".join(f"{n} {d} {s}" for n, d, s in info["inputs"]))
    rows = [[s["stage"], f"{s['blocks'][0]}..{s['blocks'][1]}", s.get("exit_block", "final"),
             s.get("confidence", "max_softmax"), "off" if s.get("threshold", 1) is None else s.get("threshold", "-")]
            for s in info["stages"]]
    click.echo(table(["stage", "blocks", "exit after block", "confidence", "threshold"], rows))
    v = info["validation"]
    if v and v["validated"]:
        click.echo(table(["file", "max abs diff vs torch"], [[f, f"{d:.3g}"] for f, d in v["per_file"].items()]))
        parity = "" if v["chain_parity"] is None else f", chained predictions equal torch: {v['chain_parity']}"
        click.echo(f"validation: max abs diff {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:g}){parity}")
    elif v:
        click.echo("validation: skipped at export")
    for p in ((v or {}).get("precision"), (v or {}).get("head_weights")):
        if not p:
            continue
        pct = lambda xs: " / ".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
        blocks = " / ".join(str(s["exit_block"]) for s in info["stages"] if "exit_block" in s)
        click.echo(f"{p['precision']} vs fp32 (test split, exits at blocks {blocks}, then the final head): "
                   f"exit decisions agree {pct(p['exit_decision_agreement'])} % "
                   f"at threshold {p['reference_threshold']:g}, predictions {pct(p['prediction_agreement'])} %, "
                   f"accuracy change {100 * p['accuracy_change']:+.2f} points"
                   + (" (exit heads " + " / ".join(f"{100 * x:+.2f}" for x in p["exit_accuracy_change"]) + " points)" if p.get("exit_accuracy_change") else ""))
    dec = (v or {}).get("decoding")
    if dec:
        click.echo(f"greedy decoding, chained ONNX vs torch on {dec['sequences']} test samples: exits off "
                   f"{dec['sequences'] - dec['mismatched_exits_off']} identical ({dec['tokens_exits_off']} tokens); "
                   f"every exit on at {dec['threshold']:g}: {dec['sequences'] - dec['mismatched_exits_on']} identical "
                   f"({dec['tokens_exits_on']} tokens)")
    cal = info["calibration"]
    if not cal:
        click.echo("calibration: none (every exit is off until `freedeploy calibrate`)")
    for key, c in (cal or {}).items():
        th = ", ".join("off" if t is None else f"{t:.4f}" for t in c.get("thresholds", []))
        bound = (f"{c['loss']} <= {100 * c['delta']:g}% with probability >= {1 - c['epsilon']:g}"
                 if c.get("delta") is not None else f"latency budget {c.get('latency_budget_ms')} ms")
        click.echo(f"calibration {key}: thresholds {th}; {bound} (n = {c.get('n')}, {c.get('data', {}).get('split')} "
                   f"split, {c.get('calibrated', '?')})")
    engines = info["engines"]
    if not engines:
        click.echo("engines: none (build with `freedeploy build BUNDLE --target trt-fp16` on the device)")
    for e in engines:
        click.echo(f"engines: {e.get('key')} ({'matches this machine' if e.get('matches') else 'not for this machine'})")
