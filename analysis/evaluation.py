"""Data for bundles, and what early exit did on it: accuracy, agreement, exits, analytic speed-up.

Numpy only (no torch): evaluation and calibration run on the deployment machine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.data import Dataset, load_dataset, make_splits, split_digest
from analysis.metrics import exit_histogram, exit_metrics
from calibration.thresholds import exit_decisions, expected_cost
from runtimes.bundle import Bundle, ClassifierHead
from runtimes.errors import DataError
from runtimes.classifier import Classifier
from runtimes.runtime import Runtime

__all__ = ["bundle_split", "evaluate", "analytic_speedup"]


def bundle_split(bundle: Bundle, spec: str | None, split: str) -> tuple[Dataset, np.ndarray]:
    """Rows of ``split`` ('train', 'val', 'test' or 'all'); the bundle's own data set gets the exact
    split its model was trained with (checked by fingerprint)."""
    labels = bundle.expect(ClassifierHead, "a labelled split (a generative bundle's rows: "
                                           "analysis.generation.generation_rows)").labels
    source = (bundle.provenance.get("source") or {}).get("data") or {}
    spec = spec or source.get("spec")
    if not spec:
        raise DataError(f"bundle {bundle.name!r} does not record its data set: pass --data")
    data = load_dataset(spec)
    if tuple(data.label_names) != tuple(labels):
        raise DataError(f"data set {spec!r} has labels {list(data.label_names)[:6]}..., the bundle "
                        f"{list(labels)[:6]}...: they must be the same classes in the same order")
    return data, split_of(bundle, data, split)


def split_of(bundle: Bundle, data: Dataset, split: str) -> np.ndarray:
    """Row indices of ``split`` of ``data``; for the bundle's own data set, the exact split its model
    was trained with (checked by fingerprint)."""
    if split == "all":
        return np.arange(len(data))
    source = (bundle.provenance.get("source") or {}).get("data") or {}
    same = data.spec == source.get("spec")
    splits = make_splits(data.labels, seed=int(source.get("split_seed", 0)) if same else 0, groups=data.groups)
    if split not in splits:
        raise DataError(f"unknown split {split!r}: use train, val, test or all")
    idx = splits[split]
    want = (source.get("split_digests") or {}).get(split)
    if same and want and split_digest(idx) != want:
        raise DataError(f"the {split} split of {data.spec!r} differs from the one the model was trained with "
                        "(the data set changed?); pass --split all with separate data instead")
    return idx


def analytic_speedup(bundle: Bundle, taken: np.ndarray, thresholds: list[float | None]) -> float:
    """Full depth over mean blocks run, counting each exit head passed at its analytic cost (one
    block for a full-block head, about a sixth for a cls-query head)."""
    blocks = np.diff([0] + [e.block for e in bundle.exits] + [bundle.num_blocks])  # blocks per segment
    return float(bundle.num_blocks / expected_cost(taken, blocks, [e.cost for e in bundle.exits], thresholds))


def evaluate(rt: Classifier, inputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """Early exit at the runtime's thresholds, measured against the full model on the same rows."""
    record = rt.record(inputs)
    thresholds = rt.thresholds
    taken = exit_decisions(record.confidences, thresholds)
    early = record.predictions[np.arange(len(taken)), taken]
    full = record.predictions[:, -1]
    blocks = [e.block for e in rt.bundle.exits]
    per_exit = exit_metrics([record.predictions[:, i] for i in range(len(blocks))], full, labels, blocks)
    return {
        "n": int(len(labels)), "thresholds": thresholds, "backend": rt.backend.describe(),
        "accuracy": float((early == labels).mean()), "full_accuracy": float((full == labels).mean()),
        "agreement_with_full": float((early == full).mean()), "disagreement_with_full": float((early != full).mean()),
        "accuracy_drop": float(max(0.0, (full == labels).mean() - (early == labels).mean())),
        "exit_histogram": exit_histogram(taken, blocks),
        "per_exit": per_exit["exits"], "overthinking_rate": per_exit["overthinking_rate"],
        "analytic_speedup": analytic_speedup(rt.bundle, taken, thresholds),
        "certificate": certificate_dict(rt),
    }


def certificate_dict(rt: Runtime) -> dict[str, Any] | None:
    cert = rt.certificate
    return None if cert is None else cert.to_dict()
