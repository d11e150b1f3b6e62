"""The early-exit loop on a scripted fake backend: decisions, compaction, policies, splitting."""

from __future__ import annotations

import numpy as np
import pytest

from runtimes.backends.fake import FakeBackend, fake_bundle
from runtimes.chain import record_chain, run_chain
from runtimes.errors import ConfigError, InputError
from runtimes.runtime import Runtime

N, K = 40, 3


@pytest.fixture
def script() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((N, K + 1)).astype(np.float32), rng.integers(0, 10, (N, K + 1))


def _inputs(n: int = N) -> dict[str, np.ndarray]:
    return {"x": np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)}


def _expected(conf: np.ndarray, pred: np.ndarray, thresholds: list) -> tuple[np.ndarray, np.ndarray]:
    exits = np.full(len(conf), K)
    for i in range(len(conf)):
        for k, t in enumerate(thresholds):
            if t is not None and conf[i, k] >= t:
                exits[i] = k
                break
    return exits, pred[np.arange(len(conf)), exits]


@pytest.mark.parametrize("thresholds", [[0.5, 0.5, 0.5], [0.9, None, 0.2], [None, None, None], [0.0, 0.0, 0.0],
                                        [1.1, 1.1, 1.1]])
@pytest.mark.parametrize("policy", ["per_sample", "batch"])
def test_decisions_match_the_offline_rule(script, thresholds: list, policy: str) -> None:
    conf, pred = script
    backend = FakeBackend(fake_bundle(K), confidences=conf, predictions=pred)
    out = run_chain(backend, backend.bundle, _inputs(), thresholds, policy)
    exits, classes = _expected(conf, pred, thresholds)
    assert np.array_equal(out.exits, exits) and np.array_equal(out.classes, classes)
    assert np.allclose(out.confidences, conf[np.arange(N), exits])


def test_disabled_exits_skip_their_heads(script) -> None:
    backend = FakeBackend(fake_bundle(K), confidences=script[0], predictions=script[1])
    run_chain(backend, backend.bundle, _inputs(), [None, None, None])
    assert [c for c, _ in backend.calls] == ["segment_0", "segment_1", "segment_2", "segment_3"]


def test_zero_thresholds_stop_after_the_first_exit(script) -> None:
    backend = FakeBackend(fake_bundle(K), confidences=script[0], predictions=script[1])
    out = run_chain(backend, backend.bundle, _inputs(), [0.0, 0.0, 0.0])
    assert (out.exits == 0).all() and backend.calls == [("segment_0", N), ("exit_0", N)]


def test_per_sample_compaction_runs_later_segments_on_fewer_rows(script) -> None:
    conf, pred = script
    backend = FakeBackend(fake_bundle(K), confidences=conf, predictions=pred)
    out = run_chain(backend, backend.bundle, _inputs(), [0.5, 0.5, 0.5], "per_sample")
    rows = dict(backend.calls)
    assert rows["segment_1"] == int((out.exits >= 1).sum()) < N
    assert rows["segment_3"] == int((out.exits == K).sum())
    assert set(backend.fetched) <= {f"confidence_{k}" for k in range(K)} | {f"prediction_{k}" for k in range(K)} | {
        "confidence", "prediction"}  # only the numbers the loop decides on cross to the host
    alone = [run_chain(FakeBackend(backend.bundle, confidences=conf, predictions=pred), backend.bundle,
                       {"x": np.full((1, 1, 1, 1), i, np.float32)}, [0.5, 0.5, 0.5]) for i in range(N)]
    assert np.array_equal(out.exits, np.concatenate([a.exits for a in alone]))
    assert np.array_equal(out.classes, np.concatenate([a.classes for a in alone]))


def test_batch_policy_keeps_all_rows_until_every_row_exited(script) -> None:
    conf, pred = script
    backend = FakeBackend(fake_bundle(K), confidences=conf, predictions=pred)
    run_chain(backend, backend.bundle, _inputs(), [0.5, 0.5, 0.5], "batch")
    assert all(n == N for _, n in backend.calls)


def test_record_returns_every_head(script) -> None:
    conf, pred = script
    backend = FakeBackend(fake_bundle(K), confidences=conf, predictions=pred)
    rec = record_chain(backend, backend.bundle, _inputs())
    assert np.allclose(rec.confidences, conf) and np.array_equal(rec.predictions, pred)


def test_runtime_splits_large_inputs_and_validates(script) -> None:
    conf, pred = script
    bundle = fake_bundle(K, max_batch=16, thresholds=[0.5, 0.5, 0.5])
    backend = FakeBackend(bundle, confidences=conf, predictions=pred)
    rt = Runtime(bundle, backend)
    res = rt.infer(_inputs())
    exits, classes = _expected(conf, pred, [0.5, 0.5, 0.5])
    assert len(res) == N and np.array_equal(res.exits, exits) and np.array_equal(res.classes, classes)
    assert max(n for g, n in backend.calls if g == "segment_0") == 16
    p = res[0]
    assert p.label == f"class{classes[0]}" and p.block == (exits[0] + 1 if exits[0] < K else bundle.num_blocks)
    rt.thresholds = [None, None, None]
    assert (rt.infer(_inputs()).exits == K).all()
    with pytest.raises(ConfigError, match="thresholds"):
        rt.thresholds = [0.5]
    with pytest.raises(InputError, match="missing"):
        rt.infer({"y": np.zeros((2, 1, 1, 1), np.float32)})
    with pytest.raises(InputError, match="float32"):
        rt.infer({"x": np.zeros((2, 1, 1, 1), np.float64)})
    with pytest.raises(InputError, match="shape"):
        rt.infer({"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(ConfigError, match="policy"):
        rt.infer(_inputs(), policy="eager")
