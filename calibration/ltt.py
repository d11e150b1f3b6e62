"""Learn-then-Test (LTT) with fixed-sequence testing: certified early-exit thresholds.

Follows CALM (Schuster et al. 2022) and Learn then Test (Angelopoulos et al. 2021).

Conventions used throughout this package:

* ``delta`` is the **tolerance**: the largest acceptable risk (mean loss), e.g. 0.01 = 1 %.
* ``epsilon`` is the **failure probability** of the guarantee, e.g. 0.05.

The LTT paper and MAPIE call the tolerance ``alpha`` and the failure probability ``delta``.
Mixing the two conventions up is a classic bug: it silently certifies the wrong quantity.

A grid of candidate thresholds is fixed before any calibration loss is seen, ordered from most
conservative to most aggressive. For grid point j the null hypothesis is H_j: R(lambda_j) > delta.
Its p-value comes from the exact binomial tail (0/1 losses) or the Hoeffding-Bentkus bound
(losses in [0, 1]). Plain Hoeffding is deliberately not offered: it cannot certify 1 % at
practical calibration sizes. Fixed-sequence testing walks the grid in order and stops at the
first p-value above ``epsilon``; the result is the last safe index, or -1 when even the first
point fails (the caller then disables early exit). With probability at least 1 - epsilon over
the calibration draw, R(lambda_hat) <= delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

from runtimes.errors import CalibrationError, ConfigError

__all__ = ["binomial_pvalue", "hb_pvalue", "fixed_sequence", "learn_then_test", "LTTResult",
           "certifiable_tolerance", "max_certifiable_rate"]

_METHODS = ("auto", "binomial", "hoeffding-bentkus")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be an integer >= 1 (calibration examples), found {n!r}")


def _check_unit(name: str, value: float, meaning: str) -> None:
    if not (isinstance(value, (int, float, np.floating)) and 0.0 < float(value) < 1.0):
        raise ConfigError(f"{name} ({meaning}) must lie strictly between 0 and 1, found {value!r}")


def _binom_p(k: np.ndarray, n: int, delta: float) -> np.ndarray:
    return np.clip(stats.binom.cdf(k, n, delta), 0.0, 1.0)


def _hb_p(risk: np.ndarray, n: int, delta: float) -> np.ndarray:
    a = np.minimum(risk, delta)
    # rel_entr treats 0 * log 0 as 0, so risk == 0 needs no special case.
    h1 = special.rel_entr(a, delta) + special.rel_entr(1.0 - a, 1.0 - delta)
    hoeffding = np.exp(-n * h1)
    # The tolerance absorbs float error in means such as 3/1000, which must count as 3 losses.
    k = np.ceil(n * np.asarray(risk) - 1e-9)
    bentkus = math.e * stats.binom.cdf(k, n, delta)
    return np.clip(np.minimum(hoeffding, bentkus), 0.0, 1.0)


def binomial_pvalue(losses: int, n: int, delta: float) -> float:
    """Exact p-value of H: R > delta for ``losses`` 0/1 losses out of ``n``: P(Binomial(n, delta) <= losses)."""
    _check_n(n)
    _check_unit("delta", delta, "tolerance")
    if isinstance(losses, bool) or not isinstance(losses, (int, np.integer)) or not 0 <= losses <= n:
        raise ConfigError(f"losses must be an integer count in [0, n={n}], found {losses!r}")
    return float(_binom_p(np.asarray(losses), n, delta))


def hb_pvalue(risk: float, n: int, delta: float) -> float:
    """Hoeffding-Bentkus p-value of H: R > delta for an empirical mean loss ``risk`` in [0, 1] over ``n``."""
    _check_n(n)
    _check_unit("delta", delta, "tolerance")
    if not (isinstance(risk, (int, float, np.floating)) and 0.0 <= float(risk) <= 1.0):
        raise ConfigError(f"risk must be an empirical mean loss in [0, 1], found {risk!r}")
    return float(_hb_p(np.asarray(float(risk)), n, delta))


def fixed_sequence(pvalues: Sequence[float], epsilon: float) -> int:
    """Index of the last grid point whose p-value, and every earlier one, is <= epsilon; -1 if none."""
    _check_unit("epsilon", epsilon, "failure probability")
    p = np.asarray(pvalues, dtype=float).ravel()
    if not np.all(np.isfinite(p)):
        raise ConfigError("pvalues must be finite numbers, found NaN or infinity")
    failed = np.flatnonzero(p > epsilon)
    # The first failure ends the walk; the point before it is the last one actually certified.
    return int(failed[0]) - 1 if failed.size else int(p.size) - 1


@dataclass(frozen=True)
class LTTResult:
    """Outcome of :func:`learn_then_test`; ``pvalues`` and ``risks`` cover every grid point for reporting."""

    index: int
    pvalues: np.ndarray
    risks: np.ndarray
    n: int
    delta: float
    epsilon: float
    method: str

    @property
    def certified(self) -> bool:
        """Whether at least one grid point was certified (otherwise early exit must stay off)."""
        return self.index >= 0


def learn_then_test(losses: np.ndarray, delta: float, epsilon: float, method: str = "auto") -> LTTResult:
    """Certify the most aggressive grid point of ``losses`` (shape (G, n), values in [0, 1]) at (delta, epsilon)."""
    _check_unit("delta", delta, "tolerance")
    _check_unit("epsilon", epsilon, "failure probability")
    if method not in _METHODS:
        raise ConfigError(f"method must be one of {', '.join(_METHODS)}, found {method!r}")
    arr = np.asarray(losses, dtype=float)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigError(f"losses must have shape (grid points >= 1, examples >= 1), found {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError("losses must be finite, found NaN or infinity; check the loss computation")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ConfigError(f"losses must lie in [0, 1], found values in [{arr.min():g}, {arr.max():g}]")
    binary = bool(np.all((arr == 0.0) | (arr == 1.0)))
    if method == "auto":
        method = "binomial" if binary else "hoeffding-bentkus"
    elif method == "binomial" and not binary:
        raise ConfigError("method 'binomial' needs losses that are exactly 0 or 1, found fractional losses; "
                          "use 'hoeffding-bentkus' or 'auto'")
    n = arr.shape[1]
    risks = arr.mean(axis=1)
    if method == "binomial":
        pvalues = _binom_p(np.rint(arr.sum(axis=1)), n, delta)
    else:
        pvalues = _hb_p(risks, n, delta)
    return LTTResult(index=fixed_sequence(pvalues, epsilon), pvalues=pvalues, risks=risks, n=n,
                     delta=float(delta), epsilon=float(epsilon), method=method)


def certifiable_tolerance(n: int, epsilon: float, losses: int = 0) -> float:
    """Smallest delta that ``losses`` 0/1 losses out of ``n`` certify at failure probability ``epsilon``."""
    _check_n(n)
    _check_unit("epsilon", epsilon, "failure probability")
    if isinstance(losses, bool) or not isinstance(losses, (int, np.integer)) or not 0 <= losses <= n:
        raise ConfigError(f"losses must be an integer count in [0, n={n}], found {losses!r}")
    if losses == n:
        raise CalibrationError(f"every one of the {n} calibration examples has a loss, so no tolerance "
                               "below 1 can be certified; collect data where the early exit is right")
    # BinomCDF(k; n, d) = 1 - BetaCDF(d; k + 1, n - k), so the CDF hits epsilon at this beta quantile.
    return float(stats.beta.ppf(1.0 - epsilon, losses + 1, n - losses))


def max_certifiable_rate(n: int, delta: float, epsilon: float, method: str = "binomial") -> float:
    """Largest empirical loss rate (k/n, or HB risk) still certified at (delta, epsilon); -1.0 if none is."""
    _check_n(n)
    _check_unit("delta", delta, "tolerance")
    _check_unit("epsilon", epsilon, "failure probability")
    k = np.arange(n + 1)
    if method == "binomial":
        ok = k[_binom_p(k, n, delta) <= epsilon]
        return float(ok.max()) / n if ok.size else -1.0
    if method != "hoeffding-bentkus":
        raise ConfigError(f"method must be 'binomial' or 'hoeffding-bentkus', found {method!r}")
    # p is the min of two terms non-decreasing in risk, so the certified set is [0, max of their cut-offs].
    ok = k[math.e * stats.binom.cdf(k, n, delta) <= epsilon]
    bentkus_cut = float(ok.max()) / n if ok.size else -1.0
    gap = lambda r: -n * (special.rel_entr(r, delta) + special.rel_entr(1 - r, 1 - delta)) - math.log(epsilon)
    hoeffding_cut = -1.0
    if gap(0.0) <= 0:
        # Step just below the root so the returned rate itself still satisfies p <= epsilon.
        hoeffding_cut = max(optimize.brentq(gap, 0.0, delta, xtol=1e-13) - 1e-12, 0.0)
    return max(bentkus_cut, hoeffding_cut)
