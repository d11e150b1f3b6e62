"""``freedeploy serve``: a bundle behind NVIDIA Triton Inference Server (through PyTriton). No torch."""

from __future__ import annotations

import json

import click

from freedeploy.cli.choices import BACKEND_CHOICES, PRECISION_CHOICES
from freedeploy.cli.output import note
from freedeploy.cli.run_cmd import parse_thresholds
from serving.protocol import DEFAULT_QUEUE_DELAY_US

ENGINES = ("tritonserver", "pytriton")  # serving.server.ENGINES, without importing it for --help


@click.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--name", help="Triton model name [default: the bundle's name]; NAME_tensors serves the model inputs.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on (127.0.0.1: this box only).")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), help="Largest dynamic batch [default: the bundle's max batch].")
@click.option("--queue-delay-us", type=click.IntRange(0), default=DEFAULT_QUEUE_DELAY_US, show_default=True,
              help="How long the first request of a batch waits for others, in microseconds.")
@click.option("--no-batching", is_flag=True, help="Run every request as it came (no dynamic batching).")
@click.option("--no-early-exit", is_flag=True, help="Answer with the monolithic graph (the baseline).")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="Model instances: batches run at once, sharing one runtime.")
@click.option("--engine", type=click.Choice(ENGINES), default="tritonserver", show_default=True,
              help="tritonserver: Triton's server runs the runtime in its Python backend (measured twice the "
                   "throughput); pytriton: Triton hands batches to this process through PyTriton's proxy.")
@click.option("--thresholds", callback=parse_thresholds, help="Override the bundle's thresholds, e.g. 0.9,0.9,off.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--device", help="cpu, cuda or cuda:N [default: cuda for TensorRT, else cpu]")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), help="[default: fp16 on TensorRT, else fp32]")
@click.option("--json", "as_json", is_flag=True,
              help="When ready, one JSON line on stdout: endpoints, models and settings (the same line again at exit).")
@click.pass_context
def serve(ctx: click.Context, bundle_dir: str, name: str | None, host: str, http_port: int, grpc_port: int,
          metrics_port: int, max_batch: int | None, queue_delay_us: int, no_batching: bool, no_early_exit: bool,
          instances: int, engine: str, thresholds: list[float | None] | None, backend: str, device: str | None,
          precision: str | None, as_json: bool) -> None:
    """Serve a classifier bundle with NVIDIA Triton Inference Server: HTTP and gRPC (KServe v2),
    dynamic batching across clients, early exit per row inside each batch, health at
    /v2/health/ready and Prometheus metrics at /metrics.

    Two models: NAME takes raw inputs, one per row ('image': encoded image bytes; 'text'; or
    'image' and 'question'), NAME_tensors the bundle's preprocessed model inputs. Each row answers
    label, class, confidence, exit_index, block and error (empty, or why that row did not run).

    Needs the serve extra (PyTriton, which ships the server and pins numpy<2: an environment of its
    own, see docs/serving.md).
    Runs until Ctrl-C or SIGTERM, then stops Triton and removes everything it started.
    """
    from serving.server import ServeConfig, ready_line, serve as run_server

    verbose = ctx.find_root().params.get("verbose", 0) or 0
    config = ServeConfig(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                         max_batch=max_batch, queue_delay_us=queue_delay_us, batching=not no_batching,
                         early_exit=not no_early_exit, instances=instances, log_verbose=max(0, verbose - 1),
                         name=name, thresholds=thresholds, engine=engine)

    def ready(served: dict) -> None:
        if as_json:
            click.echo(json.dumps({"event": "ready", **served}))
        else:
            note(ready_line(served))

    served = run_server(bundle_dir, config, on_ready=ready, backend=backend, device=device, precision=precision)
    if as_json:
        click.echo(json.dumps({"event": "stopped", **served}))
    else:
        note("stopped: the server and its workspace are gone")
