"""The one stage walk (``runtimes.chain``): every policy against a straightforward reference, on the
scripted fake and on a real exported ONNX bundle, with thresholds forced to 0 (every row leaves at
the first exit), None (every exit off) and NEVER (every head runs, none fires).

The reference runs every graph on every row through the backend's own calls, with no walk and no
policy, and applies the exit rule row by row. Forced thresholds keep every graph call the walk makes
at the reference's batch, so the answers must be equal bit for bit, ONNX Runtime's included."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pytest

from runtimes.backends.base import Backend
from runtimes.backends.fake import FakeBackend, fake_bundle
from runtimes.bundle import Bundle
from runtimes.chain import ChainOutput, record_chain, run_chain, run_guarded
from runtimes.deadline import Deadline, StageClock
from runtimes.thresholds import NEVER

ROWS = 12  # within the micro bundle's max batch: the chain functions do not split


def _reference(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(B, K + 1) confidences and predictions of every exit head, then the final head's."""
    state = backend.start(inputs)
    names = []
    for stage in bundle.stages:
        backend.run(stage.segment.key, state)
        if stage.exit is not None:
            backend.run(stage.exit.graph.key, state)
            names.append(stage.exit.decision)
    names.append(bundle.final_decision)
    out = backend.fetch(state, [n for pair in names for n in pair])
    return (np.stack([out[c] for c, _ in names], axis=1).astype(np.float32),
            np.stack([out[p] for _, p in names], axis=1).astype(np.int64))


def _first_exit(conf: np.ndarray, thresholds: list) -> np.ndarray:
    """Per row, the first exit whose threshold its confidence reaches, else K (the final head)."""
    k = len(thresholds)
    exits = np.full(len(conf), k)
    for i in range(len(conf)):
        exits[i] = next((j for j, t in enumerate(thresholds) if t is not None and conf[i, j] >= t), k)
    return exits


@pytest.fixture(scope="module", params=["fake", "onnx"])
def chain(request: pytest.FixtureRequest) -> tuple[Backend, Bundle, dict[str, np.ndarray]]:
    """(backend, bundle, ROWS rows of model inputs): the scripted fake, or the micro bundle on ONNX Runtime."""
    if request.param == "fake":
        rng = np.random.default_rng(3)
        bundle = fake_bundle(3)
        script = rng.random((ROWS, 4)), rng.integers(0, 10, (ROWS, 4))  # every exit's and the final head's
        script[0][0] = 0.0  # a confidence of 0 still reaches a threshold of 0
        backend = FakeBackend(bundle, confidences=script[0], predictions=script[1])
        return backend, bundle, {"x": np.arange(ROWS, dtype=np.float32).reshape(ROWS, 1, 1, 1)}
    from runtimes import Runtime
    from tests.conftest import split_arrays

    bundle_dir = request.getfixturevalue("micro_bundle").out
    inputs = {k: np.ascontiguousarray(v[:ROWS]) for k, v in split_arrays(request.getfixturevalue("micro_run")).items()}
    rt = Runtime.load(bundle_dir, backend="onnxruntime")
    request.addfinalizer(rt.close)
    return rt.backend, rt.bundle, inputs


def _rows(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{k: np.ascontiguousarray(v[i:i + 1]) for k, v in inputs.items()} for i in range(ROWS)]


def _one_by_one(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray], th: list) -> ChainOutput:
    """Batch 1, the camera case, row after row, stacked."""
    outs = [run_chain(backend, bundle, row, th) for row in _rows(inputs)]
    stacked = (np.concatenate([getattr(o, f) for o in outs]) for f in ("classes", "confidences", "exits"))
    return ChainOutput(*stacked, {})


def _past() -> Deadline:
    """A deadline already over: no graph fits, not even one of unknown cost."""
    return Deadline(time.perf_counter() - 1.0, StageClock())


def _far() -> Deadline:
    return Deadline(time.perf_counter() + 600.0, StageClock())


# every policy of the walk, by the public call that uses it: (backend, bundle, inputs, thresholds) -> ChainOutput
WALKS: dict[str, Callable[..., ChainOutput]] = {
    "per_sample": lambda b, bu, x, th: run_chain(b, bu, x, th, "per_sample"),
    "batch": lambda b, bu, x, th: run_chain(b, bu, x, th, "batch"),
    "one_row": _one_by_one,
    "deadline_far": lambda b, bu, x, th: run_guarded(b, bu, x, th, "per_sample", _far()),
    "deadline_past": lambda b, bu, x, th: run_guarded(b, bu, x, th, "per_sample", _past()),
    "deadline_past_batch": lambda b, bu, x, th: run_guarded(b, bu, x, th, "batch", _past()),
    "watch_all": lambda b, bu, x, th: run_guarded(b, bu, x, th, "per_sample", None, np.ones(ROWS, bool)),
    "watch_all_batch": lambda b, bu, x, th: run_guarded(b, bu, x, th, "batch", None, np.ones(ROWS, bool)),
    "fallback": lambda b, bu, x, th: run_guarded(b, bu, x, th, "per_sample", None, np.ones(ROWS, bool), False),
}
FORCED = {"first": 0.0, "off": None, "never": NEVER}


@pytest.mark.parametrize("forced", FORCED)
@pytest.mark.parametrize("policy", WALKS)
def test_every_policy_gives_the_reference_answers(chain: tuple, policy: str, forced: str) -> None:
    backend, bundle, inputs = chain
    th = [FORCED[forced]] * len(bundle.exits)
    k = len(th)
    if policy == "one_row":  # against the reference at batch 1 too
        conf, pred = (np.concatenate(a) for a in zip(*(_reference(backend, bundle, r) for r in _rows(inputs))))
    else:
        conf, pred = _reference(backend, bundle, inputs)
    out = WALKS[policy](backend, bundle, inputs, th)
    taken = _first_exit(conf, th)  # the certified rule: what early exit answers
    rows = np.arange(ROWS)
    if policy == "deadline_past" or policy == "deadline_past_batch":
        # out of time at once: a row answers with the first exit that is on, fired or not (forced)
        on = next((j for j, t in enumerate(th) if t is not None), k)
        assert np.array_equal(out.forced, taken > on)
        taken = np.minimum(taken, on)
    elif policy == "deadline_far":
        assert not out.forced.any()
    served = np.full(ROWS, k) if policy == "fallback" else taken  # the fallback serves the final head
    assert np.array_equal(out.exits, served)
    assert np.array_equal(out.classes, pred[rows, served])
    assert out.confidences.tobytes() == conf[rows, served].tobytes()
    if policy.startswith("watch") or policy == "fallback":
        early, final = out.checks
        assert np.array_equal(early, pred[rows, taken]) and np.array_equal(final, pred[:, k])
        assert out.continued == (0 if policy == "fallback" else int((taken < k).sum()))


def test_record_gives_the_reference(chain: tuple) -> None:
    backend, bundle, inputs = chain
    rec = record_chain(backend, bundle, inputs)
    conf, pred = _reference(backend, bundle, inputs)
    assert rec.confidences.tobytes() == conf.tobytes() and np.array_equal(rec.predictions, pred)


@pytest.mark.parametrize("policy", WALKS)
def test_forced_thresholds_run_only_the_graphs_they_need(policy: str) -> None:
    """On the fake, which logs its calls: exits off run no head; exits at 0 stop after exit 0, except
    for rows that ride on for their check, which need no head any more."""
    bundle = fake_bundle(3)
    backend = FakeBackend(bundle, confidences=np.full((ROWS, 4), 0.5), predictions=np.zeros((ROWS, 4)))
    inputs = {"x": np.arange(ROWS, dtype=np.float32).reshape(ROWS, 1, 1, 1)}
    off = ["segment_0", "segment_1", "segment_2", "segment_3"]
    WALKS[policy](backend, bundle, inputs, [None] * 3)
    assert [key for key, _ in backend.calls] == off * (ROWS if policy == "one_row" else 1)
    backend.calls.clear()
    WALKS[policy](backend, bundle, inputs, [0.0] * 3)
    first = ["segment_0", "exit_0"] + (off[1:] if policy.startswith("watch") or policy == "fallback" else [])
    assert [key for key, _ in backend.calls] == first * (ROWS if policy == "one_row" else 1)
    assert all(n == (1 if policy == "one_row" else ROWS) for _, n in backend.calls)
