"""Predictions from a bundle with the runtime alone: numpy and ``runtimes``, no torch, no training code.

    python examples/predict.py BUNDLE INPUT...

INPUT: image files or folders of images (an image bundle), or texts (a text bundle).
``python examples/save_test_images.py BUNDLE DIR`` writes a few images of the bundle's own test
split to try it on.
"""

import sys
from pathlib import Path
from typing import Iterator

from runtimes import Runtime

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _inputs(args: list[str]) -> Iterator[str]:
    """Image paths (a folder gives its images, sorted) or texts, as given."""
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            yield from sorted(str(f) for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield arg


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rt = Runtime.load(sys.argv[1])  # TensorRT engines when built for this GPU, else ONNX Runtime
    inputs = list(_inputs(sys.argv[2:]))
    for name, p in zip(inputs, rt.infer(inputs)):
        # p.exit_index is the exit's position in the bundle (len(exits): the final head); p.block names it
        where = (f"final head (block {p.block})" if p.exit_index == len(rt.bundle.exits)
                 else f"exit at block {p.block} of {rt.bundle.num_blocks}")
        print(f"{name}: predicted {p.label}, confidence {p.confidence:.3f}, {where}")
    rt.close()


if __name__ == "__main__":
    main()
