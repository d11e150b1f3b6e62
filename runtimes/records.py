"""Typed records a bundle holds beside its plan: the calibration certificate (in ``bundle.json``),
the engine set (``engines/<target-key>/build.json``) and the export validation report
(``validation.json``).

Each is a frozen dataclass with ``from_dict`` / ``to_dict``; ``from_dict`` names the field at fault
(``runtimes.typed``) and runs the record's own ``check``. Written in one module, read in others,
so the keys live here and nowhere else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from runtimes.errors import BundleError, FreedeployError
from runtimes.thresholds import check_thresholds
from runtimes.typed import from_dict, to_dict

__all__ = ["PRECISIONS", "ENGINE_PRECISIONS", "INT8_HEADS", "StageCosts", "ExitChoice", "SpeculativeChoice", "Certificate", "GraphBuild", "EngineSet", "FileCheck", "Mismatch",
           "ChainParity", "PrecisionCheck", "DecodeCheck", "ValidationReport", "read_json_record", "BUILD_SCHEMA", "VALIDATION_FILE"]

# what TensorRT builds: the precision is inside the ONNX (fp16 mixed, or explicit Q/DQ int8)
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
# fp32 segments, exit heads with int8 weights (ONNX Runtime's integer MatMul, dequantized per channel):
# a one-token head is bound by reading its weights at batch 1, and this reads a quarter of them.
# ONNX Runtime only: TensorRT does not parse the integer MatMul.
INT8_HEADS = "int8-heads"
PRECISIONS = (*ENGINE_PRECISIONS, INT8_HEADS)
BUILD_SCHEMA = 1
VALIDATION_FILE = "validation.json"
_Error = type[FreedeployError]


class _Record:
    """``from_dict`` / ``to_dict`` for the dataclasses below."""

    @classmethod
    def from_dict(cls, data: Any, where: str = "record", error: _Error = BundleError) -> Any:
        return from_dict(cls, data, where, error)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# -- the calibration certificate ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageCosts(_Record):
    """Measured milliseconds per call of each graph (at batch 1 for a certificate)."""

    segments: tuple[float, ...]  # per segment, chain order (the last ends in the final head)
    exits: tuple[float, ...]  # per exit head
    full: float  # the monolithic graph

    def chain_without_exits(self) -> float:
        return float(sum(self.segments))


@dataclass(frozen=True)
class ExitChoice(_Record):
    """``calibrate --select-exits``: exits switched off and the path, chosen on a random selection
    split of the calibration set; the certificate's p-value comes from the disjoint rest."""

    seed: int  # of the random permutation that split the calibration set
    selection_fraction: float
    n_selection: int  # samples that chose the exits and the path
    n_certification: int  # samples that certified them (pvalue, tightest_tolerance, calibration_risk)
    exits_on: tuple[int, ...]  # by the block each exit reads
    exits_off: tuple[int, ...]  # by block; their thresholds are null and their heads are not run
    rule: str  # how the selection split chose, in words
    target_risk: float  # the selection-split risk the chosen sequence's points stayed at or below
    tightest_tolerance_without_split: float  # what all n samples could certify without selecting exits

    def check(self, where: str, error: _Error = BundleError) -> None:
        if self.n_selection < 1 or self.n_certification < 1 or not 0.0 < self.selection_fraction < 1.0:
            raise error(f"{where}: a split needs n_selection, n_certification >= 1 and selection_fraction in "
                        f"(0, 1), found {self.n_selection}, {self.n_certification}, {self.selection_fraction}")


@dataclass(frozen=True)
class SpeculativeChoice(_Record):
    """Generative bundles: the draft exit and draft length self-speculation uses by default, chosen
    by measurement on the calibration rows (the text is the full model's whatever they are)."""

    draft_block: int  # the block of the exit that drafts
    draft_len: int  # drafts per verification
    n: int  # rows it was measured on
    predicted_ms_per_token: float  # from each graph's measured time and the calls decoding made
    monolithic_ms_per_token: float
    acceptance: float  # share of drafts the full model accepted
    rule: str  # how the choice was made, in words

    def check(self, where: str, error: _Error = BundleError) -> None:
        if self.draft_len < 1 or self.n < 1:
            raise error(f"{where}: a speculative choice needs draft_len >= 1 and n >= 1, found {self.draft_len}, {self.n}")


@dataclass(frozen=True)
class Certificate(_Record):
    """What ``freedeploy calibrate`` promised, and on what: with probability at least 1 - epsilon
    over the calibration draw, the loss (disagreement with the full model, or accuracy drop with
    labels) of early exit at ``thresholds`` is at most ``delta`` (or the latency budget holds)."""

    key: str  # backend-precision[-engine set]: where these thresholds were measured
    thresholds: tuple[float | None, ...]  # one per exit, in chain order; None: exit off
    n: int  # calibration samples
    epsilon: float  # failure probability of the guarantee
    mode: str = field(metadata={"choices": ("label-free", "labels")})
    method: str  # the statistical procedure, in words
    delta: float | None = None  # certified tolerance; None in latency-budget mode
    loss: str = ""  # what delta bounds, in words
    pvalue: float | None = None
    certified_candidates: int | None = None
    tightest_tolerance: float | None = None  # the smallest delta the certifying samples could certify
    latency_budget_ms: float | None = None
    risk_upper_bound: float | None = None  # latency-budget mode: the bound on the loss
    calibration_risk: float | None = None  # empirical loss on the certifying samples
    expected_latency_ms: float | None = None
    expected_speedup: float | None = None
    exit_share: Mapping[str, float] = field(default_factory=dict)  # samples leaving per exit, by block, and "final"
    path: str | None = None
    grid_index: int | None = None
    costs_ms: StageCosts | None = None
    backend: Mapping[str, Any] = field(default_factory=dict)  # Backend.describe() where it was measured
    data: Mapping[str, Any] = field(default_factory=dict)  # data set and split it was measured on
    calibrated: str = ""  # ISO 8601 time
    exit_selection: ExitChoice | None = None  # None: no exits selected; all n samples certify
    level: str | None = field(default=None, metadata={"omit_none": True})  # generative: sequence or token
    speculative: SpeculativeChoice | None = field(default=None, metadata={"omit_none": True})  # generative

    def check(self, where: str, error: _Error = BundleError) -> None:
        if self.exit_selection is not None and (
                self.exit_selection.n_selection + self.exit_selection.n_certification != self.n):
            raise error(f"{where}: the selection and certification splits must add up to n={self.n}")
        if self.n < 1 or not 0.0 < self.epsilon < 1.0:
            raise error(f"{where}: a certificate needs n >= 1 and epsilon in (0, 1), found n={self.n}, "
                        f"epsilon={self.epsilon}")
        if self.delta is not None and not 0.0 <= self.delta <= 1.0:
            raise error(f"{where}: 'delta' must be in [0, 1], found {self.delta}")
        check_thresholds(self.thresholds, f"{where}.thresholds", error)


# -- the engine set (build.json) -------------------------------------------------------------------------------

@dataclass(frozen=True)
class GraphBuild(_Record):
    onnx: str  # the ONNX file it was built from, relative to the bundle
    onnx_sha256: str
    plan: str  # the plan's file name inside the engine set
    plan_sha256: str
    seconds: float = 0.0
    profile: Mapping[str, Mapping[str, tuple[int, ...]]] = field(default_factory=dict)  # input -> min/opt/max

    def check(self, where: str, error: _Error = BundleError) -> None:
        if not self.plan or Path(self.plan).name != self.plan or self.plan in (".", ".."):
            raise error(f"{where}: 'plan' must be a file name inside the engine set, found {self.plan!r:.80}")


@dataclass(frozen=True)
class EngineSet(_Record):
    """``build.json``: what the plans were built from and with. Settings are stored by enum name,
    since TensorRT 11 renumbered enum values."""

    schema: int
    key: str  # the target key, also the directory name
    precision: str = field(metadata={"choices": ENGINE_PRECISIONS})
    tensorrt_version: str
    graphs: Mapping[str, GraphBuild]
    bundle: str = ""
    cuda_runtime_version: str | None = None
    cuda_driver_version: str | None = None
    gpu: Mapping[str, Any] = field(default_factory=dict)
    jetpack_l4t: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    timing_cache: Mapping[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    created: str = ""

    def check(self, where: str, error: _Error = BundleError) -> None:
        if self.schema < 1:
            raise error(f"{where}: 'schema' must be a positive integer")
        if self.schema > BUILD_SCHEMA:
            raise error(f"{where} has schema {self.schema}; this freedeploy reads up to {BUILD_SCHEMA}: "
                        "upgrade freedeploy")


# -- the export validation report (validation.json) ----------------------------------------------------------

@dataclass(frozen=True)
class FileCheck(_Record):
    file: str
    output: str
    batch: int
    max_abs_diff: float  # of a float output; for a token output, how many differ beyond a near-tie
    past: int | None = field(default=None, metadata={"omit_none": True})  # a decoder graph's past length


@dataclass(frozen=True)
class DecodeCheck(_Record):
    """A generative bundle: greedy decoding by the chained ONNX graphs against the torch reference on
    every test sample, with exits off and with every exit on at ``threshold``, for the KV rule ``kv``
    (recomputation, the runtime's default) and for state propagation; a mismatch is a sequence whose
    tokens or exit blocks differ from torch's. Reports written before ``kv`` existed checked
    propagation only, and keyed ``exits_taken`` by exit index."""

    sequences: int
    max_new: int
    tokens_exits_off: int
    mismatched_exits_off: int
    threshold: float
    tokens_exits_on: int
    mismatched_exits_on: int
    exits_taken: Mapping[str, int]  # exits on: tokens per exit block ("2", ...; "final": the final head)
    kv: str = field(default="propagate", metadata={"choices": ("recompute", "propagate")})  # the exits-on check's rule
    tokens_propagate: int | None = field(default=None, metadata={"omit_none": True})  # exits on, state propagation
    mismatched_propagate: int | None = field(default=None, metadata={"omit_none": True})
    # multiply-adds per new token of each decoding graph, from its weight matrices (attention over the cache
    # left out): what benchmarks report analytic work with, without reading the graphs
    graph_macs: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Mismatch(_Record):
    file: str
    output: str
    batch: int
    max_abs_diff: float
    tolerance: float

    def __str__(self) -> str:
        return (f"{self.file} output {self.output!r} at batch {self.batch}: max abs diff {self.max_abs_diff:.3g} "
                f"> tolerance {self.tolerance:.3g}")


@dataclass(frozen=True)
class ChainParity(_Record):
    n: int
    mismatches_per_head: tuple[int, ...]
    real_mismatches_per_head: tuple[int, ...]  # only where torch's top-2 logits are further apart than the tolerance
    equal: bool


@dataclass(frozen=True)
class PrecisionCheck(_Record):
    precision: str = field(metadata={"choices": PRECISIONS})
    reference_threshold: float
    exit_decision_agreement: tuple[float, ...]
    prediction_agreement: tuple[float, ...]
    max_confidence_diff: float
    final_accuracy_fp32: float
    final_accuracy: float
    accuracy_change: float
    exit_accuracy_change: tuple[float, ...] = ()  # per exit head, this precision's test accuracy minus fp32's

    @property
    def worst_accuracy_change(self) -> float:
        return min((self.accuracy_change, *self.exit_accuracy_change))


@dataclass(frozen=True)
class ValidationReport(_Record):
    target: str
    validated: bool
    tolerance: float | None = None  # fp32 ONNX vs torch, max abs diff per output
    files: tuple[FileCheck, ...] = ()
    failures: tuple[Mismatch, ...] = ()
    max_abs_diff: float | None = None
    chain_parity: ChainParity | None = None
    torch_test_accuracy: float | None = None
    precision: PrecisionCheck | None = None
    head_weights: PrecisionCheck | None = None
    decoding: DecodeCheck | None = field(default=None, metadata={"omit_none": True})  # generative bundles  # int8-heads against fp32, when exported with them

    def with_precision(self, check: PrecisionCheck) -> "ValidationReport":
        return replace(self, precision=check)


def read_json_record(cls: type, path: str | os.PathLike, error: _Error = BundleError) -> Any:
    """Read a JSON file into the record ``cls``; every problem is one ``error`` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path} is not readable JSON: {str(exc)[:200]}") from None
    return from_dict(cls, data, f"{path}:", error)
