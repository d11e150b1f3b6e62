"""The one rule for exit thresholds, used by the bundle, the certificate, the runtime, the Triton
model repository and the served model.

An exit fires when its confidence is at least its threshold. A threshold is a number in [0, 1] (a
confidence is one), ``None`` (the exit is off: its head is not run), or, where a caller overrides
thresholds at run time, ``NEVER``: the head runs and its answer is never taken (what benchmarks use to
measure the cost of exits that do not fire). ``NEVER`` is not stored in a bundle.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from runtimes.errors import ConfigError, FreedeployError

__all__ = ["NEVER", "check_thresholds", "parse_thresholds"]

NEVER = math.inf  # asked and never fires: no confidence reaches it


def _bad(t: Any, never: bool) -> bool:
    if t is None:
        return False
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return True
    if never and t == NEVER:
        return False
    return not (math.isfinite(t) and 0.0 <= t <= 1.0)


def check_thresholds(thresholds: Sequence[Any], where: str, error: type[FreedeployError] = ConfigError,
                     never: bool = False) -> None:
    """Raise ``error`` naming the first threshold outside the rule; ``never``: NEVER is allowed too."""
    for i, t in enumerate(thresholds):
        if _bad(t, never):
            allowed = "in [0, 1], None (exit off)" + (" or runtimes.NEVER (asked, never fires)" if never else "")
            raise error(f"{where}: threshold {i} must be {allowed}, found {t!r:.40}")


def parse_thresholds(values: Any, exits: int, where: str = "thresholds",
                     error: type[FreedeployError] = ConfigError) -> list[float | None]:
    """A run-time threshold list: one per exit, each allowed by the rule (NEVER included), as floats."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise error(f"{where}: give a list of {exits} thresholds, got {type(values).__name__}")
    values = list(values)
    if len(values) != exits:
        raise error(f"{where}: {len(values)} thresholds given; this bundle has {exits} exits")
    check_thresholds(values, where, error, never=True)
    return [None if v is None else float(v) for v in values]
