"""``freedeploy serve`` under load: requests per second and latency at 1 and 8 concurrent clients,
with dynamic batching on and off, early exit on and off.

    python benchmarks/serve_bench.py BUNDLE [--requests 800] [--clients 1,8] [--queue-delays 0,500,1000,2000]
                                            [--serve-python PY] [--json]

Each setting starts its own server (the serving environment's Python: ``--serve-python``, else
$FREEDEPLOY_SERVE_PYTHON, else .venv-serve/bin/python), sends the bundle's own test images as PNG
bytes, one image per request, from N client threads of this process (each waits for its answer
before sending the next), and stops it. The clients share the machine with the server: on a small
CPU they take cores from it, so compare the rows with each other, not with other machines.

The first four rows use the default engine (Triton's server running the runtime in its Python
backend); two more use ``--engine pytriton`` (batches handed to the serving process through
PyTriton's proxy).

``--queue-delays`` adds a sweep of the dynamic batcher's queue delay (the default
``--queue-delay-us`` of ``freedeploy serve`` is chosen from it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.evaluation import bundle_split  # noqa: E402
from serving.bench import ServerProcess, load_test  # noqa: E402
from runtimes.bundle import load_bundle  # noqa: E402
from serving.client import Client  # noqa: E402

SETTINGS = {"batching + early exit": (), "batching, no early exit": ("--no-early-exit",),
            "no batching, early exit": ("--no-batching",),
            "no batching, no early exit": ("--no-batching", "--no-early-exit"),
            "pytriton engine: batching + early exit": ("--engine", "pytriton"),
            "pytriton engine: batching, no early exit": ("--engine", "pytriton", "--no-early-exit")}


def test_images(bundle_dir: str, n: int = 200) -> list[bytes]:
    from PIL import Image

    data, idx = bundle_split(load_bundle(bundle_dir), None, "test")
    if data.modality != "image":
        raise SystemExit(f"{data.spec!r} holds {data.modality} data; this benchmark sends images")
    out = []
    for i in idx[:n]:
        item = data.items[i]
        if isinstance(item, str):
            out.append(Path(item).read_bytes())
        else:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(item)).save(buf, "PNG")
            out.append(buf.getvalue())
    return out


def measure(python: str, bundle: str, args: tuple[str, ...], images: list[bytes], clients: list[int],
            requests: int) -> list[dict]:
    rows = []
    with ServerProcess(python, bundle, *args) as server:
        client = Client(server.url, server.model)
        for n in clients:
            r = load_test(client, images, n, requests, metrics_url=server.metrics_url)
            rows.append(r)
            print(f"  {' '.join(args) or 'defaults':40s} {n} client(s): {r['requests_per_s']:7.1f} req/s  "
                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  mean batch {r.get('mean_batch', 0):.2f}",
                  file=sys.stderr)
        client.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--queue-delays", default="", help="e.g. 0,500,1000,2000 (microseconds)")
    ap.add_argument("--serve-python", default=os.environ.get("FREEDEPLOY_SERVE_PYTHON",
                                                             str(ROOT / ".venv-serve" / "bin" / "python")))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    images = test_images(a.bundle)
    report: dict = {"bundle": load_bundle(a.bundle).name, "requests": a.requests, "cpus": os.cpu_count(),
                    "settings": {}, "queue_delay": {}}
    for name, args in SETTINGS.items():
        report["settings"][name] = measure(a.serve_python, a.bundle, args, images, clients, a.requests)
    for delay in [int(d) for d in a.queue_delays.split(",") if d]:
        report["queue_delay"][delay] = measure(a.serve_python, a.bundle, ("--queue-delay-us", str(delay)), images,
                                               clients, a.requests)
    if a.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['bundle']}: {a.requests} requests per row, one PNG image each, {report['cpus']} CPUs "
          "shared by server and clients")
    print("| setting | clients | req/s | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|")
    for name, rows in report["settings"].items():
        for r in rows:
            print(f"| {name} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r.get('mean_batch', 0):.2f} |")
    if report["queue_delay"]:
        print("\n| queue delay us | clients | req/s | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|")
        for delay, rows in report["queue_delay"].items():
            for r in rows:
                print(f"| {delay} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.2f} | "
                      f"{r['p99_ms']:.2f} | {r.get('mean_batch', 0):.2f} |")


if __name__ == "__main__":
    main()
