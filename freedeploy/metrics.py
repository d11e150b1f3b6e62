"""Early-exit quality measures, from per-exit and final predictions (numpy only).

Vocabulary (reference/free.md): per-exit accuracy; agreement of each exit with the final head;
overthinking rate = share of samples that some exit got right while the final head got wrong.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["exit_metrics"]


def exit_metrics(exit_preds: Sequence[np.ndarray], final_pred: np.ndarray, labels: np.ndarray,
                 exits: Sequence[int]) -> dict[str, Any]:
    """Per-exit accuracy and agreement, final accuracy and the overthinking rate, as plain floats."""
    labels = np.asarray(labels)
    final_right = final_pred == labels
    any_exit_right = np.zeros_like(final_right)
    per_exit = []
    for e, pred in zip(exits, exit_preds):
        right = pred == labels
        any_exit_right |= right
        per_exit.append({"exit": int(e), "accuracy": float(right.mean()),
                         "agreement": float((pred == final_pred).mean())})
    return {
        "n": int(len(labels)),
        "final_accuracy": float(final_right.mean()),
        "exits": per_exit,
        "overthinking_rate": float((any_exit_right & ~final_right).mean()),
    }
