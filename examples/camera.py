"""Embed the early-exit runtime in a frame loop: camera (or video file) -> label per frame.

    python examples/camera.py BUNDLE [CAMERA_INDEX | VIDEO_FILE] [--frames N] [--fps 30] [--monitor 0.02]

Each frame gets a budget: the frame period (``--fps``), or ``--budget-ms``. When time is up before
an exit fires, the runtime answers with the deepest exit computed so far and marks it forced
(outside the certificate). ``--monitor RATE`` checks that share of frames against the final head
and warns once when early exit drifts away from it beyond the certified tolerance.
"""

import argparse
import logging
import sys
import time

import cv2  # pip install 'freedeploy[video]'

from runtimes import Runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("source", nargs="?", default="0", help="camera index or video file")
    ap.add_argument("--frames", type=int, default=0, help="stop after N frames (0: run until the stream ends)")
    ap.add_argument("--fps", type=float, default=30.0, help="frame rate: the budget per frame is its period")
    ap.add_argument("--budget-ms", type=float, help="budget per frame in milliseconds [default: 1000 / fps]")
    ap.add_argument("--monitor", type=float, help="share of frames checked against the final head (e.g. 0.02)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the monitor's alarm is a warning
    budget_ms = args.budget_ms or 1000.0 / args.fps
    # TensorRT engines when built for this GPU, else ONNX Runtime
    rt = Runtime.load(args.bundle, **({} if args.monitor is None else {"monitor": args.monitor}))
    if all(t is None for t in rt.thresholds):  # nothing answers before the final head: no budget can hold
        print("every exit is off (calibrate the bundle first): frames run without a budget", file=sys.stderr)
        budget_ms = None
    cap = cv2.VideoCapture(int(args.source) if args.source.isdigit() else args.source)
    n = 0
    while cap.isOpened() and (args.frames == 0 or n < args.frames):
        ok, frame = cap.read()
        if not ok:
            break
        t0 = time.perf_counter()
        # HWC uint8 RGB in, preprocessing from the bundle; the budget counts preprocessing too
        p = rt.infer([cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)], deadline_ms=budget_ms)[0]
        ms = 1000 * (time.perf_counter() - t0)
        where = "final head" if p.exit_index == len(rt.bundle.exits) else f"exit at block {p.block}"
        print(f"frame {n}: {p.label} (confidence {p.confidence:.2f}, {where}{', forced' if p.forced else ''}) "
              f"{ms:.1f} ms")
        n += 1
    cap.release()
    stats = rt.stats()
    if budget_ms is not None:
        print(f"{stats.deadline.forced} of {stats.deadline.rows} frames forced by the {budget_ms:.1f} ms budget, "
              f"{stats.deadline.late} late by at most {stats.deadline.worst_overrun_ms:.1f} ms", file=sys.stderr)
    if stats.monitor is not None:
        m = stats.monitor
        print(f"monitor {m.state}: {m.checked} frames checked, {m.disagreements} disagreed with the final head",
              file=sys.stderr)
    rt.close()


if __name__ == "__main__":
    main()
