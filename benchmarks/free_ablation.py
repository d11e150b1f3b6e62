"""What does each FREE term buy? Train exits with each objective over several seeds, print a table.

    python benchmarks/free_ablation.py --model runs/digits --data digits --labelled-fraction 0.1

``--model`` is normally a run dir: its fine-tuned backbone and final head are reused (frozen), so
only the exits differ between rows, which is FREE's setting (a trained backbone, few labels for
the exits). Every objective gets the same number of optimizer steps; seeds change the labelled
subset, the head initialisation noise and the batch order. Prints a Markdown table (mean and
standard deviation over seeds of each exit's test accuracy) and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from freedeploy.train import TrainConfig, train

OBJECTIVES = ("ce", "ce+kd", "free")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--labelled-fraction", type=float, default=0.1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--exit-epochs", type=int, default=10)
    ap.add_argument("--exits", default=None, help="default: the run dir's exits")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    exits = tuple(int(e) for e in args.exits.split(",")) if args.exits else _run_exits(args.model)
    results: dict[str, list[dict]] = {o: [] for o in OBJECTIVES}
    with tempfile.TemporaryDirectory() as tmp:
        for objective in OBJECTIVES:
            for seed in seeds:
                cfg = TrainConfig(model=args.model, data=args.data, exits=exits, objective=objective, seed=seed,
                                  labelled_fraction=args.labelled_fraction, exit_epochs=args.exit_epochs,
                                  out=f"{tmp}/{objective}-{seed}", progress=False)
                res = train(cfg)
                results[objective].append(res.metrics["test"])
                accs = [round(e["accuracy"], 4) for e in res.metrics["test"]["exits"]]
                print(f"{objective:6s} seed {seed}: exit accuracies {accs}", flush=True)
    print()
    print(markdown(results, exits, len(seeds)))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


def _run_exits(model: str) -> tuple[int, ...] | None:
    manifest = Path(model) / "freedeploy.json"
    return tuple(json.loads(manifest.read_text())["exits"]) if manifest.is_file() else None


def markdown(results: dict[str, list[dict]], exits: tuple[int, ...] | None, n_seeds: int) -> str:
    first = next(iter(results.values()))[0]
    exits = exits or tuple(e["block"] for e in first["exits"])
    head = "| objective | " + " | ".join(f"exit {e}" for e in exits) + " | final head |"
    lines = [head, "|" + "---|" * (len(exits) + 2)]
    for objective, runs in results.items():
        cells = []
        for k in range(len(exits)):
            accs = [100 * r["exits"][k]["accuracy"] for r in runs]
            cells.append(f"{statistics.mean(accs):.1f} ± {statistics.pstdev(accs):.1f}")
        final = statistics.mean(100 * r["final_accuracy"] for r in runs)
        lines.append(f"| {objective} | " + " | ".join(cells) + f" | {final:.1f} |")
    lines.append(f"\nTest accuracy in %, mean ± standard deviation over {n_seeds} seeds.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
