"""``freedeploy bench``: the bundle against its monolithic graph, side by side in one process."""

from __future__ import annotations

from typing import Any, Callable

import click

from analysis import BURST
from freedeploy.cli.choices import BACKEND_CHOICES, PRECISION_CHOICES
from freedeploy.cli.output import emit_json, exit_name, note, table


def _batches(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected batch sizes such as 1,32, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter("batch sizes must be positive integers")
    return out


def _torch_fn(run_dir: str, threads: int | None) -> Callable | None:
    """Eager torch on the full model, when torch is installed (None otherwise: bench needs no torch)."""
    try:
        import torch
    except ImportError:
        return None
    from freedeploy.rundir import load_run

    model, _ = load_run(run_dir)
    if threads:
        torch.set_num_threads(threads)

    def go(x: dict) -> Any:
        with torch.inference_mode():
            return model.hf(**{k: torch.from_numpy(v) for k, v in x.items()}).logits.argmax(-1)
    return go


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--batch", "batches", default="1,32", show_default=True, callback=_batches,
              help="Batch sizes: 1 gives latency percentiles, larger ones throughput.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--device", help="cpu, cuda or cuda:N [default: cuda for TensorRT, else cpu]")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES))
@click.option("--threads", type=click.IntRange(1),
              help="ONNX Runtime intra-op threads, 1 to 4 per CPU [default: all cores, max 8].")
@click.option("--spin/--no-spin", default=True, show_default=True,
              help="ONNX Runtime CPU threads spin-wait between the operators of a run (they stop when it returns).")
@click.option("--runs", type=click.IntRange(10), default=200, show_default=True, help="Batch-1 calls per variant.")
@click.option("--burst", type=click.IntRange(1), default=BURST, show_default=True,
              help="Batch-1 calls per variant in a row, in each interleaved round: a frame loop runs one model "
                   "call after call, its weights in the caches; 1 makes every call follow another variant's.")
@click.option("--batch-runs", type=click.IntRange(5), default=30, show_default=True,
              help="Rounds per variant at each larger batch size.")
@click.option("--data", "data_spec", help="Data spec for real inputs [default: the bundle's own].")
@click.option("--split", default="test", show_default=True)
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Run dir: adds eager torch as a variant.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False),
              help="Write speedup_accuracy.png (a measured threshold sweep) and exit_histogram.png here.")
@click.option("--json", "as_json", is_flag=True)
def bench(bundle_dir: str, batches: list[int], backend: str, device: str | None, precision: str | None,
          threads: int | None, spin: bool, runs: int, burst: int, batch_runs: int, data_spec: str | None, split: str,
          run_dir: str | None,
          plot_dir: str | None, as_json: bool) -> None:
    """Latency and throughput of the early-exit chain against the monolithic graph."""
    from analysis.benchmark import cost_model, head_costs, latency, summarise, throughput
    from analysis.evaluation import bundle_split
    from runtimes import Generator, Runtime

    options: dict[str, Any] = {"threads": threads} if threads else {}
    if not spin:
        options["spinning"] = False
    rt = Runtime.load(bundle_dir, backend=backend, device=device, precision=precision, **options)
    if isinstance(rt, Generator):
        _bench_generative(rt, data_spec, split, runs, plot_dir, as_json)
        return
    data, idx = bundle_split(rt.bundle, data_spec, split)
    inputs = rt.encode([data.items[i] for i in idx])
    torch_fn = _torch_fn(run_dir, threads) if run_dir else None
    skipped = {"torch": "torch is not installed"} if run_dir and torch_fn is None else {}
    if skipped:
        note("torch is not installed: the eager torch variant is skipped")
    note(f"benchmarking {rt.calibration_key} on {len(idx)} real samples ({data.spec}, {split})")
    lat = latency(rt, inputs, runs=runs, torch_fn=torch_fn, burst=burst) if 1 in batches else None
    thr = {b: throughput(rt, inputs, b, runs=batch_runs, torch_fn=torch_fn) for b in batches if b > 1}
    if lat is None:
        lat = latency(rt, inputs, runs=20, torch_fn=torch_fn, burst=burst)
    labels = data.labels[idx]
    report = summarise(rt, inputs, lat, thr, labels)
    report["burst"] = burst
    report["heads"] = head_costs(rt, inputs)
    report.update(cost_model(report, rt.thresholds))
    if max(batches) > 1:
        report["heads_at_batch"] = {str(max(batches)): head_costs(rt, inputs, samples=8, batch=max(batches))}
    report.update(backend=rt.backend.describe(), thresholds=rt.thresholds, data={"spec": data.spec, "split": split},
                  skipped=skipped)
    if plot_dir:
        from pathlib import Path

        from analysis.plots import plot_all, threshold_sweep

        note("measuring a threshold sweep for the plot")
        report["sweep"] = threshold_sweep(rt, inputs, labels)
        report["plots"] = [str(p) for p in plot_all(Path(plot_dir), report["sweep"])]
    rt.close()
    if as_json:
        emit_json(report)
        return
    click.echo(bench_table(report))


def _bench_generative(rt: Any, data_spec: str | None, split: str, runs: int, plot_dir: str | None,
                      as_json: bool) -> None:
    """Generative bundles: ``runs`` rows of the split, each decoded by every variant."""
    from analysis.generation import bench_generation, generation_rows

    rows = generation_rows(rt, data_spec, split, limit=runs)
    note(f"benchmarking decoding on {rt.calibration_key}: {len(rows)} rows ({rows.spec}, {split}), batch 1, "
         "every variant on every row in a random order")
    report = bench_generation(rt, rows)
    if plot_dir:
        from pathlib import Path

        from analysis.generation import plot_generation

        note("measuring a threshold sweep for the plot")
        report["plots"] = [str(p) for p in plot_generation(rt, rows, Path(plot_dir))]
    rt.close()
    if as_json:
        emit_json(report)
        return
    click.echo(generative_bench_table(report))


def generative_bench_table(r: dict[str, Any]) -> str:
    rows = []
    for name, v in r["variants"].items():
        rows.append([name, v["decode_tokens_per_s"], v["decode_speedup"], v["tokens_per_s"], v["speedup"],
                     v["ms_per_sequence"]["mean"], v["ms_per_sequence"]["p50"], v["ms_per_sequence"]["p99"],
                     v["calls_per_token"], v["layers_per_token"] if v["layers_per_token"] is not None else float("nan"),
                     v["measured_over_predicted"] or float("nan"),
                     f"{v['identical_to_monolithic']}/{r['n'] * r['repeats']}"])
    th = ", ".join("off" if t is None else f"{t:.4f}" for t in r["thresholds"])
    lines = [f"batch-1 greedy decoding, {r['n']} rows x {r['repeats']}, variants interleaved per row "
             f"(early exit at {th})",
             table(["variant", "decode tok/s", "speed-up", "tok/s (with prefill)", "speed-up", "ms/seq mean", "p50",
                    "p99", "calls/token", "layers/token", "measured/predicted", "same text"], rows),
             f"prefill (encode + prompt, every mode): {r['variants']['monolithic']['prefill_ms']['mean']:.3f} ms mean",
             "layers/token: analytic work per generated token in decoder layers (weights' multiply-adds; exit blocks, "
             "LM heads and state fills counted); measured/predicted: decode time over the sum of each graph's own "
             "measured time per call"]
    ms = r["graph_ms"]
    lines.append("graph ms per call: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    cert = r.get("certificate")
    if cert and cert.get("delta") is not None:
        e = r["variants"]["early exit"]["quality"]
        lines.append(f"certificate: {cert['loss']} <= {100 * cert['delta']:g}% (epsilon {cert['epsilon']:g}); "
                     f"measured on these rows: {100 * e['sequence_disagreement']:.2f}% of sequences differ")
    else:
        lines.append("no certificate for this backend and precision: early exit ran at the bundle's thresholds")
    for p in r.get("plots", []):
        lines.append(f"wrote {p}")
    return "\n".join(lines)


def bench_table(r: dict[str, Any]) -> str:
    rows = [[name, s["mean"], s["p50"], s["p90"], s["p99"]] for name, s in r["batch1_ms"].items()]
    lines = ["batch 1 latency (ms), " + f"{next(iter(r['batch1_ms'].values()))['runs']} calls each, interleaved in "
             f"bursts of {r.get('burst', 1)}",
             table(["variant", "mean", "p50", "p90", "p99"], rows), "",
             f"measured speed-up vs monolithic: {r['measured_speedup_mean']:.2f}x (mean latency), "
             f"{r['measured_speedup_median']:.2f}x (median)",
             f"analytic speed-up {r['analytic_speedup']:.2f}x; measured/analytic {r['measured_over_analytic']:.2f}",
             f"predicted from each graph's measured time {r['expected_speedup']:.2f}x; measured/predicted "
             f"{r['measured_over_expected']:.2f} (the rest is what chaining costs)",
             f"chain with exits off vs monolithic (median): {r['no_exit_over_full_median']:.3f}x; "
             f"a sample that never exits costs {r['never_exits_over_full_mean']:.2f}x the monolithic model"]
    for variant, why in r.get("skipped", {}).items():
        lines.append(f"{variant} variant skipped: {why}")
    lines.append("exits taken on the timed samples: "
                 + ", ".join(f"{exit_name(k)} {100 * v:.1f}%" for k, v in r["exit_share"].items()))
    h = r.get("heads")
    if h:
        lines.append("exit heads at blocks " + ", ".join(map(str, r["exit_blocks"])) + " ("
                     + ", ".join(h["head_kind"]) + "): measured cost "
                     + ", ".join(f"{f:.2f}" for f in h["head_fraction_of_block"]) + " of a backbone block ("
                     + f"{h['block_ms']:.3f} ms); analytic " + ", ".join(f"{f:.2f}" for f in h["head_analytic_fraction"])
                     + f"; ceiling (everything leaves at the first exit) {h['ceiling_speedup']:.2f}x")
    for batch, hb in r.get("heads_at_batch", {}).items():
        lines.append(f"exit heads at batch {batch}: measured cost "
                     + ", ".join(f"{f:.2f}" for f in hb["head_fraction_of_block"]) + " of a backbone block")
    if "accuracy" in r:
        lines.append(f"accuracy on the timed samples: early exit {100 * r['accuracy']:.2f}%, full model "
                     f"{100 * r['full_accuracy']:.2f}%")
    for p in r.get("plots", []):
        lines.append(f"wrote {p}")
    for batch, t in r["throughput"].items():
        lines.append("")
        lines.append(f"batch {batch} throughput (samples/s, median of {r['throughput_runs']} interleaved runs)")
        lines.append(table(["variant", "samples/s"], [[k, v] for k, v in t["samples_per_s"].items()]))
        lines.append(f"speed-up vs monolithic: per_sample {t['per_sample_speedup']:.2f}x, batch policy "
                     f"{t['batch_policy_speedup']:.2f}x; exits off {t['no_exit_over_full_median']:.3f}x the monolithic time")
    return "\n".join(lines)
