"""TensorRT for real (GPU-marked): build a tiny exported bundle, chain it, compare with ONNX Runtime.

Runs where ``tensorrt`` and ``cuda-bindings`` import and a GPU is visible (``pytest -m gpu``);
skips with the reason everywhere else. The bundle comes from the real exporter, imported lazily.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from runtimes.bundle import Bundle

pytestmark = pytest.mark.gpu


def _require_tensorrt_and_gpu() -> None:
    """Skip unless TensorRT (10 or later), CUDA bindings that fit the driver and a GPU are all here; the
    device detection says which is missing (cuda-python 12.6 raises where a driver is missing)."""
    from runtimes.backends.tensorrt_device import detect_device
    from runtimes.errors import BackendUnavailableError

    try:
        detect_device()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro ViT (trained one epoch on digits) exported with fp32 and fp16 ONNX, engines built for both."""
    _require_tensorrt_and_gpu()
    try:
        importlib.import_module("exporters.export")
        export_run = importlib.import_module("freedeploy.cli.export_run").export_run
    except ModuleNotFoundError as exc:
        pytest.skip(f"the ONNX exporter is not available yet ({exc}); these tests need a real exported bundle")
    from click.testing import CliRunner

    from exporters.tensorrt import build_engines
    from freedeploy.cli import cli
    from tests.conftest import MICRO_VISION, preset_args

    tmp = tmp_path_factory.mktemp("trt")
    result = CliRunner().invoke(cli, ["train", "--exits", "1,3", "--finetune-epochs", "1", "--exit-epochs", "1",
                                      "--out", str(tmp / "run"), "--no-progress", *preset_args(MICRO_VISION)])
    assert result.exit_code == 0, result.output
    export_run(tmp / "run", tmp / "bundle", target="trt-fp16", max_batch=8, opt_batch=1, validate=False)
    for precision in ("fp32", "fp16"):
        build_engines(tmp / "bundle", precision, workspace_gb=1.0, optimization_level=1)
    return tmp / "bundle"


def _inputs(bundle: Bundle, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = bundle.inputs[0]
    return {spec.name: rng.standard_normal((n, *spec.shape[1:])).astype(np.float32)}


def test_plans_are_raw_and_match_this_device(bundle_dir: Path) -> None:
    import tensorrt as trt

    from exporters.tensorrt import detect_device, list_engine_sets, target_key

    sets = list_engine_sets(bundle_dir, detect_device())
    assert sorted(s["precision"] for s in sets) == ["fp16", "fp32"] and all(s["matches"] for s in sets)
    key = target_key(detect_device(), "fp16")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    plan = (bundle_dir / "engines" / key / "segment_0.plan").read_bytes()
    assert runtime.deserialize_cuda_engine(plan) is not None  # loads as trtexec would: no header of ours


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_tensorrt_chain_matches_onnxruntime(bundle_dir: Path, precision: str, atol: float) -> None:
    from runtimes.backends.onnxruntime import OrtBackend
    from runtimes.backends.tensorrt import TensorRTBackend
    from runtimes.bundle import load_bundle
    from runtimes.chain import record_chain

    bundle = load_bundle(bundle_dir)
    inputs = _inputs(bundle, 8)
    reference = record_chain(OrtBackend(bundle, precision), bundle, inputs)
    backend = TensorRTBackend(bundle, precision, "cuda")
    try:
        got = record_chain(backend, bundle, inputs)
    finally:
        backend.close()
    np.testing.assert_allclose(got.confidences, reference.confidences, atol=atol)
    assert np.mean(got.predictions == reference.predictions) >= 0.95


def test_compaction_and_cuda_graphs_give_the_same_answers(bundle_dir: Path) -> None:
    from runtimes.backends.tensorrt import TensorRTBackend
    from runtimes.bundle import load_bundle
    from runtimes.chain import run_chain

    bundle = load_bundle(bundle_dir)
    inputs = _inputs(bundle, 8, seed=1)
    plain = TensorRTBackend(bundle, "fp32", "cuda")
    graphs = TensorRTBackend(bundle, "fp32", "cuda", cuda_graphs=True)
    try:
        first = np.sort(run_chain(plain, bundle, inputs, [0.0] * len(bundle.exits), "batch").confidences)
        # exit 0 only, at the widest gap in the middle half, so tactic-level differences cannot flip a decision
        lo = len(first) // 4
        j = lo + int(np.argmax(np.diff(first[lo:len(first) - lo + 1])))
        thresholds = [float(first[j] + first[j + 1]) / 2] + [None] * (len(bundle.exits) - 1)
        per_sample = run_chain(plain, bundle, inputs, thresholds, "per_sample")
        whole = run_chain(plain, bundle, inputs, thresholds, "batch")
        assert per_sample.exits.tolist() == whole.exits.tolist()
        assert per_sample.classes.tolist() == whole.classes.tolist()
        for i in range(3):  # batch 1: warm-up + capture, then replays
            for row in range(len(per_sample.exits)):
                one = run_chain(graphs, bundle, {k: v[row:row + 1] for k, v in inputs.items()}, thresholds)
                assert (one.exits[0], one.classes[0]) == (per_sample.exits[row], per_sample.classes[row]), (i, row)
    finally:
        plain.close()
        graphs.close()
