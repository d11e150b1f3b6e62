"""ONNX Runtime's batch-1 bound path (every graph's inputs and outputs bound once to preallocated
buffers) against the plain path: the same answers on real bundles, no aliasing between calls,
concurrent callers, the switch, and the cases that must stay plain (batch > 1, decoders, odd inputs)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtimes.thresholds import NEVER
from runtimes import Runtime
from runtimes.backends.onnxruntime import OrtBackend, _BoundChain
from runtimes.chain import run_chain
from runtimes.errors import InputError
from tests.conftest import split_arrays

BUNDLES = {"vision": ("micro_bundle", "micro_run"), "text": ("micro_text_bundle", "micro_text_run"),
           "vqa": ("micro_vqa_bundle", "micro_vqa_run")}


class Calls:
    """Counts each session's ``run`` and ``run_with_iobinding`` calls (wrapped on the instances)."""

    def __init__(self, backend: OrtBackend) -> None:
        self.run = self.bound = 0
        for sess in backend.sessions.values():
            self._wrap(sess, "run", "run")
            self._wrap(sess, "run_with_iobinding", "bound")

    def _wrap(self, sess: object, method: str, counter: str) -> None:
        inner = getattr(sess, method)

        def counted(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return inner(*args, **kwargs)

        setattr(sess, method, counted)


def _rows(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(inputs.values())))
    return [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(n)]


def _settings(rt: Runtime, inputs: dict[str, np.ndarray]) -> dict[str, list]:
    k = len(rt.bundle.exits)
    conf = rt.record(inputs).confidences
    return {"off": [None] * k, "first": [0.0] * k, "none fires": [NEVER] * k,
            "mixed": [float(np.median(conf[:, i])) for i in range(k)], "some off": [None] * (k - 1) + [0.0]}


@pytest.fixture(scope="module", params=list(BUNDLES))
def pair(request):
    """(bound runtime, plain runtime, test inputs) of one real bundle."""
    bundle_fixture, run_fixture = BUNDLES[request.param]
    bundle = request.getfixturevalue(bundle_fixture)
    inputs = split_arrays(request.getfixturevalue(run_fixture))
    bound = Runtime.load(bundle.out, backend="onnxruntime")
    plain = Runtime.load(bundle.out, backend="onnxruntime", io_binding=False)
    yield bound, plain, inputs
    bound.close()
    plain.close()


@pytest.fixture(scope="module")
def vision(micro_bundle, micro_run):
    inputs = split_arrays(micro_run)
    with Runtime.load(micro_bundle.out, backend="onnxruntime") as rt:
        rt.thresholds = [0.6] * len(rt.bundle.exits)
        yield rt, inputs


def test_bound_and_plain_paths_give_the_same_answers_on_every_sample(pair) -> None:
    bound, plain, inputs = pair
    assert bound.backend.describe()["io_binding"] and not plain.backend.describe()["io_binding"]
    calls = Calls(bound.backend)
    for name, th in _settings(plain, inputs).items():
        exits = []
        for row in _rows(inputs):
            a, b = bound.infer(row, thresholds=th), plain.infer(row, thresholds=th)
            assert np.array_equal(a.classes, b.classes), name
            assert np.array_equal(a.exits, b.exits), name
            assert np.array_equal(a.confidences, b.confidences), name  # the same kernels: bit for bit
            assert a.classes.dtype == b.classes.dtype and a.confidences.dtype == b.confidences.dtype
            exits.append(int(a.exits[0]))
        if name == "first":
            assert set(exits) == {0}
        if name in ("off", "none fires"):
            assert set(exits) == {len(th)}
        if name == "mixed":
            assert len(set(exits)) > 1, "the median thresholds should mix exits"
    assert calls.bound > 0 and calls.run == 0  # every batch-1 call above went through the bindings


def test_a_result_is_not_changed_by_the_next_call(vision) -> None:
    rt, inputs = vision
    rows = _rows(inputs)
    first = rt.infer(rows[0], thresholds=[None, None])  # the final head
    kept = (first.classes.copy(), first.confidences.copy(), first.exits.copy())
    other = next(r for r in rows[1:] if rt.infer(r, thresholds=[None, None]).confidences[0] != kept[1][0])
    for th in ([None, None], [0.0, 0.0], [None, 0.0]):
        rt.infer(other, thresholds=th)
    assert np.array_equal(first.classes, kept[0]) and np.array_equal(first.confidences, kept[1])
    assert np.array_equal(first.exits, kept[2])
    buffers = [b for chain in rt.backend._idle for b in chain.buffers.values()]
    assert buffers and not any(np.shares_memory(x, b) for x in (first.classes, first.confidences) for b in buffers)


def test_concurrent_callers_get_the_answers_of_sequential_calls(vision) -> None:
    rt, inputs = vision
    rows = _rows(inputs)[:40]
    serial = [rt.infer(r) for r in rows]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    orders = [[(t + i) % len(rows) for i in range(len(rows))][::1 - 2 * (t % 2)] for t in range(8)]

    def work(t: int) -> None:
        try:
            for _ in range(3):  # each thread its own order of the rows
                results[t] = [rt.infer(rows[i]) for i in orders[t]]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for t, order in enumerate(orders):
        got = results[t]
        assert [int(g.classes[0]) for g in got] == [int(serial[i].classes[0]) for i in order]
        assert [int(g.exits[0]) for g in got] == [int(serial[i].exits[0]) for i in order]
        assert np.array_equal(np.concatenate([g.confidences for g in got]),
                              np.concatenate([serial[i].confidences for i in order]))
    backend = rt.backend
    assert 1 <= backend._made <= backend.bound_chains and len(backend._idle) == backend._made  # all handed back


def test_callers_beyond_the_pool_take_the_plain_path(micro_bundle, vision) -> None:
    _, inputs = vision
    rows = _rows(inputs)[:24]
    with Runtime.load(micro_bundle.out, backend="onnxruntime", io_binding=False) as plain, \
            Runtime.load(micro_bundle.out, backend="onnxruntime") as rt:
        rt.backend.bound_chains = 1  # one bound chain: concurrent callers mostly run plain
        calls = Calls(rt.backend)
        th = [0.6, 0.6]
        serial = [plain.infer(r, thresholds=th) for r in rows]
        results: dict[int, list] = {}

        def work(t: int) -> None:
            results[t] = [rt.infer(r, thresholds=th) for _ in range(3) for r in rows]

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for got in results.values():
            assert [(int(g.classes[0]), int(g.exits[0]), float(g.confidences[0])) for g in got] == \
                [(int(s.classes[0]), int(s.exits[0]), float(s.confidences[0])) for s in serial] * 3
        assert rt.backend._made == 1 and calls.bound > 0
        assert calls.run > 0  # some callers found the chain busy (6 threads, one chain)


def test_the_switch_off_uses_the_plain_path(micro_bundle, vision) -> None:
    _, inputs = vision
    with Runtime.load(micro_bundle.out, backend="onnxruntime", io_binding=False) as rt:
        calls = Calls(rt.backend)
        assert rt.backend._one is None and not rt.backend.describe()["io_binding"]
        rt.thresholds = [0.0, 0.0]
        rt.infer(_rows(inputs)[0])
        rt.thresholds = [None, None]
        rt.infer(_rows(inputs)[0])
        assert calls.bound == 0 and calls.run == 2 + 3 and rt.backend._made == 0


def test_batches_above_one_stay_on_the_plain_path(micro_bundle, vision) -> None:
    _, inputs = vision
    with Runtime.load(micro_bundle.out, backend="onnxruntime") as rt:
        calls = Calls(rt.backend)
        rt.thresholds = [None, None]
        rt.infer({k: v[:8] for k, v in inputs.items()})
        assert calls.run == 3 and calls.bound == 0 and rt.backend._made == 0
        rt.record({k: v[:1] for k, v in inputs.items()})  # record_chain: plain, whatever the batch
        rt.infer_full({k: v[:1] for k, v in inputs.items()})  # the monolithic graph: plain
        assert calls.bound == 0 and rt.backend._made == 0
        rt.infer({k: v[:1] for k, v in inputs.items()})
        assert calls.bound == 3 and rt.backend._made == 1


def test_unusual_inputs_take_the_plain_path_with_its_errors(micro_bundle, vision) -> None:
    rt, inputs = vision
    backend, bundle = rt.backend, rt.bundle
    row = _rows(inputs)[0]
    th = [None, None]
    want = run_chain(backend, bundle, row, th)
    (name, x), = row.items()
    strided = np.ascontiguousarray(np.repeat(x, 2, axis=-1))[..., ::2]  # the same values, not contiguous
    assert not strided.flags.c_contiguous
    odd = run_chain(backend, bundle, {name: strided}, th)
    assert np.array_equal(odd.classes, want.classes) and np.array_equal(odd.confidences, want.confidences)
    with Runtime.load(micro_bundle.out, backend="onnxruntime", io_binding=False) as plain:
        for bad in ({name: x.astype(np.float64)}, {"other": x}):  # past the runtime's own input checks
            with pytest.raises(Exception) as bound_err:
                run_chain(backend, bundle, bad, th)
            with pytest.raises(Exception) as plain_err:
                run_chain(plain.backend, plain.bundle, bad, th)
            assert type(bound_err.value) is type(plain_err.value)
            assert str(bound_err.value) == str(plain_err.value)
    assert len(backend._idle) == backend._made  # chains handed back after the failures too


def test_run_failures_are_the_same_input_errors(micro_text_bundle, micro_text_run) -> None:
    inputs = split_arrays(micro_text_run)
    row = {k: np.ascontiguousarray(v[:1]) for k, v in inputs.items()}
    ids = next(k for k, v in row.items() if v.dtype == np.int64 and "mask" not in k)
    row[ids] = np.full_like(row[ids], 10 ** 9)  # far outside the vocabulary: the embedding lookup fails
    messages = []
    for io_binding in (True, False):
        with Runtime.load(micro_text_bundle.out, backend="onnxruntime", io_binding=io_binding) as rt:
            with pytest.raises(InputError, match="ONNX Runtime rejected the input in segment_0") as err:
                rt.infer(row)
            messages.append(str(err.value))
            assert len(rt.backend._idle) == rt.backend._made == int(io_binding)  # handed back after the failure
    assert messages[0] == messages[1]


def test_non_finite_inputs_are_treated_alike(micro_bundle, vision) -> None:
    _, inputs = vision
    (name, x), = _rows(inputs)[0].items()
    bad = {name: x.copy()}
    bad[name].flat[0] = np.nan
    out = {}
    for io_binding in (True, False):
        with Runtime.load(micro_bundle.out, backend="onnxruntime", io_binding=io_binding) as rt:
            with pytest.raises(InputError, match="NaN or Inf"):
                rt.infer(bad)
        with Runtime.load(micro_bundle.out, backend="onnxruntime", io_binding=io_binding, nonfinite="flag") as rt:
            res = rt.infer(bad, thresholds=[0.5, 0.5])
            assert res.flagged is not None and res.flagged.all()
            out[io_binding] = (res.classes, res.exits, res.confidences)
    assert all(np.array_equal(a, b, equal_nan=a.dtype.kind == "f") for a, b in zip(out[True], out[False]))


def test_a_closed_backend_binds_nothing_more(micro_bundle, vision) -> None:
    _, inputs = vision
    rt = Runtime.load(micro_bundle.out, backend="onnxruntime")
    backend = rt.backend
    state = backend.start_one(_rows(inputs)[0])
    assert isinstance(state, _BoundChain)
    backend.close()
    backend.release(state)
    assert backend._idle == [] and backend._one is None
    assert not isinstance(backend.start_one(_rows(inputs)[0]), _BoundChain)


def test_decoders_keep_the_plain_path(decoder_bundle, decoder_data) -> None:
    from runtimes.decoding import greedy_decode

    exported, data = decoder_bundle, decoder_data
    tokens = []
    for io_binding in (True, False):
        backend = OrtBackend(exported.bundle, "fp32", io_binding=io_binding)
        assert backend._one is None and not backend.describe()["io_binding"]
        out = greedy_decode(backend, exported.bundle, data.images[:1], data.prompts[0], 4, thresholds=[0.0, None])
        assert backend._made == 0
        tokens.append(out.tokens)
    assert tokens[0] == tokens[1]
