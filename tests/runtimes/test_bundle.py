"""The bundle contract: golden manifests keep loading (versions 1 and 2 through the migration, version 3
as written), round trips are lossless, and damaged bundles fail with BundleError."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from runtimes.bundle import SCHEMA_VERSION, ClassifierHead, load_bundle, save_bundle
from runtimes.errors import BundleError
from runtimes.preprocess import ImageSpec
from runtimes.records import Certificate

HERE = Path(__file__).parent
GOLDEN = HERE / "golden_bundle"  # schema version 1, as written before the plan became data
GOLDEN_V2 = HERE / "golden_bundle_v2"  # task, labels at the top level
GOLDEN_V3 = HERE / "golden_bundle_v3"  # the head as a tagged union


@pytest.fixture(params=[GOLDEN, GOLDEN_V2, GOLDEN_V3], ids=["v1", "v2", "v3"])
def bundle_dir(request, tmp_path: Path) -> Path:
    return Path(shutil.copytree(request.param, tmp_path / "b"))


@pytest.mark.parametrize("golden, version", [(GOLDEN, 1), (GOLDEN_V2, 2), (GOLDEN_V3, 3)])
def test_golden_bundles_keep_loading(golden: Path, version: int) -> None:
    b = load_bundle(golden)
    assert b.schema_version == SCHEMA_VERSION == 3 and b.loaded_version == version
    assert isinstance(b.head, ClassifierHead) and b.task == "classify"
    assert b.name == "golden" and len(b.head.labels) == 10 and b.num_blocks == 8
    assert isinstance(b.preprocess, ImageSpec) and b.preprocess.size == (32, 32)
    assert [s.blocks for s in b.stages] == [(0, 2), (2, 8)]
    assert b.exits[0].block == 2 and b.thresholds == (0.9,) and b.exits[0].confidence == "max_softmax"
    assert b.graph_keys() == ["segment_0", "exit_0", "segment_1", "full"]
    assert b.graph("exit_0").outputs[1].name == "confidence_0"
    assert b.batch.max == 64 and b.precisions == ("fp32",)
    # the plan is data: kinds and roles, read from the file (version 1: written by the migration)
    assert [g.kind for g in b.graphs] == ["segment", "exit", "segment", "full"]
    assert [t.role for t in b.graph("exit_0").outputs] == ["exit_logits", "exit_confidence", "exit_prediction"]
    assert [t.role for t in b.stages[0].segment.outputs] == ["hidden"] and b.inputs[0].role == "model_input"
    assert b.exits[0].decision == ("confidence_0", "prediction_0") and b.final_decision == ("confidence", "prediction")


def test_migration_writes_what_version_3_holds() -> None:
    assert load_bundle(GOLDEN) == load_bundle(GOLDEN_V2) == load_bundle(GOLDEN_V3)


def test_round_trip_is_lossless(bundle_dir: Path) -> None:
    first = load_bundle(bundle_dir)
    save_bundle(first, bundle_dir)
    saved = json.loads((bundle_dir / "bundle.json").read_text())
    assert load_bundle(bundle_dir) == first
    assert saved == json.loads((GOLDEN_V3 / "bundle.json").read_text())  # saved as v3, nothing else changes


def _certificate(thresholds: tuple) -> Certificate:
    return Certificate(key="onnxruntime-fp32", thresholds=thresholds, n=100, epsilon=0.05, mode="label-free",
                       method="test", delta=0.01)


def test_thresholds_update(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir).with_thresholds((0.75,), {"onnxruntime-fp32": _certificate((0.75,))})
    save_bundle(b, bundle_dir)
    again = load_bundle(bundle_dir)
    assert again.thresholds == (0.75,) and again.calibration == {"onnxruntime-fp32": _certificate((0.75,))}
    with pytest.raises(BundleError, match="thresholds"):
        b.with_thresholds((0.5, 0.6), None)
    with pytest.raises(BundleError, match=r"in \[0, 1\]"):
        b.with_thresholds((1.5,), None)


def _edit(bundle_dir: Path, change) -> None:
    data = json.loads((bundle_dir / "bundle.json").read_text())
    change(data)
    (bundle_dir / "bundle.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(schema_version=4), "upgrade freedeploy"),
    (lambda d: d.pop("stages"), "'stages' is missing"),
    (lambda d: d.update(num_blocks="8"), "'num_blocks' must be an integer"),
    (lambda d: d["stages"][0]["exit"].update(threshold="high"), "'threshold' must be"),
    (lambda d: d["batch"].update(min=5, opt=2), "batch sizes"),
    (lambda d: d["full"]["inputs"][0].update(dtype="complex64"), "dtype"),
    (lambda d: d["files"].update({"../outside.onnx": "0" * 64}), "leaves the bundle"),
    (lambda d: d["files"].update({"/etc/passwd": "0" * 64}), "must be relative"),
    (lambda d: d["stages"][0]["segment"]["files"].update(fp32="onnx/unlisted.onnx"), "no checksum"),
    (lambda d: d.update(labels=[]), "labels"),
    (lambda d: d["preprocess"].update(kind="audio"), "preprocess"),
])
def test_bad_manifests(bundle_dir: Path, change, words: str) -> None:
    _edit(bundle_dir, change)
    with pytest.raises(BundleError, match=words):
        load_bundle(bundle_dir)


def test_checksum_missing_file_and_symlink(bundle_dir: Path, tmp_path: Path) -> None:
    (bundle_dir / "onnx" / "exit_0.onnx").write_text("tampered")
    with pytest.raises(BundleError, match="checksum mismatch for onnx/exit_0.onnx"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="not a valid ONNX model"):  # the file check still reads its inputs
        load_bundle(bundle_dir, verify=False)
    (bundle_dir / "onnx" / "exit_0.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle_dir)
    outside = tmp_path / "secret.onnx"
    outside.write_text("x")
    os.symlink(outside, bundle_dir / "onnx" / "exit_0.onnx")
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle_dir)


def test_malformed_json_and_missing_manifest(tmp_path: Path, bundle_dir: Path) -> None:
    (bundle_dir / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path)
