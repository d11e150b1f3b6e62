"""Deadline mode: forced answers from the deepest computed exit, stage costs that stop graphs which
cannot finish, bad deadlines; on a scripted fake with controlled stage times and on ONNX Runtime."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from runtimes.thresholds import NEVER
from runtimes.backends.fake import FakeBackend, fake_bundle
from runtimes.chain import run_chain, run_guarded
from runtimes.deadline import Deadline, StageClock
from runtimes.errors import ConfigError
from runtimes.runtime import Runtime

N, K = 40, 3
SEGMENT, HEAD = 0.004, 0.001  # seconds per call of the fake's graphs
V1_DIGITS = Path(__file__).parent / "v1_digits_bundle"  # a real digits bundle with two exits, calibrated


@pytest.fixture
def script() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((N, K + 1)).astype(np.float32), rng.integers(0, 10, (N, K + 1))


def _inputs(rows) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, dtype=np.float32)
    return {"x": rows.reshape(len(rows), 1, 1, 1)}


def _runtime(script, delays: dict | None = None, **kw) -> Runtime:
    conf, pred = script
    bundle = fake_bundle(K)
    return Runtime(bundle, FakeBackend(bundle, confidences=conf, predictions=pred, delays=delays), **kw)


@pytest.mark.parametrize("thresholds", [[0.5, 0.5, 0.5], [0.9, None, 0.2], [0.0, 0.0, 0.0], [NEVER, NEVER, NEVER]])
@pytest.mark.parametrize("policy", ["per_sample", "batch"])
def test_a_deadline_that_is_not_reached_changes_nothing(script, thresholds: list, policy: str) -> None:
    conf, pred = script
    backend = FakeBackend(fake_bundle(K), confidences=conf, predictions=pred)
    plain = run_chain(backend, backend.bundle, _inputs(range(N)), thresholds, policy)
    far = Deadline(time.perf_counter() + 60.0, StageClock())
    guarded = run_guarded(backend, backend.bundle, _inputs(range(N)), thresholds, policy, far)
    assert np.array_equal(plain.classes, guarded.classes) and np.array_equal(plain.exits, guarded.exits)
    assert np.array_equal(plain.confidences, guarded.confidences) and not guarded.forced.any()


def test_time_up_gives_each_open_row_its_deepest_computed_exit(script) -> None:
    conf, pred = script
    rt = _runtime(script, {"segment": SEGMENT, "exit": HEAD})
    ms = 1000 * (1.5 * SEGMENT + HEAD)  # between one and two segments: time for exit 0 only
    res = rt.infer(_inputs(range(N)), thresholds=[NEVER, NEVER, NEVER], deadline_ms=ms)  # no exit ever fires
    assert res.forced.all() and (res.exits == 0).all()
    assert np.array_equal(res.classes, pred[:, 0]) and np.allclose(res.confidences, conf[:, 0])
    assert res[0].forced and res[0].block == rt.bundle.exits[0].block
    # segment_1's cost was unknown: started while there was time, its head never (it could not end in time)
    assert "exit_1" not in dict(rt.backend.calls)


def test_rows_that_exit_in_time_keep_their_certified_answer(script) -> None:
    conf, pred = script
    rt = _runtime(script, {"segment": SEGMENT, "exit": HEAD})
    th = [0.5, 0.5, 0.5]
    plain = rt.infer(_inputs(range(N)), thresholds=th)
    for policy in ("per_sample", "batch"):
        res = rt.infer(_inputs(range(N)), thresholds=th, policy=policy, deadline_ms=1000 * (1.5 * SEGMENT + HEAD))
        fired = conf[:, 0] >= 0.5
        assert not res.forced[fired].any() and res.forced[~fired].all()
        assert np.array_equal(res.classes[fired], plain.classes[fired])
        assert np.array_equal(res.classes[~fired], pred[~fired, 0])


def test_every_call_returns_within_the_deadline_plus_one_graph_call(script) -> None:
    """Stage costs learnt from the calls themselves (no certificate): once segment_1's cost is known it
    is not started, since it cannot end in time; and no call overruns by more than the graph that was
    running (its own duration, which a loaded machine may stretch, plus the call's Python)."""
    rt = _runtime(script, {"segment": SEGMENT, "exit": HEAD})
    ms = 1000 * (1.6 * SEGMENT + HEAD)
    late = started = 0
    for i in range(60):
        rt.backend.calls.clear()
        t0 = time.perf_counter()
        res = rt.infer(_inputs([i % N]), thresholds=[NEVER, NEVER, NEVER], deadline_ms=ms)
        over = 1000 * (time.perf_counter() - t0) - ms
        assert res.forced.all() and (res.exits == 0).all()
        assert over < 1000 * max(res.timings.values()) + 1.0
        started += "segment_1" in dict(rt.backend.calls)
        late += over > 0
    assert started <= 1  # the first call that had time left for it; then its cost was known
    stats = rt.stats().deadline
    assert stats.calls == 60 and stats.forced == 60 and stats.forced_by_block == {rt.bundle.exits[0].block: 60}
    assert stats.late <= late and stats.worst_overrun_ms < stats.longest_graph_ms + 1.0


def test_certificate_costs_stop_the_first_call_too(script) -> None:
    rt = _runtime(script, {"segment": SEGMENT, "exit": HEAD})
    rt._clock = StageClock({g.key: (SEGMENT if g.key.startswith("segment") else HEAD) for g in rt.bundle.graphs})
    rt.infer(_inputs([3]), thresholds=[NEVER, NEVER, NEVER], deadline_ms=1000 * (1.5 * SEGMENT + HEAD))
    assert [k for k, _ in rt.backend.calls] == ["segment_0", "exit_0"]
    # with exit 1 off, segment 1 alone answers nothing: it starts only if segment 2 and exit 2 fit after it
    rt.backend.calls.clear()
    res = rt.infer(_inputs([3]), thresholds=[NEVER, None, NEVER], deadline_ms=1000 * (2.5 * SEGMENT + HEAD))
    assert [k for k, _ in rt.backend.calls] == ["segment_0", "exit_0"] and res.forced[0] and res.exits[0] == 0


def test_the_first_exit_that_is_on_always_answers(script) -> None:
    conf, pred = script
    rt = _runtime(script, {"segment": SEGMENT})
    res = rt.infer(_inputs(range(N)), thresholds=[None, NEVER, NEVER], deadline_ms=1e-3)
    assert res.forced.all() and (res.exits == 1).all() and np.array_equal(res.classes, pred[:, 1])


def test_monitored_rows_never_push_a_call_past_its_deadline(script) -> None:
    from runtimes.monitor import Monitor

    rt = _runtime(script, {"segment": SEGMENT, "exit": HEAD}, monitor=Monitor(1.0, tolerance=0.05))
    for i in range(5):
        rt.infer(_inputs([i]), thresholds=[0.0, 0.0, 0.0], deadline_ms=1000 * (1.5 * SEGMENT + HEAD))
    m = rt.stats().monitor
    assert m.drawn == 5 and m.checked == 0  # every check was cut short by the deadline, none counted


@pytest.mark.parametrize("bad", [-1.0, 0, float("nan"), float("inf"), True, "5", None])
def test_bad_deadlines_are_one_line_config_errors(script, bad) -> None:
    rt = _runtime(script)
    if bad is None:  # every exit off: nothing could answer before the final head
        with pytest.raises(ConfigError, match="needs an exit that is on"):
            rt.infer(_inputs([0]), thresholds=[None, None, None], deadline_ms=5.0)
        return
    with pytest.raises(ConfigError, match="deadline_ms must be") as info:
        rt.infer(_inputs([0]), deadline_ms=bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        rt.infer(_inputs([0]), deadline_ms=bad, errors="keep")


def test_errors_keep_reports_forced_rows(script) -> None:
    conf, pred = script
    rt = _runtime(script)
    res = rt.infer(_inputs(range(8)), thresholds=[None, NEVER, NEVER], deadline_ms=1e-3, errors="keep")
    assert res.forced.all() and np.array_equal(res.classes, pred[:8, 1])
    assert rt.infer(_inputs(range(8))).forced is None  # no deadline, no forced mask


def test_onnx_runtime_deadlines_force_the_first_exit_or_change_nothing() -> None:
    """On a real bundle: a deadline too short for anything answers every row with exit 0's recorded
    prediction, one batch-1 call at a time (the bound fast path) and batched; a far one changes nothing."""
    from analysis.evaluation import bundle_split

    with Runtime.load(V1_DIGITS, backend="onnxruntime") as rt:
        data, idx = bundle_split(rt.bundle, None, "test")
        arrays = rt.encode([data.items[i] for i in idx[:32]])
        record = rt.record(arrays)
        plain = rt.infer(arrays)
        far = rt.infer(arrays, deadline_ms=60_000)
        assert not far.forced.any() and np.array_equal(far.classes, plain.classes)
        assert np.array_equal(far.exits, plain.exits)
        short = rt.infer(arrays, deadline_ms=1e-3)
        opened = plain.exits > 0  # rows that exit 0 did not answer in time
        assert np.array_equal(short.forced, opened) and (short.exits == 0).all()
        assert np.array_equal(short.classes, record.predictions[:, 0])
        one = [rt.infer({k: v[i:i + 1] for k, v in arrays.items()}, deadline_ms=1e-3) for i in range(8)]
        assert np.array_equal(np.concatenate([r.classes for r in one]), record.predictions[:8, 0])
        assert rt.stats().deadline.forced == int(opened.sum()) + int(opened[:8].sum())


def test_run_command_takes_a_deadline_and_a_monitor(tmp_path: Path) -> None:
    """``freedeploy run --deadline-ms --monitor`` on real images: forced rows marked, a summary on stderr,
    bad values one line with the ConfigError exit code."""
    from click.testing import CliRunner
    from PIL import Image

    from analysis.evaluation import bundle_split
    from freedeploy.cli import cli
    from runtimes.bundle import load_bundle

    data, idx = bundle_split(load_bundle(V1_DIGITS), None, "test")
    for i in idx[:4]:
        Image.fromarray(data.items[i]).save(tmp_path / f"{i}.png")
    res = CliRunner().invoke(cli, ["run", str(V1_DIGITS), str(tmp_path), "--thresholds", "never,never", "--json",
                                   "--deadline-ms", "0.001", "--monitor", "1"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 4 and all(r["forced"] and r["block"] == 1 for r in rows)
    assert "4 of 4 answers forced" in res.stderr and "monitor: 0 of 4 inputs checked" in res.stderr
    for flag, value, words in (("--deadline-ms", "-5", "deadline_ms must be"), ("--monitor", "1.5", "monitor rate"),
                               ("--monitor", "nan", "monitor rate")):
        bad = CliRunner().invoke(cli, ["run", str(V1_DIGITS), str(tmp_path), flag, value])
        assert bad.exit_code == ConfigError.exit_code and words in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["run", str(V1_DIGITS), str(tmp_path), "--monitor", "1", "--monitor-fallback",
                                   "--json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)) == 4, res.output
    bad = CliRunner().invoke(cli, ["run", str(V1_DIGITS), str(tmp_path), "--monitor-fallback"])
    assert bad.exit_code == 2 and "--monitor RATE" in bad.stderr
