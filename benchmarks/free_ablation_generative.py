"""What does each FREE term buy on a decoder? Token-level exits trained with each objective over
several seeds on one frozen generative run; prints a table.

    python benchmarks/free_ablation_generative.py --run runs/captions --labelled-fraction 0.1

The run dir's decoder (backbone and final head) stays frozen, as in FREE; every row trains fresh
exits (copies of the next layers) for the same number of steps. Seeds change the labelled subset,
the batch order and the discriminator's initialisation. Reported per exit on the test split: token
accuracy against the reference and agreement with the final head's token (teacher forcing), and
whole-sequence agreement with the final head when decoding with that exit alone (a seeded subset).
``--own-kv`` instead compares exits that share the next layer's keys and values (what the bundle
runs) with exits that learn projections of their own (objective free).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from analysis.data import labelled_subset, load_dataset  # noqa: E402
from freedeploy.generative.data import CaptionEncoder  # noqa: E402
from freedeploy.generative.model import EarlyExitDecoder  # noqa: E402
from freedeploy.generative.train import (_Batches, evaluate_generative, load_generative_run,  # noqa: E402
                                         stage2_pool, train_exits)
from freedeploy.settings import TrainConfig  # noqa: E402

OBJECTIVES = ("ce", "ce+kd", "free")


def _setup(run: Path):
    model, manifest = load_generative_run(run)
    data = load_dataset(manifest["data"]["spec"])
    enc = CaptionEncoder.for_run(run, manifest, data)
    splits = {k: np.asarray(v, dtype=np.int64) for k, v in json.loads((run / "splits.json").read_text()).items()}
    known = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in manifest["train_config"].items()
                         if k in known})
    return model, data, enc, splits, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--labelled-fraction", type=float, default=0.1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--exit-epochs", type=int, default=None, help="default: the run's")
    ap.add_argument("--decode-rows", type=int, default=128)
    ap.add_argument("--own-kv", action="store_true", help="shared against own keys and values (objective free)")
    ap.add_argument("--rows", default=None, help="only these rows (objectives, or shared / own)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, data, enc, splits, cfg = _setup(args.run)
    hf, device = model.hf, torch.device("cpu")
    cfg = replace(cfg, labelled_fraction=args.labelled_fraction, progress=False,
                  exit_epochs=args.exit_epochs or cfg.exit_epochs)
    rows = {"shared": ("free", False), "own": ("free", True)} if args.own_kv else {o: (o, False) for o in OBJECTIVES}
    if args.rows:  # a subset, e.g. "own" alone (the "shared" row is the same run as the "free" one)
        rows = {k: v for k, v in rows.items() if k in args.rows.split(",")}
    results: dict[str, list[dict]] = {name: [] for name in rows}
    batches = _Batches(enc, "none", device)
    for name, (objective, own) in rows.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            run_cfg = replace(cfg, objective=objective, seed=seed)
            torch.manual_seed(seed)
            labelled = labelled_subset(splits["train"], data.labels, args.labelled_fraction, seed)
            m = EarlyExitDecoder(hf, cfg.exits, own_kv=own)
            pool = stage2_pool(objective, splits["train"], labelled)
            train_exits(m, batches, pool, labelled, len(data), len(splits["train"]), run_cfg, device)
            # exits with keys and values of their own have no cache to decode with: teacher forcing only
            metrics = evaluate_generative(m, enc, splits["test"], device, seed=0,
                                          decode_rows=0 if own else args.decode_rows)
            results[name].append(metrics)
            print(f"{name:6s} seed {seed}: token accuracy "
                  f"{[round(e['token_accuracy'], 4) for e in metrics['exits']]}, sequence agreement "
                  f"{[round(e['sequence_agreement'], 3) for e in metrics['exits']]}", flush=True)
    print()
    print(markdown(results, cfg.exits))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def markdown(results: dict[str, list[dict]], exits: tuple[int, ...]) -> str:
    head = ["objective"] + [f"exit {e}: token acc / agree / seq agree" for e in exits] + ["final head"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        cells = [name]
        for k in range(len(exits)):
            cells.append(" / ".join(_fmt([r["exits"][k][m] for r in runs]) if runs[0]["decoded"] or m != "sequence_agreement"
                                    else "-" for m in ("token_accuracy", "token_agreement", "sequence_agreement")))
        cells.append(_fmt([r["final_token_accuracy"] for r in runs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
