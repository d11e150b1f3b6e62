"""``Classifier``: the runtime of a classifier bundle: a label at the first confident exit.

    from runtimes import Runtime
    rt = Runtime.load("bundles/digits")              # backend="auto": TensorRT if built, else ONNX Runtime
    result = rt.infer(["frame.png"])                 # paths, PIL images, HWC uint8 arrays, or text
    result = rt.infer("digit.png", question="is it even?")   # vision-language bundles
    result[0].label, result[0].confidence, result[0].block   # the block whose exit (or the final head) answered

Inputs larger than the bundle's max batch are split into several calls. ``rt.thresholds`` can be
overridden (None disables an exit, ``runtimes.NEVER`` runs it and never takes its answer).
``rt.infer(items, errors="keep")`` runs every input it can and reports the others in ``result.errors``
instead of raising for the whole list. ``rt.infer(items, deadline_ms=...)`` returns the best answer
computed when time is up (``runtimes.deadline``); ``Runtime.load(..., monitor=RATE)`` checks a share of
rows against the final head (``runtimes.monitor``); ``rt.stats()`` counts both.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar, Sequence

import numpy as np

from runtimes.backends import Backend
from runtimes.bundle import Bundle, ClassifierHead
from runtimes.chain import POLICIES, ChainOutput, RecordOutput, record_chain, run_chain, run_full, run_guarded
from runtimes.deadline import Deadline, DeadlineLog, StageClock, check_deadline
from runtimes.errors import ConfigError, InputError
from runtimes.monitor import Monitor
from runtimes.records import Certificate
from runtimes.result import Result, Stats
from runtimes.runtime import Runtime

__all__ = ["Classifier"]

NONFINITE = ("error", "flag")


class Classifier(Runtime, task="classify"):
    options: ClassVar[tuple[str, ...]] = ("policy", "nonfinite", "monitor")

    def __init__(self, bundle: Bundle, backend: Backend, policy: str = "per_sample", nonfinite: str = "error",
                 monitor: Monitor | float | None = None) -> None:
        self.check_options(bundle, policy=policy, nonfinite=nonfinite)
        super().__init__(bundle, backend)
        self.policy, self.nonfinite = policy, nonfinite
        self.labels: tuple[str, ...] = bundle.expect(ClassifierHead, "Classifier").labels
        own = self.certificate
        self._monitor = self._bind_monitor(monitor, own)
        # deadline mode: graph costs, first the certificate's measurements, then what this runtime's calls took
        self._clock, self._deadlines = StageClock(_measured_costs(bundle, own)), DeadlineLog()
        self._exit_blocks = np.array([e.block for e in bundle.exits] + [bundle.num_blocks], dtype=np.int64)

    @classmethod
    def check_options(cls, bundle: Bundle, **options: Any) -> None:
        super().check_options(bundle, **options)
        policy, nonfinite = options.get("policy", "per_sample"), options.get("nonfinite", "error")
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if nonfinite not in NONFINITE:
            raise ConfigError(f"nonfinite must be 'error' or 'flag', got {nonfinite!r}")

    def _bind_monitor(self, monitor: Monitor | float | None, own: Certificate | None) -> Monitor | None:
        """The monitor, given or made from a rate, bound to the certificate's tolerance."""
        if monitor is None:
            return None
        monitor = monitor if isinstance(monitor, Monitor) else Monitor(monitor)
        return monitor.bind(None if own is None else own.delta if own.delta is not None else own.risk_upper_bound)

    @property
    def monitor(self) -> Monitor | None:
        return self._monitor

    def stats(self) -> Stats:
        """Counters since loading: calls made with a deadline (forced answers apart: they are outside the
        certificate) and the drift monitor's (None without one)."""
        return Stats(self._deadlines.stats(self._clock), None if self._monitor is None else self._monitor.stats())

    def _chunks(self, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n, step = len(next(iter(arrays.values()))), self.bundle.batch.max
        if n <= step:
            return [arrays]
        return [{k: v[i:i + step] for k, v in arrays.items()} for i in range(0, n, step)]

    def infer(self, inputs: Any, policy: str | None = None, thresholds: Sequence[float | None] | None = None,
              question: str | Sequence[str] | None = None, errors: str = "raise",
              deadline_ms: float | None = None) -> Result:
        """Early-exit inference; batches larger than the bundle's max are split. ``thresholds``
        overrides ``rt.thresholds`` for this call only; ``question`` goes with image inputs to a
        vision-language bundle (see ``encode``).

        ``deadline_ms``: milliseconds from this call's start. No graph starts that measured costs say
        cannot end in time (a started one runs to its end); rows still open then take their deepest
        computed exit's answer, marked in ``result.forced`` (outside the certificate). The first exit
        that is on always runs.

        ``errors="raise"`` (default): the first input that cannot be read, encoded or run raises
        its InputError for the whole call. ``errors="keep"``: every other input still runs;
        ``result.errors`` maps each failed row to its InputError, that row holds class -1,
        confidence NaN, exit -1 and block 0, ``result.ok`` masks the rows that ran, and
        ``result[i]`` raises a failed row's error. What is wrong with the call itself (a closed
        runtime, bad thresholds or deadline, a malformed dict of arrays) raises either way."""
        start = time.perf_counter()
        self._open()
        if errors not in ("raise", "keep"):
            raise ConfigError(f"errors must be 'raise' or 'keep', got {errors!r}")
        th = self._thresholds if thresholds is None else self._checked(thresholds)
        policy = policy or self.policy
        deadline = None if deadline_ms is None else self._deadline(start, deadline_ms, th)
        if errors == "keep":
            return self._settled(self._infer_keeping(inputs, th, policy, question, deadline), deadline)
        arrays = self.encode(inputs, question)
        bad = self._nonfinite_rows(arrays)
        if bad is not None and self.nonfinite == "error":
            rows = np.flatnonzero(bad)
            raise InputError(f"{len(rows)} input row(s) contain NaN or Inf (rows {rows[:8].tolist()}); fix the input "
                             "or load the runtime with nonfinite='flag' to run them and flag the results")
        result = self._result([self._chain(c, th, policy, deadline) for c in self._chunks(arrays)])
        if self.nonfinite == "flag":
            result.flagged = np.zeros(len(result), dtype=bool) if bad is None else bad
        return result if deadline is None else self._settled(result, deadline)

    def _deadline(self, start: float, deadline_ms: object, th: list[float | None]) -> Deadline:
        ms = check_deadline(deadline_ms)
        if all(t is None for t in th):
            raise ConfigError("deadline_ms needs an exit that is on: with every threshold None only the final head "
                              "answers, and nothing is computed earlier to answer with")
        return Deadline(start + ms / 1000, self._clock)

    def _chain(self, arrays: dict[str, np.ndarray], th: list[float | None], policy: str,
               deadline: Deadline | None) -> ChainOutput:
        """One chunk: the plain loop, unless a deadline holds or the monitor draws a row (or holds exits off)."""
        monitor = self._monitor
        watch = None if monitor is None else monitor.draw(len(next(iter(arrays.values()))))
        serve = monitor is None or monitor.early_exit_on
        if deadline is None and watch is None and serve:
            return run_chain(self.backend, self.bundle, arrays, th, policy)
        out = run_guarded(self.backend, self.bundle, arrays, th, policy, deadline, watch, serve)
        if monitor is not None and watch is not None:
            early, final = out.checks or (np.zeros(0, np.int64), np.zeros(0, np.int64))
            monitor.update(early, final, out.continued)
        return out

    def _settled(self, result: Result, deadline: Deadline | None) -> Result:
        """Count a call made under a deadline: its forced rows and how late it returned."""
        if deadline is not None:
            forced = result.forced if result.forced is not None else np.zeros(len(result), dtype=bool)
            self._deadlines.add(len(result), result.blocks[forced].tolist(), time.perf_counter() - deadline.end)
        return result

    def _nonfinite_rows(self, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
        """(B,) bool: the rows holding NaN or Inf; None when every row is finite."""
        bad = None
        for a in arrays.values():
            # min and max are finite exactly when every element is (NaN propagates through both); the
            # per-row pass runs only when they are not
            if a.dtype.kind == "f" and a.size and not (math.isfinite(a.min()) and math.isfinite(a.max())):
                rows = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
                bad = rows if bad is None else bad | rows
        return bad

    def _infer_keeping(self, inputs: Any, th: list[float | None], policy: str,
                       question: str | Sequence[str] | None, deadline: Deadline | None = None,
                       full: bool = False) -> Result:
        """``infer(..., errors="keep")``: a failing input costs its own row only (``full``: the monolithic graph)."""
        items = self._items(inputs, question)
        errors: dict[int, InputError] = {}
        if isinstance(items, dict):
            arrays = self._check(items)
            rows = np.arange(len(next(iter(arrays.values()))))
        else:
            arrays, rows = self._encode_each(items, errors)
        n = len(rows) + len(errors)
        bad = self._nonfinite_rows(arrays) if len(rows) else None
        flagged = None if self.nonfinite == "error" else np.zeros(n, dtype=bool)
        if bad is not None and flagged is not None:
            flagged[rows] = bad
        elif bad is not None:
            errors.update((int(r), InputError("this input contains NaN or Inf")) for r in rows[bad])
            arrays, rows = {k: v[~bad] for k, v in arrays.items()}, rows[~bad]
        classes, confidences = np.full(n, -1, dtype=np.int64), np.full(n, np.nan, dtype=np.float32)
        exits, timings, ran = np.full(n, -1, dtype=np.int64), {}, np.zeros(n, dtype=bool)
        forced = None if deadline is None else np.zeros(n, dtype=bool)
        step = self.bundle.batch.max
        for start in range(0, len(rows), step):
            chunk, where = {k: v[start:start + step] for k, v in arrays.items()}, rows[start:start + step]
            for at, out in self._run_each(chunk, where, th, policy, errors, deadline, full):
                classes[at], confidences[at], exits[at], ran[at] = out.classes, out.confidences, out.exits, True
                if forced is not None:
                    forced[at] = out.forced
                for k, v in out.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
        blocks = np.where(ran, self._exit_blocks[exits], 0)  # the monolithic graph's exit -1: the full depth
        return Result(classes, confidences, exits, self.labels, blocks, timings, flagged,
                      dict(sorted(errors.items())), forced)

    def _encode_each(self, items: list[Any], errors: dict[int, InputError]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Encode the list at once; if an input fails, one by one, so that the others still encode."""
        try:
            return self._encode(items), np.arange(len(items))
        except InputError:
            pass
        parts, rows = [], []
        for i, item in enumerate(items):
            try:
                parts.append(self._encode([item]))
                rows.append(i)
            except InputError as exc:
                errors[i] = exc
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        return arrays, np.array(rows, dtype=np.int64)

    def _run_each(self, chunk: dict[str, np.ndarray], where: np.ndarray, th: list[float | None], policy: str,
                  errors: dict[int, InputError], deadline: Deadline | None = None,
                  full: bool = False) -> list[tuple[np.ndarray, ChainOutput]]:
        """Run one chunk; if the backend rejects it, row by row, so that one input cannot sink the rest."""
        def go(arrays: dict[str, np.ndarray]) -> ChainOutput:
            return run_full(self.backend, self.bundle, arrays) if full else self._chain(arrays, th, policy, deadline)

        try:
            return [(where, go(chunk))]
        except InputError:
            pass
        out = []
        for j, row in enumerate(where):
            try:
                out.append((where[j:j + 1], go({k: v[j:j + 1] for k, v in chunk.items()})))
            except InputError as exc:
                errors[int(row)] = exc
        return out

    def infer_full(self, inputs: Any, question: str | Sequence[str] | None = None, errors: str = "raise") -> Result:
        """The monolithic graph (no early exit): the baseline. ``question`` and ``errors`` as for ``infer``."""
        self._open()
        if errors not in ("raise", "keep"):
            raise ConfigError(f"errors must be 'raise' or 'keep', got {errors!r}")
        if errors == "keep":
            return self._infer_keeping(inputs, self._thresholds, self.policy, question, full=True)
        return self._result([run_full(self.backend, self.bundle, c) for c in self._chunks(self.encode(inputs, question))])

    def record(self, inputs: Any) -> RecordOutput:
        """Every exit's and the final head's confidence and prediction for every row."""
        self._open()
        parts = [record_chain(self.backend, self.bundle, c) for c in self._chunks(self.encode(inputs))]
        return RecordOutput(np.concatenate([p.confidences for p in parts]),
                            np.concatenate([p.predictions for p in parts]))

    def _result(self, parts: list[ChainOutput]) -> Result:
        forced = None if parts[0].forced is None else np.concatenate([p.forced for p in parts])
        if len(parts) == 1:  # one chunk: no copies
            p = parts[0]
            classes, confidences, exits, timings = p.classes, p.confidences, p.exits, dict(p.timings)
        else:
            timings = {}
            for p in parts:
                for k, v in p.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
            classes, confidences, exits = (np.concatenate([getattr(p, f) for p in parts])
                                           for f in ("classes", "confidences", "exits"))
        blocks = self._exit_blocks[exits]  # the monolithic graph reports exit -1: the last entry, the full depth
        return Result(classes, confidences, exits, self.labels, blocks, timings, forced=forced)

def _measured_costs(bundle: Bundle, cert: Certificate | None) -> dict[str, float]:
    """Seconds per batch-1 call of each chain graph, as the certificate measured them on this backend ({} if not)."""
    costs = None if cert is None else cert.costs_ms
    heads = [s.exit.graph.key for s in bundle.stages if s.exit is not None]
    if costs is None or len(costs.segments) != len(bundle.stages) or len(costs.exits) != len(heads):
        return {}
    return {key: ms / 1000 for key, ms in zip([s.segment.key for s in bundle.stages] + heads,
                                              [*costs.segments, *costs.exits])}


