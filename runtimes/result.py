"""What ``Runtime.infer`` returns: per-row arrays (``Result``) and one row as a record (``Prediction``);
what ``Runtime.stats`` returns (``Stats``).

Exits are named by the block whose output they read (``block``); ``exit_index`` is the exit's
position in the bundle (the number of exits means the final head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtimes.deadline import DeadlineStats
from runtimes.errors import InputError
from runtimes.monitor import MonitorStats

__all__ = ["Prediction", "Result", "Generation", "Stats"]


@dataclass(frozen=True)
class Prediction:
    label: str
    class_index: int
    confidence: float
    exit_index: int  # position in the bundle's exits; len(exits) means the final head
    block: int  # 1-based block whose output decided: how exits are named (the model's depth for the final head)
    forced: bool = False  # the deadline came first: the deepest exit computed answered, outside the certificate

    @property
    def exit(self) -> int:
        """The same as ``exit_index`` (the name before exits were named by block everywhere)."""
        return self.exit_index


@dataclass
class Result:
    classes: np.ndarray
    confidences: np.ndarray
    exits: np.ndarray
    labels: tuple[str, ...]
    blocks: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)  # graph key -> seconds in this call
    flagged: np.ndarray | None = None  # rows whose inputs held NaN or Inf (nonfinite="flag"); answers unreliable
    # errors="keep": row -> why that input did not run; its row holds class -1, confidence NaN, exit -1, block 0
    errors: dict[int, InputError] = field(default_factory=dict)
    # infer(deadline_ms=...): rows answered by their deepest computed exit when time was up (None without a deadline)
    forced: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def ok(self) -> np.ndarray:
        """(B,) bool: the rows that ran (all of them unless ``infer(..., errors="keep")`` kept a failure)."""
        ok = np.ones(len(self), dtype=bool)
        ok[list(self.errors)] = False
        return ok

    def __getitem__(self, i: int) -> Prediction:
        """Row ``i``'s answer; a row that failed under ``errors="keep"`` raises its InputError."""
        row = i + len(self) if i < 0 else i
        if row in self.errors:
            raise self.errors[row]
        c = int(self.classes[i])
        forced = self.forced is not None and bool(self.forced[i])
        return Prediction(self.labels[c], c, float(self.confidences[i]), int(self.exits[i]), int(self.blocks[i]), forced)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class Generation:
    """What ``Runtime.generate`` wrote for one image (and prompt)."""

    text: str
    tokens: tuple[int, ...]  # generated ids, end-of-sequence included when it came
    blocks: tuple[int, ...]  # per token, the block whose output decided it (num_blocks: the final head)
    mode: str  # exit, speculative or full
    calls: int  # graph calls, encode and prefill included
    seconds: float  # the whole call, prefill included
    prefill_seconds: float = 0.0  # encode and prefill
    confidences: tuple[float, ...] = ()  # per token, the confidence of the head that decided it

    @property
    def mean_exit_block(self) -> float:
        return sum(self.blocks) / len(self.blocks) if self.blocks else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Stats:
    """``Runtime.stats()``: counters since the runtime was loaded."""

    deadline: DeadlineStats  # calls made with deadline_ms
    monitor: MonitorStats | None  # the drift monitor's; None when the runtime has none

    def to_dict(self) -> dict[str, Any]:
        return {"deadline": self.deadline.to_dict(), "monitor": None if self.monitor is None else self.monitor.to_dict()}
