"""Where a real device breaks first: the TensorRT path against fakes as strict as the real APIs.

One section per finding of the audit in ``docs/tensorrt.md``: installing on Jetson, no driver,
optimization profiles, CUDA graph capture, version checks, and what build.json records. The fakes
behave like TensorRT 8.6 / 10.3 / 10.12 / 11.0 and like cuda-python 12.6.2.post1, cuda-bindings
12.9.0 and 13.0.3 (``tests/fakes/fake_cudart.py`` says how each was established).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from exporters import tensorrt as ex
from runtimes import Runtime
from runtimes.backends import tensorrt_device as dev
from runtimes.backends.tensorrt import TensorRTBackend
from runtimes.bundle import load_bundle
from runtimes.chain import run_chain
from runtimes.errors import BackendUnavailableError, ExportError
from tests.fakes.fake_tensorrt import CUDA_FLAVOURS, installed_fakes, make_fake_bundle

ROOT = Path(__file__).parents[2]
JETPACK6 = dict(cuda="12.6.2.post1", driver_version=12060)  # TensorRT 10.3, CUDA 12.6, Python 3.10


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """A fake bundle with fp16 engines built for the fake H200."""
    root = make_fake_bundle(tmp_path / "bundle")
    with installed_fakes("10.3.0", **JETPACK6):
        ex.build_engines(root, "fp16")
    return root


def _pixels(marks: list[float]) -> dict[str, np.ndarray]:
    x = np.zeros((len(marks), 3, 4, 4), dtype=np.float32)
    x[:, 0, 0, 0] = marks
    return {"pixel_values": x}


def _jetson(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    monkeypatch.setattr(dev, "_TEGRA_RELEASE", release)


# -- 1. installing on Jetson: pins that exist and match the driver ----------------------------------------------

def test_the_trt_extra_resolves_to_bindings_that_exist_for_each_platform() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trt"]

    def picked(machine: str, python: str) -> list[str]:
        env = {"platform_machine": machine, "python_version": python, "extra": ""}
        return [f"{r.name}{r.specifier}" for r in map(Requirement, extra) if r.marker is None or r.marker.evaluate(env)]

    assert picked("aarch64", "3.10") == ["cuda-python==12.6.2.post1"]  # JetPack 6: CUDA 12.6, Python 3.10
    assert picked("x86_64", "3.11") == ["cuda-bindings<13,>=12.8"]  # a CUDA 12 driver or newer runs these
    assert picked("aarch64", "3.12") == ["cuda-bindings<13,>=12.8"]


def test_every_readme_install_line_pins_the_cuda_bindings() -> None:
    text = "\n".join((ROOT / page).read_text() for page in ("README.md", "docs/install.md"))
    lines = [ln for ln in text.splitlines()
             if ln.startswith("pip install") and re.search(r"cuda-(bindings|python)", ln)]
    assert lines and all(re.search(r"cuda-(bindings|python)[^\s]*(==|<)", ln) for ln in lines), lines
    assert any("cuda-python==12.6.2.post1" in ln for ln in lines)  # the Jetson line


def test_jetson_hint_names_bindings_that_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _jetson(tmp_path, monkeypatch)
    hint = dev.install_hint()
    assert "cuda-python==12.6.2.post1" in hint and "cuda-bindings==13.0.*" in hint
    assert "cuda-bindings==12.6" not in hint and "<JetPack" not in hint  # 12.6.* was never published


def test_bindings_newer_than_the_jetson_driver_say_what_to_install(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An unpinned cuda-bindings on JetPack 6 is 13.x: on the CUDA 12.6 driver it cannot run."""
    _jetson(tmp_path, monkeypatch)
    with installed_fakes("10.3.0", cuda="13.0.3", driver_version=12060):
        with pytest.raises(BackendUnavailableError) as info:
            dev.detect_device()
    msg = str(info.value)
    assert "CUDA 12.6" in msg and "cuda-bindings 13.0.3" in msg and "CUDA 13.0" in msg
    assert "pip uninstall -y cuda-bindings cuda-python" in msg and "pip install 'cuda-python==12.6.2.post1'" in msg


def test_bindings_newer_than_a_workstation_driver_say_what_to_install() -> None:
    with installed_fakes("11.0.0", cuda="13.0.3", driver_version=12080):
        with pytest.raises(BackendUnavailableError, match=r"supports CUDA 12.8.*'cuda-bindings>=12.8,<13'"):
            dev.detect_device()


# -- 2. no driver: one clear error, and backend="auto" falls back --------------------------------------------------

@pytest.mark.parametrize("cuda", CUDA_FLAVOURS)
def test_no_driver_is_backend_unavailable_with_every_bindings_flavour(cuda: str) -> None:
    with installed_fakes("10.3.0", cuda=cuda, driver_version=0) as gpu:
        with pytest.raises(BackendUnavailableError, match="driver"):
            dev.detect_device()
    assert gpu.named("cudaGetDeviceCount")


def test_the_cuda_python_12_6_fake_raises_like_the_real_one() -> None:
    with installed_fakes("10.3.0", cuda="12.6.2.post1", driver_version=0) as gpu:
        with pytest.raises(RuntimeError, match="Failed to dlopen libcuda.so.1"):
            gpu.cudart.cudaGetDeviceCount()
        assert gpu.cudart.cudaRuntimeGetVersion()[1] == 12060  # needs no driver


@pytest.mark.parametrize("cuda", CUDA_FLAVOURS)
def test_auto_falls_back_to_onnx_runtime_with_one_warning_when_the_driver_is_missing(
        built: Path, cuda: str, caplog: pytest.LogCaptureFixture) -> None:
    with installed_fakes("10.3.0", cuda=cuda, driver_version=0), caplog.at_level(logging.INFO):
        with Runtime.load(built) as rt:
            assert rt.backend.name == "onnxruntime"
            assert rt.infer(_pixels([1.0, 2.0])) is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("TensorRT not used, falling back to ONNX Runtime:") and "driver" in warnings[0]


# -- 3. profiles: TensorRT raises on inconsistent shapes; that is an ExportError ----------------------------------

@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_an_inconsistent_profile_is_an_export_error(tmp_path: Path, version: str) -> None:
    bundle = load_bundle(make_fake_bundle(tmp_path / "b"))
    onnx = bundle.path(bundle.graph("segment_0").files["fp32"])
    with installed_fakes(version) as gpu:
        profile = gpu.trt.Builder(gpu.trt.Logger()).create_optimization_profile()
        with pytest.raises(RuntimeError, match="Shape provided for opt is inconsistent with other shapes."):
            profile.set_shape("x", (2, 3), (1, 3), (4, 3))  # as the real binding does
        with pytest.raises(ExportError, match=r"profile of pixel_values .*opt is inconsistent"):
            ex.onnx2plan(onnx, {"pixel_values": ((4, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4))})


# -- 4. CUDA graphs: wait for the warm-up, clear the error a failed capture leaves ---------------------------------

def test_capture_waits_for_the_warm_up_as_trtexec_does(built: Path) -> None:
    with installed_fakes("10.3.0", **JETPACK6) as gpu:
        backend = TensorRTBackend(load_bundle(built), "fp16", cuda_graphs=True)
        try:
            run_chain(backend, backend.bundle, _pixels([1.0]), [4.5, 6.0])
            names = [n for n, _ in gpu.calls]
            begins = [i for i, n in enumerate(names) if n == "cudaStreamBeginCapture"]
            assert begins and all(names[i - 1] == "cudaStreamSynchronize" for i in begins)
            assert len(gpu.named("cudaGraphInstantiate")) == 5  # every graph captured, none refused
        finally:
            backend.close()


def test_a_failed_capture_clears_its_error_and_the_graph_runs_plainly(built: Path) -> None:
    with installed_fakes("10.3.0", **JETPACK6) as gpu:
        gpu.uncapturable = {"exit_0"}
        backend = TensorRTBackend(load_bundle(built), "fp16", cuda_graphs=True)
        try:
            first = run_chain(backend, backend.bundle, _pixels([1.0]), [4.5, 6.0])
            assert gpu.last_error is None and gpu.named("cudaGetLastError")
            assert len(gpu.named("cudaGraphInstantiate")) == 4  # all but exit_0
            gpu.calls.clear()
            again = run_chain(backend, backend.bundle, _pixels([1.0]), [4.5, 6.0])
            assert [a["graph"] for a in gpu.named("IExecutionContext.execute_async_v3")] == ["exit_0"]
            assert first.classes.tolist() == again.classes.tolist() == [1]
        finally:
            backend.close()


# -- 5. versions: TensorRT older than 10 is refused; no int(handle) on new bindings --------------------------------

def test_tensorrt_8_6_is_refused_with_a_clear_message(built: Path, caplog: pytest.LogCaptureFixture) -> None:
    with installed_fakes("8.6.1", **JETPACK6):
        with pytest.raises(BackendUnavailableError, match=r"TensorRT 8.6.1 is too old: freedeploy needs TensorRT 10"):
            ex.build_engines(built, "fp32")
        with pytest.raises(BackendUnavailableError, match="too old"):
            TensorRTBackend(load_bundle(built), "fp16")
        with caplog.at_level(logging.WARNING), Runtime.load(built) as rt:
            assert rt.backend.name == "onnxruntime"
    assert any("8.6.1 is too old" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cuda", CUDA_FLAVOURS)
def test_the_stream_handle_never_uses_deprecated_int(built: Path, cuda: str) -> None:
    with installed_fakes("11.0.0", cuda=cuda, driver_version=13000) as gpu:
        ex.build_engines(built, "fp16")  # the fixture's engines are for 10.3
        backend = TensorRTBackend(load_bundle(built), "fp16")
        try:
            run_chain(backend, backend.bundle, _pixels([1.0, 5.0]), [4.5, 6.0])
            streams = {a["stream"] for a in gpu.named("IExecutionContext.execute_async_v3")}
            assert streams == {backend._stream._value}  # the raw handle, not getPtr() (its storage)
        finally:
            backend.close()
    assert gpu.deprecated == []


# -- 6. what the fakes and build.json state matches the real APIs --------------------------------------------------

def test_the_10_3_fake_deprecates_only_what_10_3_deprecates() -> None:
    with installed_fakes("10.3.0") as gpu:
        trt = gpu.trt
        assert trt.BuilderFlag.FP16 == 0 and trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS == 9
        assert trt.Builder(trt.Logger()).platform_has_fast_fp16 is True
        assert gpu.deprecated == []
    with installed_fakes("10.12.0") as gpu:
        gpu.trt.BuilderFlag.FP16
        gpu.trt.Builder(gpu.trt.Logger()).platform_has_fast_fp16
        assert gpu.deprecated == ["BuilderFlag.FP16", "Builder.platform_has_fast_fp16"]
    for version in ("10.3.0", "11.0.0"):
        with installed_fakes(version) as gpu:
            config = gpu.trt.Builder(gpu.trt.Logger()).create_builder_config()
            assert config.get_flag(gpu.trt.BuilderFlag.TF32)  # on by default


def test_build_json_records_the_real_flags_and_the_installed_cuda_runtime(tmp_path: Path) -> None:
    root = make_fake_bundle(tmp_path / "b")
    with installed_fakes("10.3.0", cuda="12.9.0", driver_version=12080, local_runtime_version=12040):
        res = ex.build_engines(root, "fp16")
        info = dev.detect_device()
    build = json.loads((res.directory / "build.json").read_text())
    assert build["settings"]["builder_flags"] == ["TF32"]
    assert build["cuda_runtime_version"] == "12.4"  # libcudart here; cuda-bindings itself is built for 12.9
    assert (info.cuda_bindings_version, info.driver_version) == ("12.9.0", "12.8")
    with installed_fakes("10.3.0", cuda="12.9.0", local_runtime_version=None):
        assert dev.detect_device().cuda_runtime_version is None  # unknown, never the bindings' own version
