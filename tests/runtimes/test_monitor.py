"""The drift monitor: it leaves answers alone, costs only the rows it checks, stays quiet on clean
data and sounds its alarm on a real shift (darkened digits), then recovers.

The long runs replay a real bundle's recorded answers: every exit's and the final head's confidence
and class for each clean and each darkened test image, computed once with ONNX Runtime on a
calibrated digits bundle, then served by the scripted fake backend, so that tens of thousands of
rows go through the runtime's own loop and monitor in seconds.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from runtimes.backends.fake import FakeBackend, fake_bundle
from runtimes.errors import ConfigError
from runtimes.monitor import Monitor, upper_bound
from runtimes.runtime import Runtime

V1_DIGITS = Path(__file__).parent / "v1_digits_bundle"  # two exits, certified: disagreement <= 5 % (epsilon 0.1)
DARKEN = 0.3  # pixel values scaled by this: a camera moved to a dim room
# Alarm within this many checked rows of darkened digits. The detector needs about
# log(1 / false_alarm_rate) / KL(shifted || tolerance) rows: 14 / 0.24, about 60, at 26 % against 5 %.
ALARM_WITHIN = 250
CLEAN_ROWS = 20_000  # every one checked (rate 1): no false alarm


@pytest.fixture(scope="module")
def recorded() -> dict:
    """Recorded answers on the test split: rows [0, n) clean, [n, 2n) darkened; the thresholds and tolerance."""
    from analysis.evaluation import bundle_split

    with Runtime.load(V1_DIGITS, backend="onnxruntime") as rt:
        data, idx = bundle_split(rt.bundle, None, "test")
        clean = [data.items[i] for i in idx]
        dark = [np.rint(img * DARKEN).astype(np.uint8) for img in clean]
        rec = rt.record(rt.encode(clean + dark))
        cert = rt.bundle.calibration[rt.calibration_key]
        return {"conf": rec.confidences, "pred": rec.predictions, "n": len(idx), "thresholds": rt.thresholds,
                "tolerance": cert.delta}


def _disagreement(rec: dict, rows: np.ndarray) -> float:
    conf, pred, th = rec["conf"][rows], rec["pred"][rows], rec["thresholds"]
    taken = np.full(len(rows), len(th))
    for k in reversed(range(len(th))):
        taken = np.where(conf[:, k] >= th[k], k, taken)
    return float((pred[np.arange(len(rows)), taken] != pred[:, -1]).mean())


def _replay(rec: dict, rate: float, **options) -> Runtime:
    """The recorded answers served by the fake, monitored at the certificate's tolerance."""
    bundle = fake_bundle(len(rec["thresholds"]))
    monitor = Monitor(rate, tolerance=rec["tolerance"], **options)
    rt = Runtime(bundle, FakeBackend(bundle, confidences=rec["conf"], predictions=rec["pred"]), monitor=monitor)
    rt.thresholds = rec["thresholds"]
    return rt


def _stream(rt: Runtime, rows: np.ndarray, batch: int = 64, stop_at_alarm: bool = True) -> None:
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch].astype(np.float32)
        rt.infer({"x": chunk.reshape(len(chunk), 1, 1, 1)})
        if stop_at_alarm and rt.stats().monitor.alarms:
            return


def test_the_shift_is_real_and_well_above_the_tolerance(recorded) -> None:
    n = recorded["n"]
    clean, dark = _disagreement(recorded, np.arange(n)), _disagreement(recorded, np.arange(n, 2 * n))
    assert clean <= recorded["tolerance"] < 4 * recorded["tolerance"] <= dark  # measured: 3.9 % and 27.9 %


def test_alarm_on_darkened_digits_within_the_stated_rows(recorded, caplog) -> None:
    n, seen = recorded["n"], []
    rt = _replay(recorded, 1.0, seed=0, on_alarm=seen.append)
    rng = np.random.default_rng(1)
    with caplog.at_level(logging.WARNING, logger="runtimes.monitor"):
        _stream(rt, rng.integers(n, 2 * n, 2_000), batch=8, stop_at_alarm=False)
    m = rt.stats().monitor
    assert m.alarms == 1 and m.state == "alarm" and m.rows_to_alarm <= ALARM_WITHIN
    assert len(seen) == 1 and seen[0].rows_to_alarm == m.rows_to_alarm  # warned once, the callback once
    assert len([r for r in caplog.records if "drift monitor" in r.message]) == 1
    json.dumps(rt.stats().to_dict())


def test_alarm_at_a_two_percent_rate_comes_after_the_same_checks(recorded) -> None:
    n = recorded["n"]
    rt = _replay(recorded, 0.02, seed=0)
    _stream(rt, np.random.default_rng(2).integers(n, 2 * n, 40_000), batch=64)
    m = rt.stats().monitor
    assert m.alarms == 1 and m.rows_to_alarm <= ALARM_WITHIN and m.rows < 40_000
    assert abs(m.drawn / m.rows - 0.02) < 0.006


def test_clean_digits_raise_no_alarm_over_a_long_run(recorded) -> None:
    n = recorded["n"]
    rt = _replay(recorded, 1.0, seed=0)
    _stream(rt, np.random.default_rng(3).integers(0, n, CLEAN_ROWS), batch=64, stop_at_alarm=False)
    m = rt.stats().monitor
    assert m.checked == CLEAN_ROWS and m.alarms == 0 and m.state == "ok"
    assert abs(m.disagreement - _disagreement(recorded, np.arange(n))) < 0.01
    assert m.disagreement <= m.upper_bound <= recorded["tolerance"]  # the live check confirms the certificate


def test_fallback_answers_with_the_final_head_until_the_disagreement_recovers() -> None:
    rows = 400
    conf = np.tile(np.array([[0.99, 0.99, 0.99, 0.99]], np.float32), (rows, 1))
    pred = np.zeros((rows, 4), np.int64)
    pred[:200, 0] = 1  # rows 0..199: exit 0 disagrees with the final head; rows 200..399 agree
    bundle = fake_bundle(3)
    seen: list = []
    rt = Runtime(bundle, FakeBackend(bundle, confidences=conf, predictions=pred),
                 monitor=Monitor(0.1, tolerance=0.05, fallback=True, on_alarm=seen.append, seed=0))
    rt.thresholds = [0.5, 0.5, 0.5]
    x = lambda r: {"x": np.asarray(r, np.float32).reshape(-1, 1, 1, 1)}  # noqa: E731
    for i in range(0, 2_000, 20):
        rt.infer(x(np.arange(i, i + 20) % 200))
        if seen:
            break
    assert len(seen) == 1 and not rt.monitor.early_exit_on
    res = rt.infer(x([5]))
    assert res.exits[0] == 3 and res.classes[0] == 0  # the final head answers while the alarm holds
    for _ in range(100):
        rt.infer(x(np.arange(200, 220)))
        if rt.monitor.early_exit_on:
            break
    m = rt.stats().monitor
    assert m.state == "ok" and m.early_exit_on and m.upper_bound == 1.0 and m.window_checked == 0
    assert rt.infer(x([5])).exits[0] == 0  # early exit is back
    for i in range(0, 4_000, 20):  # the shift comes back: a second alarm, a second warning
        rt.infer(x(np.arange(i, i + 20) % 200))
        if len(seen) == 2:
            break
    assert len(seen) == 2 and rt.stats().monitor.alarms == 2


def test_monitoring_changes_no_answer_and_costs_only_the_checked_rows() -> None:
    rng = np.random.default_rng(0)
    conf, pred = rng.random((64, 4)).astype(np.float32), rng.integers(0, 10, (64, 4))
    bundle, th = fake_bundle(3), [0.5] * 3
    plain = Runtime(bundle, FakeBackend(bundle, confidences=conf, predictions=pred))
    watched = Runtime(bundle, FakeBackend(bundle, confidences=conf, predictions=pred),
                      monitor=Monitor(0.25, tolerance=0.05, seed=4))
    x = {"x": np.arange(64, dtype=np.float32).reshape(64, 1, 1, 1)}
    for policy in ("per_sample", "batch"):
        a, b = plain.infer(x, policy=policy, thresholds=th), watched.infer(x, policy=policy, thresholds=th)
        assert np.array_equal(a.classes, b.classes) and np.array_equal(a.exits, b.exits)
    extra = 0
    for i in range(64):  # one row per call: a checked row runs on through the segments after its exit, no more
        plain.backend.calls.clear()
        watched.backend.calls.clear()
        drawn = watched.stats().monitor.drawn
        a, b = plain.infer({"x": x["x"][i:i + 1]}, thresholds=th), watched.infer({"x": x["x"][i:i + 1]}, thresholds=th)
        assert a.classes[0] == b.classes[0] and a.exits[0] == b.exits[0]
        after = [f"segment_{k}" for k in range(a.exits[0] + 1, 4)] if watched.stats().monitor.drawn > drawn else []
        assert [k for k, _ in watched.backend.calls] == [k for k, _ in plain.backend.calls] + after
        extra += len(after) > 0
    m = watched.stats().monitor
    assert m.rows == 192 and m.checked == m.drawn and 20 < m.drawn < 80 and m.continued >= extra > 0


def test_the_draw_is_reproducible_and_does_not_depend_on_batching() -> None:
    a, b = Monitor(0.05, tolerance=0.05, seed=7), Monitor(0.05, tolerance=0.05, seed=7)
    one_by_one = np.concatenate([_mask(a.draw(1), 1) for _ in range(10_000)])
    batched = np.concatenate([_mask(b.draw(100), 100) for _ in range(100)])
    assert np.array_equal(one_by_one, batched) and 0.04 < one_by_one.mean() < 0.06


def _mask(rows: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, bool) if rows is None else rows


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.02", None])
def test_bad_rates_are_one_line_config_errors(bad) -> None:
    with pytest.raises(ConfigError, match="monitor rate must be a number in \\(0, 1\\]") as info:
        Monitor(bad)
    assert "\n" not in str(info.value)


def test_a_monitor_needs_a_tolerance() -> None:
    bundle = fake_bundle(3)  # no certificate
    with pytest.raises(ConfigError, match="needs a tolerance"):
        Runtime(bundle, FakeBackend(bundle), monitor=0.02)
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="tolerance must be"):
            Monitor(0.02, tolerance=bad)
    rt = Runtime(bundle, FakeBackend(bundle), monitor=Monitor(0.02, tolerance=0.01))
    assert rt.stats().monitor.tolerance == 0.01 and rt.stats().deadline.calls == 0


def test_load_takes_a_rate_and_the_certificate_tolerance() -> None:
    with Runtime.load(V1_DIGITS, backend="onnxruntime", monitor=0.5) as rt:
        assert rt.monitor.rate == 0.5 and rt.monitor.tolerance == 0.05
    with pytest.raises(ConfigError, match="monitor rate"):
        Runtime.load(V1_DIGITS, backend="onnxruntime", monitor=2.0)


def test_the_upper_bound_is_anytime_valid_and_covers_the_exact_one() -> None:
    assert upper_bound(0, 0) == 1.0 and upper_bound(1000, 0) < 0.005
    assert all(upper_bound(500, k) < upper_bound(500, k + 5) for k in range(0, 100, 5))
    beta = pytest.importorskip("scipy.stats").beta
    for n, k in [(50, 0), (359, 14), (1000, 10), (5000, 40)]:
        exact = beta.ppf(0.95, k + 1, n - k)  # Clopper-Pearson, one fixed n
        assert k / n < exact <= upper_bound(n, k) < exact + 0.6 * math.sqrt(exact * (1 - exact) / n) + 0.01


def test_false_alarms_stay_rare_at_the_tolerance_itself() -> None:
    """Rows that disagree exactly at the tolerance, 10 runs of 20,000 checked rows: N * rate = 2 %
    bounds the chance of any false alarm in a run; none is expected."""
    alarms = 0
    for seed in range(10):
        m = Monitor(1.0, tolerance=0.05)
        x = np.random.default_rng(seed).random(20_000) < 0.05
        m.update(x.astype(np.int64), np.zeros(len(x), np.int64))
        alarms += m.stats().alarms
    assert alarms == 0
