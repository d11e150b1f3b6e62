"""Early-exit quality measures, from per-exit and final predictions (numpy only).

Vocabulary (reference/free.md): per-exit accuracy; agreement of each exit with the final head;
overthinking rate = share of samples that some exit got right while the final head got wrong.
Reports name an exit by its block (the 1-based block whose output it reads), never by its index:
per-exit rows carry ``"block"``, and where samples left is an object keyed by the block as a
string plus ``"final"`` for the final head, in counts (``exit_histogram``) or fractions
(``exit_share``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from runtimes.bundle import by_exit

__all__ = ["exit_metrics", "exit_histogram", "exit_share"]


def exit_metrics(exit_preds: Sequence[np.ndarray], final_pred: np.ndarray, labels: np.ndarray,
                 blocks: Sequence[int]) -> dict[str, Any]:
    """Per-exit accuracy and agreement (rows named by the exit's block), final accuracy and the
    overthinking rate, as plain floats."""
    labels = np.asarray(labels)
    final_right = final_pred == labels
    any_exit_right = np.zeros_like(final_right)
    per_exit = []
    for block, pred in zip(blocks, exit_preds):
        right = pred == labels
        any_exit_right |= right
        per_exit.append({"block": int(block), "accuracy": float(right.mean()),
                         "agreement": float((pred == final_pred).mean())})
    return {
        "n": int(len(labels)),
        "final_accuracy": float(final_right.mean()),
        "exits": per_exit,
        "overthinking_rate": float((any_exit_right & ~final_right).mean()),
    }


def exit_histogram(taken: np.ndarray, blocks: Sequence[int]) -> dict[str, int]:
    """How many samples left at each exit, e.g. ``{"2": 5, "4": 1, "final": 3}``; ``taken`` holds
    exit indices (``len(blocks)`` is the final head), ``blocks`` each exit's block."""
    counts = np.bincount(np.asarray(taken, dtype=np.int64), minlength=len(blocks) + 1)
    return by_exit(blocks, [int(c) for c in counts])


def exit_share(taken: np.ndarray, blocks: Sequence[int]) -> dict[str, float]:
    """The fraction of samples that left at each exit, keyed as in :func:`exit_histogram`."""
    return {k: c / max(1, len(taken)) for k, c in exit_histogram(taken, blocks).items()}
