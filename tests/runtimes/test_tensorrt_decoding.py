"""The decoding loop on TensorRT (fakes, CPU only): the generative fixture bundle's engines, built by
``exporters.tensorrt`` against the TensorRT 10.3 and 11.0 API fakes, compute for real (the fake engine
runs its ONNX graph with ONNX Runtime on the bytes in fake device memory), so every mode can be held
to the ONNX Runtime backend's tokens, exits and confidences.

The fake GPU is strict here: operations run only when something waits for them (``deferred``), and
fresh allocations hold NaN bytes (``malloc_fill``), so a staged value changed too early, a result
read before a wait, or a cache row left uninitialised would show. From its call record: nothing is
allocated after the first sequence, and per token only decisions come back to the host, never the
KV cache."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from runtimes.backends.onnxruntime import OrtBackend
from runtimes.bundle import load_bundle
from runtimes.decoding import DecodePlan, full_decode, greedy_decode, open_session, prefill, speculative_decode
from runtimes.errors import ConfigError, InputError
from tests.fakes.fake_tensorrt import FakeGpu, installed_fakes

FLAVOURS = {"10.3.0": dict(cuda="12.6.2.post1", driver_version=12060),
            "11.0.0": dict(cuda="13.0.3", driver_version=13000)}
MAX_NEW = 9  # enough for the past to cross the first bucket (16 rows) and be bound again
KINDS = {"cudaMemcpyHostToDevice": "h2d", "cudaMemcpyDeviceToHost": "d2h", "cudaMemcpyDeviceToDevice": "d2d"}


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def engines(request: pytest.FixtureRequest, decoder_bundle, tmp_path_factory: pytest.TempPathFactory):
    """The fixture bundle (a copy) with an fp32 engine set built under the fakes, which stay installed."""
    from exporters.tensorrt import build_engines

    root = Path(shutil.copytree(decoder_bundle.out, tmp_path_factory.mktemp("trt") / "b"))
    with installed_fakes(request.param, deferred=True, malloc_fill=0xFF, **FLAVOURS[request.param]) as gpu:
        build_engines(root, "fp32")
        yield gpu, load_bundle(root)


@pytest.fixture(scope="module")
def ort(engines):
    _, b = engines
    return OrtBackend(b, "fp32", threads=1), DecodePlan(b)


@pytest.fixture
def trt(engines):
    from runtimes.backends.tensorrt import TensorRTBackend

    gpu, b = engines
    be = TensorRTBackend(b, "fp32", "cuda")
    yield gpu, b, be, DecodePlan(b)
    be.close()


def _modes(b):
    """Every decoding mode the loop has, at thresholds under, among and over the fixture's confidences."""
    out = {"full": lambda be, plan, x, p: full_decode(be, b, x, p, MAX_NEW, plan)}
    for kv in ("recompute", "propagate"):
        for th in ([None, None], [0.0, None], [None, 0.0], [0.04, 0.04], [0.045, 0.0], [2.0, 2.0]):
            out[f"{kv} {th}"] = lambda be, plan, x, p, th=th, kv=kv: greedy_decode(be, b, x, p, MAX_NEW, th, plan, kv=kv)
    for block, n in ((1, 3), (2, 2), (2, 4)):
        out[f"speculative {block}/{n}"] = lambda be, plan, x, p, block=block, n=n: speculative_decode(
            be, b, x, p, MAX_NEW, draft_block=block, draft_len=n, plan=plan)
    return out


def _copies(gpu: FakeGpu) -> list[tuple[str, int, int, int]]:
    """(kind, destination, source, bytes) of every copy in the record, 2-D copies as their bytes in all."""
    out = []
    for name, a in gpu.calls:
        if name == "cudaMemcpyAsync":
            dst, src, size, kind, _ = a["args"]
            out.append((KINDS[kind.name], int(dst), int(src), int(size)))
        elif name == "cudaMemcpy2DAsync":
            dst, _, src, _, width, height, kind, _ = a["args"]
            out.append((KINDS[kind.name], int(dst), int(src), int(width) * int(height)))
    return out


def test_every_mode_decodes_what_onnx_runtime_decodes(trt, ort, decoder_data) -> None:
    gpu, b, be, plan = trt
    ob, oplan = ort
    exits = Counter()
    for name, fn in _modes(b).items():
        for i, prompt in enumerate(decoder_data.prompts):
            x = decoder_data.images[i:i + 1]
            got, want = fn(be, plan, x, prompt), fn(ob, oplan, x, prompt)
            assert (got.tokens, got.blocks, dict(got.graph_calls)) == (want.tokens, want.blocks, dict(want.graph_calls)), name
            assert got.confidences == pytest.approx(want.confidences, rel=1e-6, abs=1e-7) and got.slack == want.slack
            exits.update(got.blocks[1:])
    assert set(exits) == {1, 2, 4}  # every exit (blocks 1 and 2) and the final head wrote tokens
    assert gpu.named("IExecutionContext.set_input_shape")  # it ran on the engines, not some other path
    # the second bucket (31 rows: a step reads every position but its own) was bound
    assert {a["shape"][1] for a in gpu.named("IExecutionContext.set_input_shape") if a["name"] == "past_mask"} == {16, 31}


def test_prefilled_samples_decode_again_the_same(trt, ort, decoder_data) -> None:
    gpu, b, be, plan = trt
    ob, oplan = ort
    x, prompt = decoder_data.images[2:3], decoder_data.prompts[2]
    done, ref = prefill(be, b, x, prompt, MAX_NEW, plan), prefill(ob, b, x, prompt, MAX_NEW, oplan)
    assert (done.token, done.confidence) == (ref.token, ref.confidence)
    np.testing.assert_allclose(done.keys, ref.keys, rtol=1e-6, atol=1e-6)
    for th in ([0.04, 0.04], [None, None]):
        again = greedy_decode(be, b, x, prompt, MAX_NEW, th, plan, prefilled=done)
        fresh = greedy_decode(be, b, x, prompt, MAX_NEW, th, plan)
        assert (again.tokens, again.blocks) == (fresh.tokens, fresh.blocks)
        assert again.graph_calls["prefill"] == 0 and fresh.graph_calls["prefill"] == 1


def test_nothing_is_allocated_after_the_first_sequence(trt, decoder_data) -> None:
    gpu, b, be, plan = trt
    full_decode(be, b, decoder_data.images[:1], decoder_data.prompts[0], MAX_NEW, plan)
    made = len(gpu.named("cudaMalloc")) + len(gpu.named("cudaMallocHost"))
    gpu.calls.clear()
    for fn in _modes(b).values():
        for i, prompt in enumerate(decoder_data.prompts):
            fn(be, plan, decoder_data.images[i:i + 1], prompt)
    assert made and not gpu.named("cudaMalloc") and not gpu.named("cudaMallocHost") and not gpu.named("cudaHostAlloc")
    assert not gpu.named("cudaFree") and not gpu.named("cudaFreeHost")


def test_per_token_only_decisions_come_back_and_the_cache_stays_on_the_device(trt, decoder_data) -> None:
    gpu, b, be, plan = trt
    deciding = {e.graph.key for e in b.exits} | {b.stages[-1].segment.key, b.full.key}
    for name, fn in _modes(b).items():
        full_decode(be, b, decoder_data.images[:1], decoder_data.prompts[0], MAX_NEW, plan)  # allocations done
        with open_session(plan, be) as session:
            store = session.store
            cache = [(r.address, r.address + r.strides[0] * r.shape[0]) for r in (store.keys, store.values)]
        for i, prompt in enumerate(decoder_data.prompts):
            gpu.calls.clear()
            out = fn(be, plan, decoder_data.images[i:i + 1], prompt)
            copies = _copies(gpu)
            d2h = [c for c in copies if c[0] == "d2h"]
            in_cache = lambda a: any(lo <= a < hi for lo, hi in cache)  # noqa: E731
            assert not any(in_cache(src) for _, _, src, _ in d2h), name  # the cache never crosses to the host
            assert not any(in_cache(dst) for kind, dst, _, _ in copies if kind == "h2d"), name
            assert any(in_cache(dst) for kind, dst, _, _ in copies if kind == "d2d"), name  # commits stay on the device
            # one read per decision: prefill's, then every call of a graph that decides (an exit head, the
            # last stage, the monolithic step), whether it fired or not
            reads = len(gpu.named("cudaEventSynchronize"))
            assert reads == 1 + sum(n for key, n in out.graph_calls.items() if key.split("@")[0] in deciding), name
            if name.startswith("speculative"):  # a verification reads the tokens and confidences of all its rows
                assert all(size % 4 == 0 and size <= 8 * (int(name.split("/")[1]) + 1) for *_, size in d2h), name
            else:  # the decision of the last row: its token (8 bytes) and its confidence (4)
                assert sorted(size for *_, size in d2h) == sorted([4, 8] * reads), name


def test_full_decode_traffic_per_token(trt, decoder_data) -> None:
    """The monolithic step: per token one graph call and, besides it, two writes (token and position in
    one, the mask entry of every stage in one), two device-to-device commits (keys, values: a row of
    every layer each) and two reads of 12 bytes in all (token, confidence), behind one synchronisation."""
    gpu, b, be, plan = trt
    x, prompt = decoder_data.images[:1], decoder_data.prompts[0]
    full_decode(be, b, x, prompt, MAX_NEW, plan)
    gpu.calls.clear()
    out = full_decode(be, b, x, prompt, MAX_NEW, plan)
    steps = len(out.tokens) - 1
    kinds = Counter(kind for kind, *_ in _copies(gpu))
    sizes = Counter()
    for kind, _, _, size in _copies(gpu):
        sizes[kind] += size
    width, layers = plan.width, plan.num_layers
    # prefill: the image, the prompt, the masks (2 writes: cleared, then the prefix's rows set); its decision
    assert kinds == {"h2d": 4 + 2 * steps, "d2d": 2 * steps, "d2h": 2 + 2 * steps}
    assert sizes["d2h"] == 12 * (steps + 1) and sizes["d2d"] == steps * 2 * layers * width * 4
    assert len(gpu.named("IExecutionContext.execute_async_v3")) == 2 + steps
    assert len(gpu.named("cudaEventSynchronize")) == 1 + steps


def test_bindings_are_set_once_and_cuda_graphs_replay_them(engines, ort, decoder_data) -> None:
    from runtimes.backends.tensorrt import TensorRTBackend

    gpu, b = engines
    ob, oplan = ort
    x, prompt = decoder_data.images[3:4], decoder_data.prompts[3]
    be = TensorRTBackend(b, "fp32", "cuda", cuda_graphs=True)
    try:
        plan = DecodePlan(b)
        want = greedy_decode(ob, b, x, prompt, MAX_NEW, [0.04, 0.04], oplan)
        first = greedy_decode(be, b, x, prompt, MAX_NEW, [0.04, 0.04], plan)
        gpu.calls.clear()
        again = greedy_decode(be, b, x, prompt, MAX_NEW, [0.04, 0.04], plan)
        assert (first.tokens, first.blocks) == (again.tokens, again.blocks) == (want.tokens, want.blocks)
        # every binding was captured on its first call: the second sample replays graphs, sets nothing
        assert not gpu.named("IExecutionContext.set_tensor_address") and not gpu.named("IExecutionContext.set_input_shape")
        assert not gpu.named("IExecutionContext.execute_async_v3")
        assert len(gpu.named("cudaGraphLaunch")) == sum(again.graph_calls.values())
    finally:
        be.close()
    assert not gpu.capturing and not gpu.last_error


def test_close_frees_the_decoding_memory(engines, decoder_data) -> None:
    from runtimes.backends.tensorrt import TensorRTBackend

    gpu, b = engines
    before_device, before_pinned = set(gpu.device), set(gpu.pinned)
    be = TensorRTBackend(b, "fp32", "cuda")
    plan = DecodePlan(b)
    full_decode(be, b, decoder_data.images[:1], decoder_data.prompts[0], 4, plan)
    assert set(gpu.device) - before_device and set(gpu.pinned) - before_pinned
    be.close()
    assert set(gpu.device) == before_device and set(gpu.pinned) == before_pinned
    with pytest.raises(ConfigError, match="closed"):
        full_decode(be, b, decoder_data.images[:1], decoder_data.prompts[0], 4, plan)
    with pytest.raises(ConfigError, match="closed"):
        full_decode(be, b, decoder_data.images[:1], decoder_data.prompts[0], 4)


def test_bad_input_gives_the_same_one_line_errors(trt, ort, decoder_data) -> None:
    gpu, b, be, plan = trt
    ob, oplan = ort
    x, prompt = decoder_data.images[:1], decoder_data.prompts[0]
    bad = [lambda be_, pl: full_decode(be_, b, x, prompt, 64, pl),  # past the model's positions
           lambda be_, pl: full_decode(be_, b, x, [1] * 30, 2, pl),
           lambda be_, pl: full_decode(be_, b, x, [], 2, pl),
           lambda be_, pl: full_decode(be_, b, x, [1, 1000], 2, pl),  # not a token id
           lambda be_, pl: full_decode(be_, b, x, [1, -1], 2, pl),
           lambda be_, pl: full_decode(be_, b, x, ["a"], 2, pl),
           lambda be_, pl: full_decode(be_, b, x[:, :, :16], prompt, 2, pl),  # not the image size
           lambda be_, pl: full_decode(be_, b, np.concatenate([x, x]), prompt, 2, pl),
           lambda be_, pl: greedy_decode(be_, b, x, prompt, 4, [0.5], pl),
           lambda be_, pl: greedy_decode(be_, b, x, prompt, 4, [0.5, 0.5], pl, kv="both"),
           lambda be_, pl: speculative_decode(be_, b, x, prompt, 4, draft_block=3, draft_len=3, plan=pl),
           lambda be_, pl: speculative_decode(be_, b, x, prompt, 4, draft_block=1, draft_len=0, plan=pl)]
    for fn in bad:
        with pytest.raises((InputError, ConfigError)) as on_trt:
            fn(be, plan)
        with pytest.raises((InputError, ConfigError)) as on_ort:
            fn(ob, oplan)
        assert type(on_trt.value) is type(on_ort.value) and str(on_trt.value) == str(on_ort.value)
        assert "\n" not in str(on_trt.value)
    # nothing of it stuck: the sessions decode as before
    good = lambda be_, pl: greedy_decode(be_, b, x, prompt, MAX_NEW, [0.04, 0.04], pl)  # noqa: E731
    assert good(be, plan).tokens == good(ob, oplan).tokens
    with pytest.raises(ConfigError, match="generates text"):
        be.start({"pixel_values": x})


def test_runtime_generates_on_tensorrt_what_it_generates_on_onnx_runtime(engines) -> None:
    from runtimes import Runtime

    _, b = engines
    on_trt = Runtime.load(b.root, backend="tensorrt", precision="fp32")
    on_ort = Runtime.load(b.root, backend="onnxruntime", threads=1)
    try:
        assert on_trt.backend.name == "tensorrt"
        image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        for kw in (dict(mode="full"), dict(mode="speculative", draft_block=2, draft_len=3),
                   dict(thresholds=[0.0, None]), dict(thresholds=[0.04, 0.04])):
            got, want = on_trt.generate(image, "w5 w6", max_new_tokens=8, **kw), \
                on_ort.generate(image, "w5 w6", max_new_tokens=8, **kw)
            assert (got.tokens, got.blocks, got.text) == (want.tokens, want.blocks, want.text)
    finally:
        on_trt.close()
        on_ort.close()


def test_callers_on_several_threads_each_get_their_own_session(trt, ort, decoder_data) -> None:
    """Sessions are pooled per caller, each with its own device memory; engines' contexts are shared, so
    a binding sets its shapes and addresses again whenever another one used the context in between."""
    import threading

    gpu, b, be, plan = trt
    ob, oplan = ort
    fn = lambda be_, pl, i: greedy_decode(be_, b, decoder_data.images[i:i + 1], decoder_data.prompts[i],  # noqa: E731
                                          MAX_NEW, [0.04, 0.04], pl)
    want = [fn(ob, oplan, i) for i in range(len(decoder_data.prompts))]
    got: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []

    start = threading.Barrier(3)

    def work(t: int) -> None:
        try:
            start.wait()
            for r in range(2):
                for i in range(len(decoder_data.prompts)):
                    got[(t, r * 10 + i)] = fn(be, plan, i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (t, k), out in got.items():
        assert (out.tokens, out.blocks) == (want[k % 10].tokens, want[k % 10].blocks)
