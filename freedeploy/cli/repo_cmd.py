"""``freedeploy triton-repo``: a bundle as models of a Triton model repository, for a plain
``tritonserver`` (NGC containers, Jetson, DeepStream) where ``freedeploy serve`` cannot run."""

from __future__ import annotations

import click

from freedeploy.cli.choices import BACKEND_CHOICES, PRECISION_CHOICES
from freedeploy.cli.output import emit_json, table
from freedeploy.cli.run_cmd import parse_thresholds
from serving.protocol import DEFAULT_QUEUE_DELAY_US


@click.command("triton-repo")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The model repository (created if missing; other models in it are left alone).")
@click.option("--name", help="Model name [default: the bundle's, in letters, digits, '_' and '-']; the "
                             "preprocessed-input model is NAME_tensors.")
@click.option("--max-batch", type=click.IntRange(1), help="Triton's max_batch_size [default: the bundle's maximum].")
@click.option("--queue-delay-us", type=click.IntRange(0), default=DEFAULT_QUEUE_DELAY_US, show_default=True,
              help="How long the dynamic batcher waits for more requests to join a batch.")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="Model instances per model (batches run concurrently, each with its own runtime).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="What the server's runtime runs on (auto: TensorRT where the bundle has engines for its GPU).")
@click.option("--device", help="cpu, cuda or cuda:N for the server's runtime [default: the runtime's].")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), help="[default: fp16 on TensorRT, else fp32]")
@click.option("--thresholds", callback=parse_thresholds,
              help="Override the bundle's thresholds, e.g. 0.9,0.9,off [default: the bundle's own].")
@click.option("--no-batching", is_flag=True, help="No dynamic batching: every request runs as it came.")
@click.option("--no-early-exit", is_flag=True, help="Serve the monolithic graph (the baseline).")
@click.option("--overwrite", is_flag=True, help="Replace models of this name that freedeploy wrote.")
@click.option("--json", "as_json", is_flag=True)
def triton_repo(bundle_dir: str, out: str, name: str | None, max_batch: int | None, queue_delay_us: int,
                instances: int, backend: str, device: str | None, precision: str | None,
                thresholds: list[float | None] | None, no_batching: bool, no_early_exit: bool, overwrite: bool,
                as_json: bool) -> None:
    """Write BUNDLE_DIR as two models (raw inputs, preprocessed inputs) into a Triton model repository,
    with a copy of the bundle and of the runtime: the server's Python needs only numpy, onnxruntime,
    and Pillow or tokenizers."""
    from serving.repository import write_repository

    summary = write_repository(bundle_dir, out, name=name, max_batch=max_batch, queue_delay_us=queue_delay_us,
                               instances=instances, early_exit=not no_early_exit, overwrite=overwrite,
                               thresholds=thresholds, backend=backend, batching=not no_batching, device=device,
                               precision=precision)
    if as_json:
        emit_json(summary)
        return
    rows = [[summary["names"][mode], mode, ", ".join(f"{p['name']} {p['datatype']} {p['shape']}" for p in ports)]
            for mode, ports in summary["inputs"].items()]
    click.echo(table(["model", "mode", "inputs"], rows))
    batching = "no dynamic batching" if summary["queue_delay_us"] is None else \
        f"queue delay {summary['queue_delay_us']} us"
    click.echo(f"\nwrote {summary['models']['raw']} and {summary['models']['tensors']} (max batch "
               f"{summary['max_batch']}, {batching}, {summary['instances']} instance(s), early exit "
               f"{'on' if summary['early_exit'] else 'off'})")
    click.echo(f"the server's Python needs: pip install {' '.join(summary['requires'])}")
    click.echo(f"next: {summary['command']}")
