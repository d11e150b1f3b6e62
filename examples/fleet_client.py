"""Send images to one or more servers of the same bundle (``freedeploy serve``), spread and failed
over by ``serving.client.Fleet``; numpy and the standard library only, any numpy version.

    python examples/fleet_client.py MODEL URL[,URL...] IMAGE_OR_FOLDER... [--threads N]

Prints one line per image (which server answered, the label, the block that decided, latency), then
how many requests each server took and their p50 latency. With --threads N the images are sent by N
concurrent streams, as N cameras would.
"""

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtimes.errors import FreedeployError
from serving.client import Fleet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("urls", help="server URLs, comma-separated: http://edge-1:8000,http://edge-2:8000")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    files = []
    for arg in a.inputs:
        p = Path(arg)
        files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    fleet = Fleet(a.urls.split(","), a.model)
    lock, failed, latencies = threading.Lock(), [0], []

    def send(path: Path) -> None:
        t = time.perf_counter()
        try:
            (answer,) = fleet.infer([path.read_bytes()])
        except (OSError, FreedeployError) as exc:
            with lock:
                failed[0] += 1
                print(f"{path}: error: {exc}", file=sys.stderr)
            return
        ms = (time.perf_counter() - t) * 1e3
        with lock:
            latencies.append(ms)
            print(f"{path}: {answer.label} (confidence {answer.confidence:.3f}, block {answer.block}) {ms:.1f} ms")

    with ThreadPoolExecutor(a.threads) as pool:
        list(pool.map(send, files))
    for client, n in zip(fleet.clients, fleet.served):
        print(f"{client.url}: {n} request(s)", file=sys.stderr)
    if latencies:
        latencies.sort()
        print(f"p50 {latencies[len(latencies) // 2]:.1f} ms over {len(latencies)} image(s)", file=sys.stderr)
    sys.exit(10 if failed[0] else 0)


if __name__ == "__main__":
    main()
