"""``exporters.tensorrt`` against the TensorRT 10.3 and 11.0 API surfaces (fakes, CPU only), 10.3 with
cuda-python 12.6.2.post1 (JetPack 6), 11.0 with cuda-bindings 13 on a CUDA 13 driver.

The fakes prove the calls exist in each version's Python API, not that engines build; the
GPU-marked tests in ``test_tensorrt_gpu.py`` build for real.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from exporters import tensorrt as ex
from runtimes.backends import tensorrt_device as rt_trt
from runtimes.bundle import load_bundle
from runtimes.errors import BackendUnavailableError, BundleError, ConfigError, ExportError
from tests.fakes.fake_tensorrt import FakeGpu, blocked_modules, installed_fakes, make_fake_bundle

VERSIONS = ["10.3.0", "11.0.0"]
FLAVOURS = {"10.3.0": dict(cuda="12.6.2.post1", driver_version=12060),
            "11.0.0": dict(cuda="13.0.3", driver_version=13000)}


@pytest.fixture(params=VERSIONS)
def gpu(request: pytest.FixtureRequest) -> FakeGpu:
    with installed_fakes(request.param, **FLAVOURS[request.param]) as fake:
        yield fake


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return make_fake_bundle(tmp_path / "bundle")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_writes_raw_plans_timing_cache_and_build_json(gpu: FakeGpu, bundle_dir: Path) -> None:
    res = ex.build_engines(bundle_dir, "fp16", workspace_gb=0.5, optimization_level=2)
    bundle = load_bundle(bundle_dir)
    assert res.key == ex.target_key(ex.detect_device(), "fp16") and res.directory == bundle_dir / "engines" / res.key
    assert set(res.plans) == set(bundle.graph_keys())
    for key, path in res.plans.items():
        assert path == res.directory / f"{key}.plan" and path.read_bytes().startswith(b"{")  # raw: no header of ours
    assert sorted(p.name for p in res.directory.iterdir()) == sorted(
        [f"{k}.plan" for k in bundle.graph_keys()] + ["timing.cache", "build.json"])

    build = json.loads((res.directory / "build.json").read_text())
    version = gpu.trt.__version__
    assert build["schema"] == 1 and build["key"] == res.key and build["precision"] == "fp16"
    driver = "12.6" if version.startswith("10.") else "13.0"
    # the runtime is the libcudart installed (12.6), not the CUDA the bindings were built for
    assert (build["tensorrt_version"], build["cuda_runtime_version"], build["cuda_driver_version"]) == (version, "12.6", driver)
    assert build["gpu"] == {"name": "NVIDIA H200", "compute_capability": [9, 0], "board": None}
    assert build["jetpack_l4t"] is None
    settings = build["settings"]
    assert settings["strongly_typed"] is True and settings["builder_flags"] == ["TF32"]  # TensorRT's default
    assert settings["memory_pool_limits"] == {"WORKSPACE": 1 << 29}  # by enum name, not value
    assert settings["builder_optimization_level"] == 2
    assert settings["network_flags"] == (["STRONGLY_TYPED"] if version.startswith("10.") else [])
    for key in bundle.graph_keys():
        g = build["graphs"][key]
        rel = bundle.graph(key).files["fp16"]
        assert g["onnx"] == rel and g["onnx_sha256"] == _sha(bundle_dir / rel)
        assert g["plan_sha256"] == _sha(res.plans[key])
        want = {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in ex.profile_for(bundle, key).items()}
        assert g["profile"] == want
    assert build["timing_cache"] == {"file": "timing.cache", "sha256": _sha(res.directory / "timing.cache")}
    assert build["build_seconds"] >= 0 and re.match(r"\d{4}-\d\d-\d\dT", build["created"])
    assert ex.read_build(res.directory).to_dict() == build


def test_build_uses_only_current_api(gpu: FakeGpu, bundle_dir: Path) -> None:
    ex.build_engines(bundle_dir, "fp16")
    trt = gpu.trt
    assert gpu.deprecated == []  # no EXPLICIT_BATCH, weak-typing flags, calibrators or platform_has_fast_*
    assert gpu.named("IBuilderConfig.set_flag") == []
    flags = {a["flags"] for a in gpu.named("Builder.create_network")}
    assert flags == ({1 << 1} if trt.__version__.startswith("10.") else {0})
    assert {a["pool"] for a in gpu.named("IBuilderConfig.set_memory_pool_limit")} == {"WORKSPACE"}
    assert all(a["ignore_mismatch"] is False for a in gpu.named("IBuilderConfig.set_timing_cache"))
    # one profile per engine; the order of the builder calls matches the documented flow
    order = [n for n, _ in gpu.calls if n in ("OnnxParser.parse_from_file", "IOptimizationProfile.set_shape",
                                               "IBuilderConfig.add_optimization_profile", "IBuilderConfig.set_timing_cache",
                                               "Builder.build_serialized_network")]
    assert order[:5] == ["OnnxParser.parse_from_file", "IOptimizationProfile.set_shape",
                         "IBuilderConfig.add_optimization_profile", "IBuilderConfig.set_timing_cache",
                         "Builder.build_serialized_network"]
    # what the fakes guarantee: removed names are really absent in 11, and nobody builds the old way
    builder, config = trt.Builder(trt.Logger()), trt.Builder(trt.Logger()).create_builder_config()
    for gone in ("build_engine", "max_batch_size", "max_workspace_size"):
        assert not hasattr(builder, gone) and not hasattr(config, gone)
    if trt.__version__.startswith("11."):
        for name in ("EXPLICIT_BATCH",):
            with pytest.raises(AttributeError):
                getattr(trt.NetworkDefinitionCreationFlag, name)
        for name in ("FP16", "INT8"):
            assert not hasattr(trt.BuilderFlag, name)
        assert not hasattr(trt, "IInt8EntropyCalibrator2") and not hasattr(config, "int8_calibrator")


def test_timing_cache_flows_from_graph_to_graph_and_into_a_rebuild(gpu: FakeGpu, bundle_dir: Path) -> None:
    res = ex.build_engines(bundle_dir, "fp32")
    sizes = [a["size"] for a in gpu.named("IBuilderConfig.create_timing_cache")]
    assert sizes[0] == 0 and all(s > 0 for s in sizes[1:])  # each build starts from the previous one's cache
    cache = (res.directory / "timing.cache").read_bytes()
    assert all(k.encode() in cache for k in res.plans)
    gpu.calls.clear()
    ex.build_engines(bundle_dir, "fp32", overwrite=True)
    assert gpu.named("IBuilderConfig.create_timing_cache")[0]["size"] == len(cache)


def test_a_failed_parse_collects_every_parser_error(gpu: FakeGpu, tmp_path: Path) -> None:
    bundle_dir = make_fake_bundle(tmp_path / "b", extra={"exit_0": {"errors": ["unsupported op Foo", "bad shape", "no Bar"]}})
    bundle = load_bundle(bundle_dir)
    with pytest.raises(ExportError) as info:
        ex.onnx2plan(bundle.path(bundle.graph("exit_0").files["fp32"]), ex.profile_for(bundle, "exit_0"))
    msg = str(info.value)
    assert "exit_0.onnx" in msg and "3 error(s)" in msg
    assert all(e in msg for e in ("unsupported op Foo", "bad shape", "no Bar"))


def test_a_failed_build_leaves_no_engine_set(gpu: FakeGpu, tmp_path: Path) -> None:
    bundle_dir = make_fake_bundle(tmp_path / "b", extra={"segment_1": {"fail_build": True}})
    with pytest.raises(ExportError, match="segment_1.onnx"):
        ex.build_engines(bundle_dir, "fp16")
    assert not any((bundle_dir / "engines").iterdir())  # no engines/<key>, no half-written temp dir
    assert gpu.named("Builder.build_serialized_network")[-1]["graph"] == "segment_1"


def test_existing_engine_set_needs_overwrite(gpu: FakeGpu, bundle_dir: Path) -> None:
    first = ex.build_engines(bundle_dir, "fp16")
    with pytest.raises(ConfigError, match="overwrite"):
        ex.build_engines(bundle_dir, "fp16")
    again = ex.build_engines(bundle_dir, "fp16", overwrite=True)
    assert again.directory == first.directory and (again.directory / "build.json").is_file()


def test_progress_reaches_one_and_callback_errors_cancel_the_build(gpu: FakeGpu, bundle_dir: Path) -> None:
    seen: list[tuple[str, float]] = []
    ex.build_engines(bundle_dir, "fp32", progress=lambda m, f: seen.append((m, f)))
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0.0 <= fractions[0]
    assert any("segment_0: Building engine" in m for m, _ in seen)
    assert not any("Tactic selection" in m for m, _ in seen)  # nested phases are not forwarded

    def broken(message: str, fraction: float) -> None:
        if ": " in message:
            raise RuntimeError("progress bar broke")

    with pytest.raises(RuntimeError, match="progress bar broke"):
        ex.build_engines(bundle_dir, "fp16", progress=broken)
    assert not (bundle_dir / "engines" / ex.target_key(ex.detect_device(), "fp16")).exists()


def test_bad_settings_and_missing_precision_are_config_errors(gpu: FakeGpu, bundle_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no int8 ONNX"):
        ex.build_engines(bundle_dir, "int8")
    with pytest.raises(ConfigError, match="0..5"):
        ex.build_engines(bundle_dir, "fp16", optimization_level=7)
    with pytest.raises(ConfigError, match="workspace"):
        ex.build_engines(bundle_dir, "fp16", workspace_gb=0)


def test_profile_for_uses_the_batch_spec(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert ex.profile_for(bundle, "segment_0") == {"pixel_values": ((1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4))}
    assert ex.profile_for(bundle, "exit_1") == {"hidden_3": ((1, 5, 8), (2, 5, 8), (4, 5, 8))}


def test_target_key_is_deterministic_and_filesystem_safe() -> None:
    orin = ex.DeviceInfo("Orin", (8, 7), "12.6", "12.6", "10.3.0", "R36.4.3", "NVIDIA Jetson AGX Orin Developer Kit")
    assert ex.target_key(orin, "fp16") == "trt10.3.0-sm87-nvidia-jetson-agx-orin-fp16"
    h200 = ex.DeviceInfo("NVIDIA H200", (9, 0), "12.8", "12.6", "11.0.0", None)
    assert ex.target_key(h200, "int8") == ex.target_key(h200, "int8") == "trt11.0.0-sm90-nvidia-h200-int8"
    odd = ex.DeviceInfo("NVIDIA RTX 6000 Ada / (test)", (8, 9), "12.4", "12.4", "10.13.3.9.post1", None)
    assert re.fullmatch(r"[a-z0-9.\-]+", ex.target_key(odd, "fp32"))
    with pytest.raises(ConfigError):
        ex.target_key(h200, "bf16")


def test_detect_device_reads_jetson_release_and_board(gpu: FakeGpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n")
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    monkeypatch.setattr(rt_trt, "_TEGRA_RELEASE", release)
    monkeypatch.setattr(rt_trt, "_DEVICE_TREE_MODEL", model)
    gpu.gpu_name, gpu.compute_capability = "Orin", (8, 7)
    info = ex.detect_device()
    assert (info.jetpack, info.board, info.gpu_name) == ("R36.4.3", "NVIDIA Jetson AGX Orin Developer Kit", "Orin")
    assert ex.target_key(info, "fp16") == f"trt{gpu.trt.__version__}-sm87-nvidia-jetson-agx-orin-fp16"


def test_missing_tensorrt_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle_dir: Path) -> None:
    with blocked_modules("tensorrt"):
        with pytest.raises(BackendUnavailableError) as info:
            ex.detect_device()
        assert "pip install tensorrt-cu12 'cuda-bindings>=12.8,<13'" in str(info.value)
        with pytest.raises(BackendUnavailableError, match="TensorRT is not importable"):
            ex.build_engines(bundle_dir, "fp16")
        assert not (bundle_dir / "engines").exists()
        release = tmp_path / "nv_tegra_release"
        release.write_text("# R36 (release), REVISION: 4.3\n")
        monkeypatch.setattr(rt_trt, "_TEGRA_RELEASE", release)
        with pytest.raises(BackendUnavailableError) as info:
            ex.detect_device()
        msg = str(info.value)
        assert "JetPack" in msg and "--system-site-packages" in msg and "pip install tensorrt" not in msg
        assert "pip install 'cuda-python==12.6.2.post1'" in msg and "cuda-bindings==13.0.*" in msg


@pytest.mark.parametrize("version", VERSIONS)
def test_missing_cuda_bindings_and_missing_gpu(version: str) -> None:
    with installed_fakes(version, **FLAVOURS[version]), blocked_modules("cuda", "cuda.bindings", "cuda.bindings.runtime"):
        with pytest.raises(BackendUnavailableError, match="cuda-bindings is not importable"):
            ex.detect_device()
    with installed_fakes(version, devices=0, **FLAVOURS[version]):
        with pytest.raises(BackendUnavailableError, match="no CUDA GPU is visible"):
            ex.detect_device()
    with installed_fakes(version, **FLAVOURS[version]):
        with pytest.raises(ConfigError, match="cuda:3 does not exist"):
            ex.detect_device(3)


def test_list_engine_sets_and_read_build(gpu: FakeGpu, bundle_dir: Path) -> None:
    assert ex.list_engine_sets(bundle_dir) == []
    res = ex.build_engines(bundle_dir, "fp16")
    (bundle_dir / "engines" / "broken").mkdir()
    (bundle_dir / "engines" / "broken" / "build.json").write_text("{not json")
    here = ex.detect_device()
    sets = {e["directory"]: e for e in ex.list_engine_sets(bundle_dir, here)}
    assert sets[str(res.directory)]["key"] == res.key and sets[str(res.directory)]["matches"] is True
    assert "error" in sets[str(bundle_dir / "engines" / "broken")]
    other = ex.DeviceInfo("NVIDIA L4", (8, 9), "12.4", "12.4", here.tensorrt_version, None)
    assert [e.get("matches") for e in ex.list_engine_sets(bundle_dir, other) if "key" in e] == [False]
    assert all("matches" not in e for e in ex.list_engine_sets(bundle_dir))
    with pytest.raises(BundleError, match="build.json is missing"):
        ex.read_build(bundle_dir)
    data = json.loads((res.directory / "build.json").read_text())
    (res.directory / "build.json").write_text(json.dumps({**data, "schema": 2}))
    with pytest.raises(BundleError, match="upgrade freedeploy"):
        ex.read_build(res.directory)
