"""Deadline mode: when a frame's time is up, the best answer computed so far.

``rt.infer(x, deadline_ms=...)`` starts its clock when the call starts (encoding counts). Before
each graph the loop asks (``DeadlineGate``) whether the graph, and the exit head that makes it
worth running, can still finish in time, from measured costs (``StageClock``); if not, it stops
there. Every row that has not exited is then answered by its *deepest* exit computed so far
(``FORCED_RULE``) and marked ``forced``: deeper exits agree more with the full model, and the
confidences of different heads are not calibrated against each other, so the most confident head is
no better a pick (measured in ``benchmarks/deadline_bench.py``). Forced answers are outside the
certificate.

Granularity: one graph call. A graph that has started runs to its end, so a call can overrun its
deadline by at most the graph that was running (when the cost estimate was too low), and a call
always computes its first exit that is on, however short the deadline: with no answer there is
nothing to return.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

from runtimes.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from runtimes.bundle import Bundle, StageSpec

__all__ = ["FORCED_RULE", "StageClock", "Deadline", "DeadlineGate", "DeadlineLog", "DeadlineStats", "check_deadline"]

FORCED_RULE = "deepest"  # a forced row takes the answer of the deepest exit computed for it
_WEIGHT = 0.1  # of the newest call in the running mean and deviation of a graph's cost
_SPREAD = 3.0  # deviations above the mean a graph is assumed to take: overrunning costs more than stopping early


def check_deadline(deadline_ms: object) -> float:
    """Milliseconds, a finite number > 0; anything else is a one-line ConfigError."""
    if (isinstance(deadline_ms, bool) or not isinstance(deadline_ms, numbers.Real) or not math.isfinite(deadline_ms)
            or deadline_ms <= 0):
        raise ConfigError(f"deadline_ms must be a finite number of milliseconds > 0, got {deadline_ms!r}")
    return float(deadline_ms)


class StageClock:
    """What each graph costs, in seconds, by the rows it runs on: seeded with measured batch-1 costs
    (the certificate's), then learnt from every graph call made under a deadline."""

    def __init__(self, prior: Mapping[str, float] | None = None) -> None:
        self._prior = dict(prior or {})  # graph key -> seconds per call at batch 1
        self._seen: dict[tuple[str, int], tuple[float, float]] = {}  # (key, rows) -> (running mean, mean |deviation|)
        self._lock = threading.Lock()
        self.longest = 0.0  # seconds: the longest single graph call observed

    def observe(self, key: str, rows: int, seconds: float) -> None:
        with self._lock:
            self.longest = max(self.longest, seconds)
            old = self._seen.get((key, rows))
            if old is None:
                self._seen[key, rows] = (seconds, seconds / 4)
                return
            mean, dev = old
            self._seen[key, rows] = (mean + _WEIGHT * (seconds - mean), dev + _WEIGHT * (abs(seconds - mean) - dev))

    def predict(self, key: str, rows: int) -> float | None:
        """Seconds the graph is expected to take at most; None when nothing is known about it."""
        seen = self._seen.get((key, rows))
        if seen is not None:
            return seen[0] + _SPREAD * seen[1]
        known = [(n, m + _SPREAD * d) for (k, n), (m, d) in list(self._seen.items()) if k == key]
        above = [c for n, c in known if n > rows]
        if above:  # a bigger batch costs at least as much
            return min(above)
        if known:  # scaled up linearly from the biggest batch seen: costs grow slower than that
            n, c = max(known)
            return c * rows / n
        prior = self._prior.get(key)
        return None if prior is None else prior * rows


@dataclass(frozen=True)
class Deadline:
    """One call's deadline: ``end`` on ``time.perf_counter``'s clock."""

    end: float
    clock: StageClock

    def fits(self, keys: Sequence[str], rows: int) -> bool:
        """Can these graphs still run, one after the other, on ``rows`` rows and end in time?"""
        need = 0.0
        for key in keys:
            need += self.clock.predict(key, rows) or 0.0  # unknown: start it while there is time at all
        return time.perf_counter() + need <= self.end


class Progress(Protocol):
    """What the gate reads of a walk's rows (``runtimes.chain``)."""

    alive: np.ndarray  # original row index of every row in the state

    def answered(self) -> bool:
        """Has every open row in the state an exit's answer?"""


class DeadlineGate:
    """One call's deadline over the early-exit stage walk, which asks it before each graph and tells
    it what each graph cost. A segment runs only if it fits together with the rest of the way to the
    next answer (a segment alone adds none); an exit head only if it fits on its own (the segment
    before it may have run longer than expected: one graph past the deadline at most). Until every
    open row has an exit's answer, graphs run whatever the time."""

    def __init__(self, deadline: Deadline, bundle: Bundle, thresholds: Sequence[float | None], rows: Progress) -> None:
        """``thresholds``: the walk's own, read as they stand (a head is off once no row waits for one)."""
        self.deadline, self.bundle, self.thresholds, self.rows = deadline, bundle, thresholds, rows

    def segment(self, stage: StageSpec) -> bool:
        """May stage's segment run?"""
        rows = self.rows
        return not rows.answered() or self.deadline.fits(self._way_to_answer(stage.index), len(rows.alive))

    def head(self, key: str) -> bool:
        """May this exit head run?"""
        return not self.rows.answered() or self.deadline.fits((key,), len(self.rows.alive))

    def observe(self, key: str, seconds: float) -> None:
        self.deadline.clock.observe(key, len(self.rows.alive), seconds)

    def _way_to_answer(self, k: int) -> tuple[str, ...]:
        """Graph keys from stage k's segment to the next answer: the next exit head that runs, else the
        final head at the end of the chain."""
        keys = []
        for stage in self.bundle.stages[k:]:
            keys.append(stage.segment.key)
            if stage.exit is not None and self.thresholds[stage.index] is not None:
                keys.append(stage.exit.graph.key)
                break
        return tuple(keys)


@dataclass(frozen=True)
class DeadlineStats:
    """Calls made with a deadline, so far; ``to_dict`` for JSON."""

    calls: int
    rows: int
    forced: int  # rows answered by an exit that did not fire: outside the certificate
    forced_by_block: Mapping[int, int]  # forced rows by the block of the exit that answered them
    late: int  # calls that returned after their deadline
    worst_overrun_ms: float  # the most a call returned after its deadline (0 when none did)
    longest_graph_ms: float  # the longest single graph call made under a deadline: the granularity
    rule: str = FORCED_RULE

    def to_dict(self) -> dict:
        out = asdict(self)
        out["forced_by_block"] = {str(k): v for k, v in self.forced_by_block.items()}
        return out


@dataclass
class DeadlineLog:
    """Counters behind ``DeadlineStats``, safe to update from several threads."""

    calls: int = 0
    rows: int = 0
    forced: int = 0
    forced_by_block: dict[int, int] = field(default_factory=dict)
    late: int = 0
    worst_overrun: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, rows: int, forced_blocks: Sequence[int], overrun: float) -> None:
        with self._lock:
            self.calls += 1
            self.rows += rows
            self.forced += len(forced_blocks)
            for b in forced_blocks:
                self.forced_by_block[b] = self.forced_by_block.get(b, 0) + 1
            self.late += overrun > 0
            self.worst_overrun = max(self.worst_overrun, overrun)

    def stats(self, clock: StageClock) -> DeadlineStats:
        with self._lock:
            return DeadlineStats(self.calls, self.rows, self.forced, dict(sorted(self.forced_by_block.items())),
                                 self.late, 1000 * self.worst_overrun, 1000 * clock.longest)
