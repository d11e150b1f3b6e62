"""``--head-weights int8``: exit heads with int8 weights as the extra ONNX Runtime precision
``int8-heads``, validated against fp32, chosen by default on ONNX Runtime and refused by TensorRT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from click.testing import CliRunner

from freedeploy.cli import cli
from freedeploy.cli.export_run import export_run
from runtimes import Runtime
from runtimes.bundle import INT8_HEADS
from tests.conftest import split_arrays
from runtimes.errors import ConfigError
from runtimes.records import ValidationReport, read_json_record


@pytest.fixture(scope="module")
def heads_bundle(micro_run: Path, tmp_path_factory: pytest.TempPathFactory):
    return export_run(micro_run, tmp_path_factory.mktemp("heads") / "b", target="onnx", max_batch=16,
                      head_weights="int8", max_accuracy_drop=1.0)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _weight_bytes(path: Path) -> int:
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)


def test_only_the_exit_heads_get_int8_weights(heads_bundle) -> None:
    b = heads_bundle.bundle
    assert b.precisions == ("fp32", INT8_HEADS)
    for e in b.exits:
        low, high = b.path(e.graph.files[INT8_HEADS]), b.path(e.graph.files["fp32"])
        assert low != high and "MatMulInteger" in _ops(low) and "MatMulInteger" not in _ops(high)
        assert _weight_bytes(low) < 0.6 * _weight_bytes(high)
    for s in b.stages:  # segments and the monolithic graph are the fp32 files themselves
        assert s.segment.files[INT8_HEADS] == s.segment.files["fp32"]
    assert b.full.files[INT8_HEADS] == b.full.files["fp32"]
    for e in b.exits:  # the plan's tensors are unchanged: the contract check passed on load
        assert [t.dtype for t in e.graph.outputs] == ["float32", "float32", "int64"]


def test_validated_against_fp32_per_head(heads_bundle) -> None:
    v = read_json_record(ValidationReport, heads_bundle.out / "validation.json")
    assert v.precision is None and v.head_weights is not None
    r = v.head_weights
    assert r.precision == INT8_HEADS and len(r.exit_decision_agreement) == 2 and len(r.exit_accuracy_change) == 2
    assert r.accuracy_change == 0.0  # the final head is the fp32 graph
    assert min(r.exit_decision_agreement) >= 0.9 and r.max_confidence_diff < 0.2


def test_onnx_runtime_runs_int8_heads_by_default_and_fp32_on_request(heads_bundle, micro_run: Path) -> None:
    x = split_arrays(micro_run)
    default = Runtime.load(heads_bundle.out, backend="onnxruntime")
    fp32 = Runtime.load(heads_bundle.out, backend="onnxruntime", precision="fp32")
    assert default.backend.precision == INT8_HEADS and default.calibration_key == "onnxruntime-int8-heads"
    assert fp32.calibration_key == "onnxruntime-fp32"
    a, b = default.record(x), fp32.record(x)
    assert np.array_equal(a.confidences[:, -1], b.confidences[:, -1])  # the final head: the same fp32 graphs
    diff = np.abs(a.confidences[:, :-1] - b.confidences[:, :-1])
    assert 0 < diff.max() < 0.2  # the exit heads really run other weights, and stay close


def test_tensorrt_refuses_int8_heads_with_a_clear_error(heads_bundle) -> None:
    from exporters.tensorrt import build_engines
    from runtimes.backends.tensorrt import TensorRTBackend

    with pytest.raises(ConfigError, match="ONNX Runtime only"):
        build_engines(heads_bundle.out, INT8_HEADS)
    with pytest.raises(ConfigError, match="ONNX Runtime only"):
        TensorRTBackend(heads_bundle.bundle, INT8_HEADS)


def test_unknown_head_weights_is_a_config_error_before_any_work(micro_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="head weights"):
        export_run(micro_run, tmp_path / "x", head_weights="int4")
    assert not (tmp_path / "x").exists()


def test_cli_reports_and_inspects_the_int8_heads(heads_bundle, micro_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(cli, ["export", str(micro_run), "--head-weights", "int4", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "int4" in bad.output
    res = runner.invoke(cli, ["inspect", str(heads_bundle.out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["precisions"] == ["fp32", INT8_HEADS]
    assert info["validation"]["head_weights"]["precision"] == INT8_HEADS
    text = runner.invoke(cli, ["inspect", str(heads_bundle.out)])
    assert "int8-heads vs fp32" in text.output and "exit heads" in text.output
