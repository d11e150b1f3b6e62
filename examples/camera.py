"""Embed the early-exit runtime in a frame loop: camera (or video file) -> label per frame.

    python examples/camera.py BUNDLE [CAMERA_INDEX | VIDEO_FILE] [--frames N]
"""

import argparse
import time

import cv2  # pip install 'freedeploy[video]'

from runtimes import Runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("source", nargs="?", default="0", help="camera index or video file")
    ap.add_argument("--frames", type=int, default=0, help="stop after N frames (0: run until the stream ends)")
    args = ap.parse_args()
    rt = Runtime.load(args.bundle)  # TensorRT engines when built for this GPU, else ONNX Runtime
    cap = cv2.VideoCapture(int(args.source) if args.source.isdigit() else args.source)
    n = 0
    while cap.isOpened() and (args.frames == 0 or n < args.frames):
        ok, frame = cap.read()
        if not ok:
            break
        t0 = time.perf_counter()
        p = rt.infer([cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)])[0]  # HWC uint8 RGB in, preprocessing from the bundle
        ms = 1000 * (time.perf_counter() - t0)
        where = "final head" if p.exit_index == len(rt.bundle.exits) else f"exit at block {p.block}"
        print(f"frame {n}: {p.label} (confidence {p.confidence:.2f}, {where}) {ms:.1f} ms")
        n += 1
    cap.release()
    rt.close()


if __name__ == "__main__":
    main()
