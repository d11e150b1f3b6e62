"""``freedeploy calibrate`` and ``freedeploy eval``: no torch needed."""

from __future__ import annotations

from typing import Any

import click

from freedeploy.cli.choices import BACKEND_CHOICES, PRECISION_CHOICES
from freedeploy.cli.output import emit_json, exit_name, note, table


def _runtime_options(f: Any) -> Any:
    f = click.option("--precision", type=click.Choice(PRECISION_CHOICES),
                     help="[default: fp16 on TensorRT, else fp32]")(f)
    f = click.option("--device", help="cpu, cuda or cuda:N [default: cuda for TensorRT, else cpu]")(f)
    f = click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
                     show_default=True)(f)
    f = click.option("--split", default=None, help="train | val | test | all")(f)
    f = click.option("--data", "data_spec", help="Data spec [default: the one the model was trained on].")(f)
    return f


def _load(rt: Any, data_spec: str | None, split: str):
    from analysis.evaluation import bundle_split

    data, idx = bundle_split(rt.bundle, data_spec, split)
    note(f"{len(idx)} samples from {data.spec} ({split}) on {rt.calibration_key}")
    inputs = rt.encode([data.items[i] for i in idx])
    return data, idx, inputs


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@_runtime_options
@click.option("--max-disagreement", "delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Tolerance: the most the early-exit answers may disagree with the full model "
              "(or, with --labels, lose accuracy).")
@click.option("--epsilon", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Failure probability of the guarantee.")
@click.option("--labels", "use_labels", is_flag=True, help="Certify the accuracy drop instead of the disagreement.")
@click.option("--latency-budget-ms", type=click.FloatRange(0, min_open=True),
              help="Instead of a tolerance: the most accurate thresholds whose expected latency fits, with a bound.")
@click.option("--paths", default="shared", show_default=True,
              help="Threshold shapes to search (shared, strict-early; comma-separated). More paths split epsilon, "
              "except with --select-exits, which picks one on its selection split.")
@click.option("--select-exits/--all-exits", default=None,
              help="Also switch off exits that do not pay for their heads: choose the exits kept and the path on a "
              "random part of the calibration data and certify them on the rest, which the choice never saw. Off "
              "by default for classifiers (fewer samples certify, so the tightest certifiable tolerance rises, "
              "reported); on by default for generative bundles, whose exits are whole blocks run per token.")
@click.option("--level", type=click.Choice(["sequence", "token"]), default=None,
              help="Generative bundles: bound the share of generated sequences that differ from the full model's "
              "greedy text, or the share of tokens  [default: sequence].")
@click.option("--rows", "max_rows", type=click.IntRange(1),
              help="Generative bundles: decode at most this many rows of the split (a seeded subset) [default: all].")
@click.option("--selection-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="With --select-exits: the share of samples that choose the exits [default: 0.3].")
@click.option("--selection-seed", type=click.IntRange(min=0),
              help="With --select-exits: seed of the random split [default: 0].")
@click.option("--json", "as_json", is_flag=True)
def calibrate(bundle_dir: str, data_spec: str | None, split: str | None, backend: str, device: str | None,
              precision: str | None, delta: float, epsilon: float, use_labels: bool,
              latency_budget_ms: float | None, paths: str, select_exits: bool | None, selection_fraction: float | None,
              selection_seed: int | None, level: str | None, max_rows: int | None, as_json: bool) -> None:
    """Certified exit thresholds (Learn-then-Test), written into the bundle with their certificate."""
    from calibration.calibrate import calibrate_runtime
    from runtimes import Generator, Runtime

    rt = Runtime.load(bundle_dir, backend=backend, device=device, precision=precision)
    if isinstance(rt, Generator):
        if use_labels or latency_budget_ms is not None or paths != "shared":
            raise click.UsageError("generative bundles certify agreement with the full model's greedy text: "
                                   "--labels, --latency-budget-ms and --paths apply to classifiers")
        _calibrate_generative(rt, bundle_dir, data_spec, split or "val", delta, epsilon, level or "sequence",
                              True if select_exits is None else select_exits, selection_fraction, selection_seed,
                              max_rows, as_json)
        return
    if level is not None or max_rows is not None:
        raise click.UsageError("--level and --rows apply to generative bundles")
    select_exits = bool(select_exits)

    if not select_exits and (selection_fraction is not None or selection_seed is not None):
        raise click.UsageError("--selection-fraction and --selection-seed apply to --select-exits only")
    if select_exits and latency_budget_ms is not None:
        raise click.UsageError("--select-exits certifies a tolerance; it does not combine with --latency-budget-ms")
    split = split or "val"
    data, idx, inputs = _load(rt, data_spec, split)
    certificate = calibrate_runtime(rt, inputs, delta, epsilon, labels=data.labels[idx] if use_labels else None,
                             latency_budget_ms=latency_budget_ms, data={"spec": data.spec, "split": split},
                             paths=tuple(p.strip() for p in paths.split(",") if p.strip()),
                             select_exits=select_exits,
                             selection_fraction=0.3 if selection_fraction is None else selection_fraction,
                             selection_seed=0 if selection_seed is None else selection_seed)
    rt.close()
    cert = _save(bundle_dir, certificate, as_json)
    if cert is None:
        return
    th = ", ".join("off" if t is None else f"{t:.4f}" for t in cert["thresholds"])
    click.echo(f"thresholds: {th}  (path {cert['path']}, {cert['key']})")
    if cert["exit_selection"] is not None:
        click.echo(selection_summary(cert))
    if cert["delta"] is not None:
        click.echo(f"certificate: {cert['loss']} <= {100 * cert['delta']:g}% with probability >= "
                   f"{1 - cert['epsilon']:g} (n = {cert['n']}, calibration risk {100 * cert['calibration_risk']:.2f}%, "
                   f"p = {cert['pvalue']:.3g})")
    else:
        click.echo(f"latency budget {cert['latency_budget_ms']:g} ms: {cert['loss']} <= "
                   f"{100 * cert['risk_upper_bound']:.2f}% with probability >= {1 - cert['epsilon']:g}")
    click.echo(f"expected latency {cert['expected_latency_ms']:.3f} ms per sample at batch 1, expected speed-up "
               f"{cert['expected_speedup']:.2f}x over the monolithic graph; exits taken: "
               + ", ".join(f"{exit_name(k)}: {100 * h:.1f}%" for k, h in cert["exit_share"].items()))
    if cert["expected_speedup"] < 1.0:
        click.echo("note: at these thresholds early exit is expected to be slower than the monolithic graph here "
                   "(the heads cost more than the exits save); run with every exit off (`--thresholds off,...` "
                   "or `rt.thresholds = [None, ...]`) or train exits that fire more often")
    click.echo(f"next: freedeploy eval {bundle_dir}")


def _save(bundle_dir: str, certificate: Any, as_json: bool) -> dict[str, Any] | None:
    """Write the certificate into the bundle; with --json print it and return None."""
    from calibration.calibrate import write_calibration

    write_calibration(bundle_dir, certificate)
    cert = certificate.to_dict()
    if as_json:
        emit_json(cert)
        return None
    return cert


def _calibrate_generative(rt: Any, bundle_dir: str, data_spec: str | None, split: str, delta: float, epsilon: float,
                          level: str, select_exits: bool, selection_fraction: float | None, selection_seed: int | None,
                          max_rows: int | None, as_json: bool) -> None:
    from analysis.generation import generation_rows
    from calibration.generative import certify_generation

    if not select_exits and (selection_fraction is not None or selection_seed is not None):
        raise click.UsageError("--selection-fraction and --selection-seed apply to --select-exits only")
    rows = generation_rows(rt, data_spec, split, limit=max_rows)
    note(f"{len(rows)} rows from {rows.spec} ({split}) on {rt.calibration_key}")
    certificate = certify_generation(rt, rows, delta, epsilon, level, select_exits,
                                     0.3 if selection_fraction is None else selection_fraction,
                                     0 if selection_seed is None else selection_seed, say=note)
    rt.close()
    cert = _save(bundle_dir, certificate, as_json)
    if cert is None:
        return
    click.echo(generative_calibration_summary(cert))
    click.echo(f"next: freedeploy eval {bundle_dir}")


def generative_calibration_summary(cert: dict[str, Any]) -> str:
    th = ", ".join("off" if t is None else f"{t:.4f}" for t in cert["thresholds"])
    lines = [f"thresholds: {th}  ({cert['key']})"]
    if cert.get("exit_selection") is not None:
        lines.append(selection_summary(cert))
    lines.append(f"certificate: {cert['loss']} <= {100 * cert['delta']:g}% with probability >= {1 - cert['epsilon']:g} "
                 f"(n = {cert['n']}, calibration risk {100 * cert['calibration_risk']:.2f}%, p = {cert['pvalue']:.3g})")
    lines.append(f"predicted decode time {cert['expected_latency_ms']:.3f} ms per token at batch 1, "
                 f"{cert['expected_speedup']:.2f}x the monolithic decode step; tokens leaving at: "
                 + ", ".join(f"{exit_name(k)}: {100 * h:.1f}%" for k, h in cert["exit_share"].items()))
    s = cert.get("speculative")
    if s is not None:
        lines.append(f"self-speculation: drafts from the exit at block {s['draft_block']}, {s['draft_len']} per "
                     f"verification ({100 * s['acceptance']:.1f}% accepted; predicted {s['predicted_ms_per_token']:.3f} "
                     f"ms per token, monolithic {s['monolithic_ms_per_token']:.3f})")
    return "\n".join(lines)


def selection_summary(cert: dict[str, Any]) -> str:
    """What ``--select-exits`` chose, on how many samples, and what the split cost."""
    s = cert["exit_selection"]
    return (f"exits kept: blocks {_blocks(s['exits_on'])}; off: {_blocks(s['exits_off'])}  (chosen on "
            f"{s['n_selection']} samples, seed {s['seed']}; certified on the other {s['n_certification']})\n"
            f"the split's cost: the tightest certifiable tolerance is {100 * cert['tightest_tolerance']:.2f}% with "
            f"{s['n_certification']} certification samples, {100 * s['tightest_tolerance_without_split']:.2f}% "
            f"with all {cert['n']}")


def _blocks(blocks: list[int]) -> str:
    return ", ".join(str(b) for b in blocks) or "none"


@click.command("eval")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@_runtime_options
@click.option("--json", "as_json", is_flag=True)
def eval_(bundle_dir: str, data_spec: str | None, split: str | None, backend: str, device: str | None,
          precision: str | None, as_json: bool) -> None:
    """Accuracy, agreement with the full model, exits and analytic speed-up at the bundle's thresholds."""
    from analysis.evaluation import evaluate
    from runtimes import Generator, Runtime

    split = split or "test"
    rt = Runtime.load(bundle_dir, backend=backend, device=device, precision=precision)
    if isinstance(rt, Generator):
        from analysis.generation import evaluate_generation, generation_rows

        rows = generation_rows(rt, data_spec, split)
        note(f"{len(rows)} rows from {rows.spec} ({split}) on {rt.calibration_key}: decoding each in three modes")
        m = evaluate_generation(rt, rows)
        rt.close()
        if as_json:
            emit_json(m)
            return
        click.echo(generative_eval_summary(m))
        return
    data, idx, inputs = _load(rt, data_spec, split)
    m = evaluate(rt, inputs, data.labels[idx])
    m["data"] = {"spec": data.spec, "split": split}
    if as_json:
        emit_json(m)
        return
    click.echo(eval_summary(m))


def generative_eval_summary(m: dict[str, Any]) -> str:
    th = ", ".join("off" if t is None else f"{t:.4f}" for t in m["thresholds"])
    d = m["draft"]
    rows = []
    for name, mode in (("full model", "full"), (f"early exit ({th})", "exit"),
                       (f"speculative (exit {d['block']}, {d['length']} drafts)", "speculative")):
        q = m[mode]
        rows.append([name, q["sequence_agreement"], q["token_agreement"], q.get("token_accuracy", float("nan")),
                     q.get("exact_match", float("nan")), q["mean_exit_block"]])
    lines = [f"{m['n']} rows ({m['data']['spec']}, {m['data']['split']}), greedy decoding at batch 1",
             table(["mode", "sequence agreement", "token agreement", "token accuracy", "exact match", "mean exit block"],
                   rows)]
    cert = m["certificate"]
    if cert is None:
        lines.append("certificate: none for this backend and precision (run freedeploy calibrate)")
    else:
        lines.append(f"certificate: {cert['loss']} <= {100 * cert['delta']:g}% with probability >= "
                     f"{1 - cert['epsilon']:g} (n = {cert['n']}); measured here: "
                     f"{100 * m['exit']['sequence_disagreement']:.2f}% of sequences, "
                     f"{100 * (1 - m['exit']['token_agreement']):.2f}% of tokens")
    return "\n".join(lines)


def eval_summary(m: dict[str, Any]) -> str:
    th = ", ".join("off" if t is None else f"{t:.4f}" for t in m["thresholds"])
    lines = [f"{m['n']} samples, thresholds {th}",
             f"early-exit accuracy {100 * m['accuracy']:.2f}%  (full model {100 * m['full_accuracy']:.2f}%), "
             f"disagreement with the full model {100 * m['disagreement_with_full']:.2f}%",
             f"analytic speed-up {m['analytic_speedup']:.2f}x (blocks run, exit heads counted), "
             f"overthinking rate {100 * m['overthinking_rate']:.2f}%"]
    rows = [[e["block"], e["accuracy"], e["agreement"]] for e in m["per_exit"]]
    lines.append(table(["exit after block", "accuracy (all samples)", "agreement with final"], rows))
    lines.append("exits taken: " + ", ".join(f"{exit_name(k)}: {v}" for k, v in m["exit_histogram"].items()))
    cert = m["certificate"]
    if cert is None:
        lines.append("certificate: none for this backend and precision (run freedeploy calibrate)")
    elif cert.get("delta") is not None:
        measured = m["accuracy_drop"] if cert["mode"] == "labels" else m["disagreement_with_full"]
        split = cert.get("exit_selection")
        n = f"{cert['n']}" if split is None else (f"{cert['n']}: {split['n_selection']} chose the exits, "
                                                  f"{split['n_certification']} certified")
        lines.append(f"certificate: {cert['loss']} <= {100 * cert['delta']:g}% with probability >= "
                     f"{1 - cert['epsilon']:g} (n = {n}); measured here: {100 * measured:.2f}%")
    else:
        lines.append(f"certificate: latency budget {cert['latency_budget_ms']:g} ms, risk bound "
                     f"{100 * cert['risk_upper_bound']:.2f}%")
    return "\n".join(lines)
