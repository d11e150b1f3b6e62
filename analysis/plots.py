"""Pictures for ``freedeploy bench --plot DIR`` (matplotlib, an optional dependency).

- ``speedup_accuracy.png``: test accuracy against *measured* batch-1 speed-up over the
  monolithic graph, for a sweep of shared thresholds, with the bundle's own thresholds marked;
- ``exit_histogram.png``: where samples leave at the bundle's thresholds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.benchmark import interleaved
from analysis.evaluation import analytic_speedup
from analysis.metrics import exit_share
from calibration.thresholds import exit_decisions
from runtimes.errors import ConfigError
from runtimes.classifier import Classifier

__all__ = ["SWEEP", "threshold_sweep", "plot_all"]

SWEEP = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)  # shared max-softmax thresholds


def threshold_sweep(rt: Classifier, inputs: dict[str, np.ndarray], labels: np.ndarray, runs: int = 60,
                    thresholds: Sequence[float] = SWEEP) -> dict[str, Any]:
    """Accuracy (on every given sample) and measured speed-up (mean batch-1 latency, interleaved
    with the monolithic graph) for each shared threshold and for the bundle's own thresholds."""
    k = len(rt.bundle.exits)
    record = rt.record(inputs)
    settings = {str(t): [t] * k for t in thresholds}
    settings["bundle"] = rt.thresholds
    variants = {"full": rt.infer_full}
    for name, th in settings.items():
        variants[name] = (lambda th: lambda x: rt.infer(x, thresholds=th))(th)
    times = interleaved(variants, inputs, 1, runs, warmup=5, seed=1)

    def point(name: str) -> dict[str, Any]:
        th = settings[name]
        taken = exit_decisions(record.confidences, th)
        pred = record.predictions[np.arange(len(taken)), taken]
        return {"thresholds": th, "accuracy": float((pred == labels).mean()),
                "measured_speedup": float(times["full"].mean() / times[name].mean()),
                "analytic_speedup": analytic_speedup(rt.bundle, taken, th),
                "exit_share": exit_share(taken, [e.block for e in rt.bundle.exits])}

    return {"points": [point(str(t)) for t in thresholds], "bundle": point("bundle"),
            "full_accuracy": float((record.predictions[:, -1] == labels).mean()),
            "exit_blocks": [e.block for e in rt.bundle.exits]}


def plot_all(out_dir: Path, sweep: dict[str, Any]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'freedeploy[plot]'") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    points, own = sweep["points"], sweep["bundle"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["measured_speedup"] for p in points], [100 * p["accuracy"] for p in points], "o-",
            label="shared threshold sweep (measured)")
    for p in points:
        ax.annotate(f"{p['thresholds'][0]:g}", (p["measured_speedup"], 100 * p["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.plot([own["measured_speedup"]], [100 * own["accuracy"]], "r*", markersize=12, label="bundle thresholds")
    ax.axhline(100 * sweep["full_accuracy"], color="grey", linestyle="--", label="full model")
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("measured speed-up over the monolithic graph (batch 1, mean latency)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    first = out_dir / "speedup_accuracy.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)
    return [first, exit_histogram_png(out_dir, own["exit_share"], "test samples")]


def exit_histogram_png(out_dir: Path, share: dict[str, float], what: str) -> Path:
    """``exit_histogram.png``: the share of ``what`` leaving at each exit (by block) and the final head."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([k if k == "final" else f"block {k}" for k in share], [100 * v for v in share.values()])
    ax.set_ylabel(f"share of {what} (%)")
    ax.set_title(f"where {what.split()[-1]} leave (bundle thresholds)")
    fig.tight_layout()
    path = out_dir / "exit_histogram.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
