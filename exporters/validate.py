"""Numerical validation of an exported bundle against torch, collecting every failure.

Three checks, all with ONNX Runtime on the CPU:

- ``compare_files``: every fp32 graph against its torch module at several batch sizes
  (max abs diff per output against a tolerance), like ``polygraphy run --onnxrt``;
- ``chain_parity``: the chained runtime's per-exit and final predictions on a whole split against
  torch's; a mismatch counts only where torch's top-2 logits are further apart than the tolerance;
- ``precision_report``: an fp16 / int8 chain against the fp32 one: exit-decision agreement per
  exit, prediction agreement and the accuracy change.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from runtimes.backends.onnxruntime import OrtBackend
from runtimes.bundle import Bundle, decision_field
from runtimes.chain import RecordOutput, record_chain
from runtimes.records import ChainParity, FileCheck, Mismatch, PrecisionCheck

__all__ = ["Mismatch", "compare_files", "torch_record", "chain_parity", "precision_report", "record_all",
           "REFERENCE_THRESHOLD"]

REFERENCE_THRESHOLD = 0.9  # exit decisions are compared at FREE's default threshold before calibration


def _torch_outputs(module: torch.nn.Module, feeds: dict[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(feeds[n]) for n in names])
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def compare_files(bundle: Bundle, modules: dict[str, torch.nn.Module], backend: OrtBackend,
                  inputs: dict[str, np.ndarray], batches: Sequence[int],
                  tolerance: float) -> tuple[list[FileCheck], list[Mismatch]]:
    """Run every graph in torch and ONNX Runtime on the same feeds; returns (report rows, failures)."""
    rows, failures = [], []
    for n in batches:
        state = backend.start({k: v[:n] for k, v in inputs.items()})
        for spec in bundle.graphs:
            feeds = backend.fetch(state, [t.name for t in spec.inputs])
            ref = _torch_outputs(modules[spec.key], feeds, [t.name for t in spec.inputs])
            probe = backend.start(feeds)
            backend.run(spec.key, probe)
            got = backend.fetch(probe, [t.name for t in spec.outputs])
            for t, r in zip(spec.outputs, ref):
                diff = float(np.abs(got[t.name].astype(np.float64) - r.astype(np.float64)).max())
                rows.append(FileCheck(spec.files["fp32"], t.name, n, diff))
                if diff > tolerance and t.dtype != "int64":
                    failures.append(Mismatch(spec.files["fp32"], t.name, n, diff, tolerance))
            if spec.kind != "full":
                backend.run(spec.key, state)
    return rows, failures


def torch_record(bundle: Bundle, modules: dict[str, torch.nn.Module], inputs: dict[str, np.ndarray],
                 batch: int = 256) -> tuple[RecordOutput, np.ndarray]:
    """Torch's confidences and predictions for every exit and the final head, plus each row's top-2
    logit gap per head (to tell real mismatches from near-ties)."""
    n = len(next(iter(inputs.values())))
    conf, pred, gaps = [], [], []
    for i in range(0, n, batch):
        state = {k: v[i:i + batch] for k, v in inputs.items()}
        c, p, g = [], [], []
        for spec in bundle.graphs[:-1]:
            outs = dict(zip((t.name for t in spec.outputs),
                            _torch_outputs(modules[spec.key], state, [t.name for t in spec.inputs])))
            state.update(outs)
            decision = {decision_field(t.role): outs[t.name] for t in spec.outputs if decision_field(t.role)}
            if decision:  # an exit head or the final segment, in chain order
                top2 = np.sort(decision["logits"], axis=-1)[:, -2:]
                c.append(decision["confidence"])
                p.append(decision["prediction"])
                g.append(top2[:, 1] - top2[:, 0])
        conf.append(np.stack(c, 1))
        pred.append(np.stack(p, 1))
        gaps.append(np.stack(g, 1))
    return RecordOutput(np.concatenate(conf), np.concatenate(pred)), np.concatenate(gaps)


def chain_parity(bundle: Bundle, backend: OrtBackend, reference: RecordOutput, gaps: np.ndarray,
                 inputs: dict[str, np.ndarray], tolerance: float) -> tuple[ChainParity, RecordOutput]:
    """Chained ONNX Runtime predictions against torch's, per head, on every row."""
    got = record_all(bundle, backend, inputs)
    differ = got.predictions != reference.predictions
    real = differ & (gaps > tolerance)
    report = ChainParity(int(len(differ)), tuple(differ.sum(0).tolist()), tuple(real.sum(0).tolist()),
                         bool(not real.any()))
    return report, got


def record_all(bundle: Bundle, backend: OrtBackend, inputs: dict[str, np.ndarray]) -> RecordOutput:
    n, step = len(next(iter(inputs.values()))), bundle.batch.max
    parts = [record_chain(backend, bundle, {k: v[i:i + step] for k, v in inputs.items()}) for i in range(0, n, step)]
    return RecordOutput(np.concatenate([p.confidences for p in parts]), np.concatenate([p.predictions for p in parts]))


def precision_report(bundle: Bundle, backend: OrtBackend, fp32: RecordOutput, inputs: dict[str, np.ndarray],
                     labels: np.ndarray) -> PrecisionCheck:
    """A lower-precision chain (fp16, int8, int8-heads) against the fp32 one on the same rows."""
    low = record_all(bundle, backend, inputs)
    t = REFERENCE_THRESHOLD
    fire32, fire_low = fp32.confidences >= t, low.confidences >= t
    # the same decision: both keep going, or both exit with the same class
    same = (fire32 == fire_low) & (~fire32 | (fp32.predictions == low.predictions))
    k = fp32.predictions.shape[1] - 1
    acc32 = (fp32.predictions == labels[:, None]).mean(0)
    acc_low = (low.predictions == labels[:, None]).mean(0)
    return PrecisionCheck(
        precision=backend.precision, reference_threshold=t,
        exit_decision_agreement=tuple(float(x) for x in same[:, :k].mean(0)),
        prediction_agreement=tuple(float(x) for x in (fp32.predictions == low.predictions).mean(0)),
        max_confidence_diff=float(np.abs(fp32.confidences - low.confidences).max()),
        final_accuracy_fp32=float(acc32[k]), final_accuracy=float(acc_low[k]),
        accuracy_change=float(acc_low[k] - acc32[k]),
        exit_accuracy_change=tuple(float(x) for x in (acc_low - acc32)[:k]))
