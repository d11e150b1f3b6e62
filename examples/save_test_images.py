"""Write a few images of a bundle's own test split to a folder, each named by its row and true
label, to feed ``examples/predict.py`` or ``freedeploy run``. Uses the numpy-only data readers of
``analysis``; no torch.

    python examples/save_test_images.py BUNDLE OUT_DIR [N]
"""

import shutil
import sys
from pathlib import Path

from PIL import Image

from analysis.evaluation import bundle_split
from runtimes.bundle import load_bundle


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    bundle_dir, out, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 8
    data, idx = bundle_split(load_bundle(bundle_dir), None, "test")
    if data.modality != "image":
        sys.exit(f"{data.spec!r} holds {data.modality} data; this example writes images only")
    out.mkdir(parents=True, exist_ok=True)
    for i in idx[:n]:
        item, name = data.items[i], f"test{i:05d}-{data.label_names[data.labels[i]]}"
        if isinstance(item, str):  # an image file of an imagefolder data set
            path = out / (name + Path(item).suffix.lower())
            shutil.copyfile(item, path)
        else:
            path = out / f"{name}.png"
            Image.fromarray(item).save(path)
        print(path)


if __name__ == "__main__":
    main()
