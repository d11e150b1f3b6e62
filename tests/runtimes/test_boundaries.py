"""Every option and input checked where it enters the runtime: devices, thread counts, input types,
a closed runtime; and ``infer(..., errors="keep")``, where one bad input costs its own row only."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtimes import Runtime
from runtimes.backends.onnxruntime import OrtBackend, max_threads
from runtimes.backends.tensorrt import TensorRTBackend
from runtimes.errors import BackendUnavailableError, ConfigError, InputError


@pytest.fixture(scope="module")
def rt(micro_bundle):
    return Runtime.load(micro_bundle.out)


def _images(n: int) -> list[np.ndarray]:
    return list(np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))


# devices -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["nope", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cpu:0", " cpu", 0])
def test_malformed_devices_are_config_errors(micro_bundle, device: object) -> None:
    for backend in ("auto", "onnxruntime", "tensorrt"):
        with pytest.raises(ConfigError, match=r"device must be 'cpu', 'cuda' or 'cuda:N' \(N: a GPU index\)"):
            Runtime.load(micro_bundle.out, backend=backend, device=device)


def test_each_backend_names_the_devices_it_takes(micro_bundle) -> None:
    with pytest.raises(ConfigError, match=r"tensorrt backend runs on 'cuda' or 'cuda:N' .*not 'cpu'"):
        Runtime.load(micro_bundle.out, backend="tensorrt", device="cpu")
    with pytest.raises(ConfigError, match=r"onnxruntime backend runs on 'cpu', 'cuda' or 'cuda:N'"):
        OrtBackend.check_device("cuda:1:2")
    for device in ("cpu", "cuda", "cuda:0", "cuda:3"):
        OrtBackend.check_device(device)
    with pytest.raises(ConfigError, match="'cuda' or 'cuda:N'"):
        TensorRTBackend.check_device("cpu")


def test_cuda_without_cuda_stays_backend_unavailable(micro_bundle) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(BackendUnavailableError, match="needs onnxruntime-gpu"):
            Runtime.load(micro_bundle.out, backend="onnxruntime", device=device)


# thread counts -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["threads", "head_threads"])
@pytest.mark.parametrize("value", [0, -1, "4", 2.0, True, "max+1", 10 ** 6])
def test_thread_counts_are_integers_within_the_cap(micro_bundle, option: str, value: object) -> None:
    value = max_threads() + 1 if value == "max+1" else value
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=fr"{option} must be an integer from 1 to {max_threads()} \(4 per CPU\)"):
        Runtime.load(micro_bundle.out, **{option: value})
    assert time.perf_counter() - t0 < 5  # refused before any session starts its pool


def test_valid_thread_counts_load(micro_bundle) -> None:
    with Runtime.load(micro_bundle.out, threads=np.int64(1), head_threads=max_threads()) as rt:
        assert rt.backend.threads == 1 and rt.backend.head_threads == max_threads()


# inputs and a closed runtime ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, 5, 2.5, object(), np.array(5), iter([1]), {1, 2}])
@pytest.mark.parametrize("call", ["infer", "record", "infer_full", "encode"])
def test_inputs_of_no_accepted_kind(rt, call: str, value: object) -> None:
    with pytest.raises(InputError, match="inputs must be a path, an image, an array, a str or bytes, a dict of arrays, "
                                         "or a non-empty list of those; got"):
        getattr(rt, call)(value)


def test_a_question_of_no_accepted_kind(micro_vqa_bundle) -> None:
    rt = Runtime.load(micro_vqa_bundle.out)
    with pytest.raises(InputError, match="question= must be a str or a list of str, got int"):
        rt.infer(_images(1), question=5)


def test_every_call_after_close_is_a_config_error(micro_bundle) -> None:
    rt = Runtime.load(micro_bundle.out)
    rt.close()
    rt.close()  # idempotent
    with rt:
        pass  # and __exit__ closes once more without complaint
    image = _images(1)[0]
    for call in (rt.infer, rt.record, rt.infer_full, rt.encode):
        with pytest.raises(ConfigError, match="this runtime is closed"):
            call(image)
    with pytest.raises(ConfigError, match="this runtime is closed"):
        rt.infer(image, errors="keep")


# errors="keep" -----------------------------------------------------------------------------------------------------

def _bomb(path: Path) -> str:
    from tests.runtimes.test_preprocess import _png_claiming

    _png_claiming(path, 100_000, 100_000)
    return str(path)


def test_keep_runs_every_input_it_can(rt, tmp_path: Path) -> None:
    good = _images(3)
    Image.fromarray(good[2]).save(tmp_path / "good.png")
    items = [good[0], str(tmp_path / "missing.png"), good[1], _bomb(tmp_path / "bomb.png"), None,
             str(tmp_path / "good.png"), Image.fromarray(np.zeros((4, 4), np.float32) + 7)]
    with pytest.raises(InputError, match="cannot read image"):  # the default still raises for the whole call
        rt.infer(items)
    res = rt.infer(items, errors="keep")
    assert len(res) == 7 and sorted(res.errors) == [1, 3, 4, 6] and res.ok.tolist() == [1, 0, 1, 0, 0, 1, 0]
    assert all(isinstance(e, InputError) for e in res.errors.values())
    assert "missing.png" in str(res.errors[1]) and "decompression bomb" in str(res.errors[3])
    assert "expected an image path" in str(res.errors[4]) and "[0, 1]" in str(res.errors[6])
    alone = rt.infer([good[0], good[1], good[2]])
    assert res.classes[res.ok].tolist() == alone.classes.tolist()
    assert np.array_equal(res.confidences[res.ok], alone.confidences)
    assert res.classes[~res.ok].tolist() == [-1] * 4 and np.isnan(res.confidences[~res.ok]).all()
    assert res.exits[~res.ok].tolist() == [-1] * 4 and res.blocks[~res.ok].tolist() == [0] * 4
    assert res[0] == alone[0] and res[-2] == alone[2]
    with pytest.raises(InputError, match="missing.png"):
        res[1]
    with pytest.raises(ConfigError, match="errors must be 'raise' or 'keep'"):
        rt.infer(items, errors="ignore")


def test_keep_with_nonfinite_rows(micro_bundle, rt) -> None:
    x = np.random.default_rng(0).standard_normal((20, 3, 16, 16)).astype(np.float32)
    x[3, 0, 0, 0], x[17, 2, 5, 5] = np.nan, np.inf
    res = rt.infer({"pixel_values": x}, errors="keep")
    assert sorted(res.errors) == [3, 17] and "NaN or Inf" in str(res.errors[3])
    clean = rt.infer({"pixel_values": np.delete(x, [3, 17], axis=0)})
    assert np.array_equal(res.classes[res.ok], clean.classes)
    flagging = Runtime.load(micro_bundle.out, nonfinite="flag")
    res = flagging.infer({"pixel_values": x}, errors="keep")
    assert res.errors == {} and np.flatnonzero(res.flagged).tolist() == [3, 17]
    with pytest.raises(InputError, match="must have shape"):  # a malformed dict is the call's fault: it raises
        rt.infer({"pixel_values": x[:, :2]}, errors="keep")


def test_an_input_onnx_runtime_rejects(micro_text_bundle) -> None:
    """Token ids past the vocabulary pass every check but make ONNX Runtime's Gather fail: an InputError
    for that row; with errors="keep" only its row, also inside a batch past the bundle's max (16)."""
    rt = Runtime.load(micro_text_bundle.out)
    arrays = rt.encode([f"good morning number {i}" for i in range(20)])
    bad = {k: v.copy() for k, v in arrays.items()}
    bad["input_ids"][17, 1] = 10 ** 6
    with pytest.raises(InputError, match="ONNX Runtime rejected the input in segment_0: .*Gather"):
        rt.infer(bad)
    res = rt.infer(bad, errors="keep")
    assert list(res.errors) == [17] and "out of data bounds" in str(res.errors[17])
    others = rt.infer({k: np.delete(v, 17, axis=0) for k, v in arrays.items()})
    assert np.array_equal(res.classes[res.ok], others.classes)
