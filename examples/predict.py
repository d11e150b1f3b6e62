"""A few predictions from a bundle on real test images, with the runtime alone (no torch).

    python examples/predict.py BUNDLE [N]
"""

import sys

from freedeploy.evaluation import bundle_split
from runtimes import Runtime


def main() -> None:
    bundle_dir, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rt = Runtime.load(bundle_dir)
    data, idx = bundle_split(rt.bundle, None, "test")
    rows = idx[:n]
    result = rt.infer([data.items[i] for i in rows])
    for i, p in zip(rows, result):
        truth = data.label_names[data.labels[i]]
        where = "final head" if p.exit == len(rt.bundle.exits) else f"exit {p.exit}"
        print(f"test sample {i}: predicted {p.label} (true {truth}), confidence {p.confidence:.3f}, "
              f"{where} after block {p.block} of {rt.bundle.num_blocks}")


if __name__ == "__main__":
    main()
