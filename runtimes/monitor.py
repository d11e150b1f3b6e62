"""Drift monitor: does the certificate still hold on the inputs the runtime sees now?

The certificate bounds the disagreement between early exit and the full model on inputs drawn
like the calibration set. A random share of rows (``rate``) is therefore also run on to the final
head, and the monitor compares the two answers:

- **alarm** (a change detector): a mixture Shiryaev-Roberts e-detector (Shin, Ramdas & Rinaldo,
  "E-detectors", 2023). For each bet ``l`` on a fixed grid, ``R <- (R + 1) * (1 + l * (x - tolerance))``
  per checked row (``x``: 1 when the answers differ); the statistic is the mean over the grid, and
  the alarm sounds when it reaches ``1 / false_alarm_rate``. While every checked row disagrees
  with probability at most the tolerance, ``R - t`` is a supermartingale, so the mean number of
  checked rows before a false alarm is at least ``1 / false_alarm_rate``, and the chance of one
  within ``N`` checked rows is at most ``N * false_alarm_rate`` (Ville's inequality), however often
  it is checked. Unlike a test that accumulates from the start, the ``+ 1`` restarts the bet at
  every row, so a long clean history does not delay detecting a later shift.
- **upper bound** (what the stats report, and how an alarm ends): an anytime-valid upper confidence
  bound on the disagreement since the last alarm or reset, from a betting test of "the disagreement
  is at least p" (a mixture over a fixed grid of bets; it depends on the counts only). It holds
  simultaneously at every row, so it may be read as often as one likes. After an alarm, the
  monitor recovers when this bound is back at or under the tolerance.

The monitor measures disagreement, label-free. Under a certificate on the accuracy drop (``calibrate
--labels``) disagreement bounds the certified loss from above, so the alarm is conservative there.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from runtimes.errors import ConfigError

__all__ = ["Monitor", "MonitorStats", "upper_bound"]

log = logging.getLogger(__name__)

# bets of the recovery test and the reported bound, as a share of the largest bet that keeps every factor >= 0
_BOUND_BETS = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class MonitorStats:
    """The monitor's counters; ``to_dict`` for JSON."""

    rate: float  # share of rows drawn for a check (1.0 while early exit is switched off: checks are free then)
    tolerance: float  # the disagreement the certificate allows
    state: str  # "ok" or "alarm"
    early_exit_on: bool  # False while an alarm holds with fallback=True: every row is answered by the final head
    rows: int  # rows the monitor saw
    drawn: int  # rows drawn for a check
    checked: int  # drawn rows whose early answer was compared with the final head's
    disagreements: int  # checked rows where the two differed
    continued: int  # rows that ran on past their exit only to be checked: the monitor's whole cost
    disagreement: float  # disagreements / checked, since the monitor started (NaN before the first check)
    window_checked: int  # checked rows since the last alarm, recovery or reset
    window_disagreements: int
    upper_bound: float  # anytime-valid upper confidence bound on the disagreement over that window
    detector: float  # the e-detector's statistic; the alarm sounds at alarm_level
    alarm_level: float  # 1 / false_alarm_rate
    alarms: int
    rows_to_alarm: int | None  # checked rows from the window's start to the latest alarm

    def to_dict(self) -> dict:
        return asdict(self)


def _rejects_at_least(p: float, n: int, k: int, alpha: float) -> bool:
    """Does the betting test reject "the disagreement is at least p" after k disagreements in n rows?
    Each row multiplies the wealth of bet b by ``1 + b * (p - x)``; the test rejects when the mean
    wealth over the bets reaches 1 / alpha."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return k < n
    logs = []
    for share in _BOUND_BETS:  # bet share / (1 - p): the largest that keeps both factors >= 0
        bet = share / (1.0 - p)
        logs.append((n - k) * math.log1p(bet * p) + k * math.log1p(-bet * (1.0 - p)))
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs)) >= -math.log(alpha)


def upper_bound(n: int, k: int, alpha: float = 0.05) -> float:
    """Anytime-valid (1 - alpha) upper confidence bound on a disagreement rate from k of n rows."""
    if n == 0:
        return 1.0
    lo, hi = k / n, 1.0
    if not _rejects_at_least(hi, n, k, alpha):
        return 1.0
    for _ in range(30):  # the test rejects every p above the bound: bisect for the edge
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if _rejects_at_least(mid, n, k, alpha) else (mid, hi)
    return hi


class Monitor:
    """Opt-in drift monitor for ``Runtime.load(..., monitor=Monitor(...))`` (or ``monitor=RATE``).

    ``rate``: the share of rows checked against the final head, in (0, 1]. ``tolerance``: the
    disagreement allowed, by default the certificate's (its delta). ``false_alarm_rate``: per checked
    row; the mean time to a false alarm is at least its inverse. ``confidence``: of the reported upper
    bound, which also ends an alarm. ``fallback``: while an alarm holds, answer every row with the final
    head (and check every row, which then costs the exit heads only). ``on_alarm(stats)`` is called once
    per alarm, after a warning is logged. ``seed`` makes the draw of rows reproducible."""

    def __init__(self, rate: float, tolerance: float | None = None, false_alarm_rate: float = 1e-6,
                 confidence: float = 0.95, fallback: bool = False,
                 on_alarm: Callable[[MonitorStats], None] | None = None, seed: int | None = None) -> None:
        self.rate = _share(rate, "monitor rate", closed=True)
        self.false_alarm_rate = _share(false_alarm_rate, "false_alarm_rate")
        self.confidence = _share(confidence, "confidence")
        self.tolerance = None if tolerance is None else _share(tolerance, "tolerance")
        if on_alarm is not None and not callable(on_alarm):
            raise ConfigError(f"on_alarm must be callable, got {type(on_alarm).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {seed!r}")
        self.fallback, self.on_alarm, self.seed = bool(fallback), on_alarm, seed
        self._lock = threading.Lock()
        self.reset()

    def bind(self, tolerance: float | None) -> "Monitor":
        """Take the certificate's tolerance unless one was given; a monitor without one is a ConfigError."""
        if self.tolerance is None:
            if tolerance is None:
                raise ConfigError("the monitor needs a tolerance: these thresholds carry no certificate with one; "
                                  "calibrate the bundle, or pass Monitor(rate, tolerance=...)")
            self.tolerance = _share(tolerance, "the certificate's tolerance")
            with self._lock:
                self._bets = _detector_bets(self.tolerance)
                self._detector = np.zeros(len(self._bets))
        return self

    def reset(self) -> None:
        """Forget everything: counters, alarm, the draw (restarted from the seed)."""
        with self._lock:
            self._rng = np.random.default_rng(self.seed)
            self._seen, self._next = 0, self._gap() - 1  # row index (over all rows seen) of the next row to check
            self._alarmed, self._alarms, self._rows_to_alarm = False, 0, None
            self._drawn = self._checked = self._disagreements = self._continued = 0
            self._window_n = self._window_k = 0
            self._bound = (0, 0, 1.0)  # (checked, disagreements, their upper bound)
            self._bets = None if self.tolerance is None else _detector_bets(self.tolerance)
            self._detector = np.zeros(0 if self._bets is None else len(self._bets))

    def _gap(self) -> int:
        return 1 if self.rate >= 1.0 else int(self._rng.geometric(self.rate))  # iid Bernoulli(rate) rows

    @property
    def early_exit_on(self) -> bool:
        return not (self._alarmed and self.fallback)

    def draw(self, n: int) -> np.ndarray | None:
        """(n,) bool: which rows of a batch of n get checked; None when none (the common case)."""
        with self._lock:
            start, self._seen = self._seen, self._seen + n
            if not self.early_exit_on:  # the final head answers every row anyway: check them all
                self._drawn += n
                if self._next < self._seen:  # the draw resumes after the alarm, memoryless
                    self._next = self._seen + self._gap() - 1
                return np.ones(n, dtype=bool)
            if self._next >= self._seen:
                return None
            rows = np.zeros(n, dtype=bool)
            while self._next < self._seen:
                rows[self._next - start] = True
                self._next += self._gap()
            self._drawn += int(rows.sum())
            return rows

    def update(self, early: np.ndarray, final: np.ndarray, continued: int = 0) -> None:
        """Checked rows: the early-exit answers and the final head's, row for row."""
        differ = np.asarray(early) != np.asarray(final)
        alarm = recovered = False
        with self._lock:
            self._continued += continued
            self._checked += len(differ)
            self._disagreements += int(differ.sum())
            for x in differ:
                self._window_n += 1
                self._window_k += int(x)
                if self._alarmed:
                    continue
                self._detector = (self._detector + 1.0) * (1.0 + self._bets * (float(x) - self.tolerance))
                if self._detector.mean() >= 1.0 / self.false_alarm_rate:
                    self._alarmed, self._alarms, self._rows_to_alarm = True, self._alarms + 1, self._window_n
                    self._window_n = self._window_k = 0
                    alarm = True
            if self._alarmed and not alarm and self._window_n and _rejects_at_least(
                    self.tolerance, self._window_n, self._window_k, 1.0 - self.confidence):
                self._alarmed, recovered = False, True
                self._detector = np.zeros(len(self._bets))
                self._window_n = self._window_k = 0
        if alarm:
            stats = self.stats()
            log.warning("drift monitor: early exit disagrees with the full model more than the certified %.2f%% "
                        "(alarm after %d checked rows)%s; the certificate does not hold on these inputs",
                        100 * self.tolerance, stats.rows_to_alarm,
                        ": answering with the final head until it recovers" if self.fallback else "")
            if self.on_alarm is not None:
                try:
                    self.on_alarm(stats)
                except Exception:  # noqa: BLE001 - a failing callback must not cost the frame its answer
                    log.exception("drift monitor: the on_alarm callback failed")
        elif recovered:
            log.info("drift monitor: the disagreement is back under %.2f%% (%.0f%% upper bound); early exit is on",
                     100 * self.tolerance, 100 * self.confidence)

    def stats(self) -> MonitorStats:
        with self._lock:
            n, k, total = self._window_n, self._window_k, self._checked
            if self._bound[:2] != (n, k):  # a bisection: worth keeping while no row was checked
                self._bound = (n, k, upper_bound(n, k, 1.0 - self.confidence))
            return MonitorStats(
                rate=1.0 if not self.early_exit_on else self.rate, tolerance=float(self.tolerance or 0.0),
                state="alarm" if self._alarmed else "ok", early_exit_on=self.early_exit_on, rows=self._seen,
                drawn=self._drawn, checked=total, disagreements=self._disagreements, continued=self._continued,
                disagreement=self._disagreements / total if total else math.nan, window_checked=n,
                window_disagreements=k, upper_bound=self._bound[2],
                detector=float(self._detector.mean()) if len(self._detector) else 0.0,
                alarm_level=1.0 / self.false_alarm_rate, alarms=self._alarms, rows_to_alarm=self._rows_to_alarm)


def _detector_bets(tolerance: float) -> np.ndarray:
    """Bets of the e-detector, as multiples of 1 / tolerance (the largest that keeps every factor >= 0):
    a bet of c / tolerance grows fastest against a disagreement near tolerance + c, so a geometric grid
    from half the tolerance to 0.9 covers small and large shifts alike."""
    shares, c = [], tolerance / 2
    while c < 0.9:
        shares.append(c)
        c *= 2
    return np.array([*shares, 0.9]) / tolerance


def _share(value: object, what: str, closed: bool = False) -> float:
    """A number in (0, 1) (or (0, 1] when ``closed``), else a one-line ConfigError."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and 0.0 < value and (value <= 1.0 if closed else value < 1.0))
    if not ok:
        raise ConfigError(f"{what} must be a number in (0, {'1]' if closed else '1)'}, got {value!r}")
    return float(value)
