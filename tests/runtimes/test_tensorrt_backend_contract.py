"""``runtimes.backends.tensorrt`` against the TensorRT 10.3 and 11.0 API surfaces (fakes, CPU only), each
with the CUDA bindings it is deployed with: cuda-python 12.6.2.post1 beside 10.3 (JetPack 6), cuda-bindings
13 beside 11.0 on a CUDA 13 driver. The stricter behaviours are tested in ``test_tensorrt_strict.py``.

The fake engine writes, into row i of every output, the first value of row i of its first input,
so a row's "mark" can be followed through chaining, compaction and fetches in fake device memory.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from exporters.tensorrt import build_engines
from runtimes.backends import get_backend
from runtimes.backends.tensorrt import TensorRTBackend
from runtimes.bundle import Bundle, load_bundle
from runtimes.chain import record_chain, run_chain
from runtimes.errors import BackendUnavailableError, BundleError, ConfigError, InputError
from tests.fakes.fake_tensorrt import FakeGpu, blocked_modules, installed_fakes, make_fake_bundle

ROOT = Path(__file__).parents[2]
MARKS = [1.0, 5.0, 2.0, 7.0]


FLAVOURS = {"10.3.0": dict(cuda="12.6.2.post1", driver_version=12060),
            "11.0.0": dict(cuda="13.0.3", driver_version=13000)}


@pytest.fixture(params=sorted(FLAVOURS))
def gpu(request: pytest.FixtureRequest) -> FakeGpu:
    with installed_fakes(request.param, **FLAVOURS[request.param]) as fake:
        yield fake


@pytest.fixture
def bundle(gpu: FakeGpu, tmp_path: Path) -> Bundle:
    root = make_fake_bundle(tmp_path / "bundle")
    build_engines(root, "fp16")
    gpu.calls.clear()
    return load_bundle(root)


@pytest.fixture
def backend(bundle: Bundle) -> TensorRTBackend:
    be = TensorRTBackend(bundle, "fp16", "cuda")
    yield be
    be.close()


def _pixels(marks: list[float]) -> dict[str, np.ndarray]:
    x = np.zeros((len(marks), 3, 4, 4), dtype=np.float32)
    x[:, 0, 0, 0] = marks
    return {"pixel_values": x}


def _addresses(gpu: FakeGpu) -> dict[tuple[str, str], set[int]]:
    out: dict[tuple[str, str], set[int]] = {}
    for a in gpu.named("IExecutionContext.set_tensor_address"):
        out.setdefault((a["graph"], a["name"]), set()).add(a["address"])
    return out


def _copies(gpu: FakeGpu, kind: str) -> list[tuple]:
    return [a["args"] for a in gpu.named("cudaMemcpyAsync") if a["args"][3].name == kind]


def test_chaining_binds_each_output_buffer_as_the_next_input(gpu: FakeGpu, backend: TensorRTBackend) -> None:
    state = backend.start(_pixels(MARKS))
    for key in ("segment_0", "exit_0", "segment_1", "exit_1", "segment_2"):
        backend.run(key, state)
    addr = _addresses(gpu)
    assert addr[("segment_0", "hidden_1")] == addr[("exit_0", "hidden_1")] == addr[("segment_1", "hidden_1")]
    assert addr[("segment_1", "hidden_3")] == addr[("exit_1", "hidden_3")] == addr[("segment_2", "hidden_3")]
    assert all(len(a) == 1 for a in addr.values())
    assert _copies(gpu, "cudaMemcpyDeviceToDevice") == []  # nothing copied between stages
    assert [c[2] for c in _copies(gpu, "cudaMemcpyHostToDevice")] == [4 * 3 * 4 * 4 * 4]  # the input, once
    assert len(gpu.named("IExecutionContext.execute_async_v3")) == 5
    for name, (a,) in ((n, v) for (g, n), v in addr.items() if g == "segment_2"):
        if name == "hidden_3":
            hidden = gpu.array(a, np.float32, (4, 5, 8))
            assert hidden[:, 0, 0].tolist() == MARKS and np.all(hidden == hidden[:, :1, :1])


def test_fetch_copies_only_the_named_tensors_to_pinned_memory(gpu: FakeGpu, backend: TensorRTBackend) -> None:
    state = backend.start(_pixels(MARKS))
    backend.run("segment_0", state)
    backend.run("exit_0", state)
    gpu.calls.clear()
    out = backend.fetch(state, ["confidence_0", "prediction_0"])
    d2h = _copies(gpu, "cudaMemcpyDeviceToHost")
    assert sorted(c[2] for c in d2h) == [4 * 4, 4 * 8]  # float32 and int64 confidences/predictions, 4 rows
    assert all(c[0] in gpu.pinned for c in d2h)  # into pinned buffers allocated once
    assert [n for n, _ in gpu.calls] == ["cudaMemcpyAsync", "cudaMemcpyAsync", "cudaEventRecord", "cudaEventSynchronize"]
    assert out["confidence_0"].dtype == np.float32 and out["confidence_0"].tolist() == MARKS
    assert out["prediction_0"].dtype == np.int64 and out["prediction_0"].tolist() == [1, 5, 2, 7]
    assert gpu.named("cudaMallocHost") == []  # pinned landing buffers were allocated with the backend
    hidden = backend.fetch(state, ["hidden_1"])["hidden_1"]  # allowed, though not what the loop reads
    assert hidden.shape == (4, 5, 8) and hidden[:, 0, 0].tolist() == MARKS
    with pytest.raises(InputError, match="has not been computed"):
        backend.fetch(state, ["confidence_1"])


def test_compact_gathers_kept_rows_on_the_device(gpu: FakeGpu, backend: TensorRTBackend) -> None:
    state = backend.start(_pixels([1.0, 5.0, 2.0, 7.0]))
    backend.run("segment_0", state)
    backend.run("exit_0", state)
    gpu.calls.clear()
    backend.compact(state, np.array([0, 2, 3]))
    d2d = _copies(gpu, "cudaMemcpyDeviceToDevice")
    present = ["confidence_0", "hidden_1", "logits_0", "pixel_values", "prediction_0"]
    assert len(d2d) == 2 * len(present)  # runs [0] and [2, 3], for every tensor in the state
    assert not _copies(gpu, "cudaMemcpyDeviceToHost") and not _copies(gpu, "cudaMemcpyHostToDevice")
    hidden_row = 5 * 8 * 4
    hidden_copies = [c for c in d2d if c[2] in (hidden_row, 2 * hidden_row)]
    dst = min(c[0] for c in hidden_copies)
    assert gpu.array(dst, np.float32, (3, 5, 8))[:, 0, 0].tolist() == [1.0, 2.0, 7.0]
    gpu.calls.clear()
    backend.run("segment_1", state)
    assert {a["shape"] for a in gpu.named("IExecutionContext.set_input_shape")} == {(3, 5, 8)}
    assert _addresses(gpu)[("segment_1", "hidden_1")] == {dst}  # the next segment reads the compacted buffer
    backend.run("exit_1", state)
    assert backend.fetch(state, ["confidence_1"])["confidence_1"].tolist() == [1.0, 2.0, 7.0]
    backend.compact(state, np.array([1]))
    backend.run("segment_2", state)
    final = backend.fetch(state, ["prediction", "confidence"])
    assert final["prediction"].tolist() == [2] and final["confidence"].tolist() == [2.0]
    with pytest.raises(InputError, match="strictly increasing"):
        backend.compact(state, np.array([0, 0]))
    with pytest.raises(InputError, match="strictly increasing"):
        backend.compact(state, np.array([1]))


def test_run_chain_end_to_end_and_record_chain(backend: TensorRTBackend, bundle: Bundle) -> None:
    out = run_chain(backend, bundle, _pixels(MARKS), [4.5, 1.5])
    assert out.exits.tolist() == [2, 0, 1, 0] and out.classes.tolist() == [1, 5, 2, 7]
    assert out.confidences.tolist() == MARKS
    rec = record_chain(backend, bundle, _pixels(MARKS))
    assert rec.predictions.tolist() == [[int(m)] * 3 for m in MARKS]
    full = backend.start(_pixels(MARKS))
    backend.run("full", full)
    assert backend.fetch(full, ["prediction"])["prediction"].tolist() == [1, 5, 2, 7]


def test_batch_limits_and_bad_inputs_raise_input_error(backend: TensorRTBackend) -> None:
    with pytest.raises(InputError, match="larger than the engines' maximum batch 4"):
        backend.start(_pixels([1.0] * 5))
    with pytest.raises(InputError, match="must be float32"):
        backend.start({"pixel_values": np.zeros((2, 3, 4, 4), dtype=np.float64)})
    with pytest.raises(InputError, match="shape"):
        backend.start({"pixel_values": np.zeros((2, 3, 4, 5), dtype=np.float32)})
    with pytest.raises(InputError, match="exactly"):
        backend.start({"pixel_values": np.zeros((2, 3, 4, 4), dtype=np.float32), "extra": np.zeros(2)})
    state = backend.start(_pixels([1.0]))
    with pytest.raises(InputError, match="chain order"):
        backend.run("segment_1", state)


def test_a_changed_plan_is_a_bundle_error(bundle: Bundle) -> None:
    engine_dir = next((bundle.root / "engines").iterdir())
    plan = engine_dir / "exit_1.plan"
    plan.write_bytes(plan.read_bytes().replace(b"hidden_3", b"hidden_4"))
    with pytest.raises(BundleError, match="exit_1.plan: checksum mismatch"):
        TensorRTBackend(bundle, "fp16")


def test_engines_from_another_onnx_are_refused(bundle: Bundle) -> None:
    engine_dir = next((bundle.root / "engines").iterdir())
    build = json.loads((engine_dir / "build.json").read_text())
    build["graphs"]["segment_0"]["onnx_sha256"] = "0" * 64
    (engine_dir / "build.json").write_text(json.dumps(build))
    with pytest.raises(BundleError, match="built from another onnx/fp16/segment_0.onnx"):
        TensorRTBackend(bundle, "fp16")


def test_missing_engine_set_says_which_build_to_run(gpu: FakeGpu, bundle: Bundle) -> None:
    with pytest.raises(BackendUnavailableError, match=r"freedeploy build .* --target trt-fp32") as info:
        TensorRTBackend(bundle, "fp32")
    assert "found trt" in str(info.value)  # the fp16 set exists, but for another precision
    with pytest.raises(ConfigError, match="holds fp16 engines"):
        TensorRTBackend(bundle, "fp32", engine_dir=str(next((bundle.root / "engines").iterdir())))
    gpu.gpu_name = "NVIDIA L4"
    with pytest.raises(BackendUnavailableError, match="nvidia-l4-fp16"):
        TensorRTBackend(bundle, "fp16")


def test_options_and_devices_are_checked(bundle: Bundle) -> None:
    with pytest.raises(ConfigError, match="not threads"):
        TensorRTBackend(bundle, "fp16", threads=4)
    with pytest.raises(ConfigError, match="'cuda' or 'cuda:N'"):
        TensorRTBackend(bundle, "fp16", device="cpu")
    with pytest.raises(ConfigError, match="cuda:1 does not exist"):
        TensorRTBackend(bundle, "fp16", device="cuda:1")


def test_auto_gives_each_backend_only_its_own_options(bundle: Bundle) -> None:
    from runtimes import Runtime

    # an ONNX Runtime setting does not turn TensorRT away: the engines are used, the setting is not theirs
    with Runtime.load(bundle.root, threads=2, spinning=False, cuda_graphs=True) as rt:
        assert rt.backend.name == "tensorrt" and rt.backend.cuda_graphs
    with pytest.raises(ConfigError, match="no backend takes threds"):
        Runtime.load(bundle.root, threds=2)


def test_cuda_graphs_capture_once_per_graph_at_batch_1(gpu: FakeGpu, bundle: Bundle) -> None:
    backend = TensorRTBackend(bundle, "fp16", cuda_graphs=True)
    try:
        first = run_chain(backend, bundle, _pixels([1.0]), [4.5, 6.0])
        executed = gpu.named("IExecutionContext.execute_async_v3")
        assert [a["captured"] for a in executed] == [False, True] * 5  # warm-up run, then capture, per graph
        assert len(gpu.named("cudaGraphInstantiate")) == 5
        assert all(a["args"][0] != 0 for a in gpu.named("cudaStreamBeginCapture"))  # a non-default stream
        gpu.calls.clear()
        second = run_chain(backend, bundle, _pixels([1.0]), [4.5, 6.0])
        assert gpu.named("IExecutionContext.execute_async_v3") == [] and len(gpu.named("cudaGraphLaunch")) == 5
        assert second.classes.tolist() == first.classes.tolist() == [1]
        gpu.calls.clear()
        wide = run_chain(backend, bundle, _pixels(MARKS), [4.5, 1.5])  # other batch sizes run plainly
        assert gpu.named("cudaGraphLaunch") == [] and wide.exits.tolist() == [2, 0, 1, 0]
        gpu.calls.clear()
        run_chain(backend, bundle, _pixels([2.0]), [4.5, 6.0])  # shapes changed: a plain run re-warms those contexts
        # segment_2 ran the wide call's last row at batch 1 already, so its graph replays at once
        assert [a["graph"] for a in gpu.named("IExecutionContext.execute_async_v3")] == [
            "segment_0", "exit_0", "segment_1", "exit_1"]
        assert gpu.named("cudaStreamBeginCapture") == [] and len(gpu.named("cudaGraphLaunch")) == 1
        gpu.calls.clear()
        assert run_chain(backend, bundle, _pixels([2.0]), [4.5, 6.0]).classes.tolist() == [2]
        assert gpu.named("IExecutionContext.execute_async_v3") == [] and len(gpu.named("cudaGraphLaunch")) == 5
        assert backend.describe()["cuda_graphs"] is True
    finally:
        backend.close()
    assert gpu.named("cudaGraphExecDestroy")


def test_states_borrow_buffer_sets_and_threads_get_their_own_rows(gpu: FakeGpu, backend: TensorRTBackend,
                                                                  bundle: Bundle) -> None:
    mallocs = len(gpu.named("cudaMalloc"))
    for _ in range(3):  # a finished call's buffers go back to the pool
        record_chain(backend, bundle, _pixels(MARKS))
        gc.collect()
    assert len(gpu.named("cudaMalloc")) == mallocs
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        marks = [float(i), float(i + 10)]
        for _ in range(20):
            rec = record_chain(backend, bundle, _pixels(marks))
            assert rec.predictions[:, 0].tolist() == [i, i + 10]
        results[i] = rec.predictions[:, -1].tolist()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: [i, i + 10] for i in range(4)}


def test_close_frees_device_and_pinned_memory(gpu: FakeGpu, bundle: Bundle) -> None:
    backend = TensorRTBackend(bundle, "fp16")
    state = backend.start(_pixels(MARKS))
    backend.run("segment_0", state)
    backend.run("exit_0", state)
    backend.compact(state, np.array([1, 3]))
    backend.fetch(state, ["confidence_0"])
    assert gpu.device and gpu.pinned
    backend.close()
    backend.close()
    assert gpu.device == {} and gpu.pinned == {}
    assert gpu.named("cudaStreamDestroy") and gpu.named("cudaEventDestroy")
    with pytest.raises(ConfigError, match="closed"):
        backend.start(_pixels(MARKS))


def test_describe_and_registry(backend: TensorRTBackend) -> None:
    info = backend.describe()
    assert info["backend"] == "tensorrt" and info["precision"] == "fp16" and info["device"] == "cuda"
    assert info["engine_key"].endswith("-fp16") and info["cuda_graphs"] is False and info["max_batch"] == 4
    assert get_backend("tensorrt") is TensorRTBackend


def test_the_fakes_have_the_real_runtime_api_and_the_backend_uses_only_the_current_part(
        gpu: FakeGpu, backend: TensorRTBackend, bundle: Bundle) -> None:
    record_chain(backend, bundle, _pixels(MARKS))
    ctx = next(iter(backend._contexts.values()))
    engine = next(iter(backend._engines.values()))
    assert hasattr(ctx, "execute_v2")  # still in 10.0-11.x (pyCore.cpp at v10.3.0, v11.0, v11.1); synchronous
    for gone in ("execute_async_v2", "set_binding_shape", "get_binding_shape"):  # removed in 10.0
        assert not hasattr(ctx, gone)
    for gone in ("num_bindings", "get_binding_index", "get_binding_name", "max_batch_size"):
        assert not hasattr(engine, gone)
    assert gpu.named("IExecutionContext.execute_v2") == []
    assert gpu.deprecated == []  # including int(cudaStream_t), deprecated in cuda-bindings 13


def test_missing_packages_give_install_guidance(bundle: Bundle) -> None:
    with blocked_modules("tensorrt"):
        with pytest.raises(BackendUnavailableError, match=r"pip install tensorrt-cu12 'cuda-bindings>=12.8,<13'"):
            TensorRTBackend(bundle, "fp16")
    with blocked_modules("cuda", "cuda.bindings", "cuda.bindings.runtime"):
        with pytest.raises(BackendUnavailableError, match="cuda-bindings is not importable"):
            TensorRTBackend(bundle, "fp16")


def test_module_imports_without_tensorrt_cuda_or_torch() -> None:
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'tensorrt', 'cuda', 'torch', 'onnx'}:\n"
            "            raise ImportError(name + ' is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import runtimes.backends.tensorrt as m\n"
            "assert 'tensorrt' not in sys.modules and 'torch' not in sys.modules\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
