"""Load means checked: a manifest that disagrees with itself or with its own ONNX files is one
BundleError naming the field or file, through the API and the CLI (exit code 5, one line); and a
digits bundle exported with schema version 1 gives the same predictions and thresholds today."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from freedeploy.cli import cli
from runtimes import Runtime
from runtimes.bundle import load_bundle, save_bundle
from runtimes.errors import BundleError

HERE = Path(__file__).parent
V1_DIGITS = HERE / "v1_digits_bundle"  # exported (trt-fp16 target) and calibrated before schema version 2
EXPECTED = HERE / "v1_digits_expected.npz"  # what that bundle answered then, on 48 real digits


@pytest.fixture(scope="module")
def v2_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version-1 digits bundle, loaded once and saved as version 2."""
    path = Path(shutil.copytree(V1_DIGITS, tmp_path_factory.mktemp("v2") / "digits"))
    save_bundle(load_bundle(path), path)
    return path


@pytest.fixture
def bundle(v2_digits: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(v2_digits, tmp_path / "b"))


def _manifest(path: Path, change) -> None:
    data = json.loads((path / "bundle.json").read_text())
    change(data)
    (path / "bundle.json").write_text(json.dumps(data))


def _tensors(data: dict):
    """Every tensor entry of the manifest."""
    graphs = [s["segment"] for s in data["stages"]] + [s["exit"]["graph"] for s in data["stages"] if s["exit"]]
    for g in [*graphs, data["full"]]:
        yield from g["inputs"]
        yield from g["outputs"]
    yield from data["inputs"]


def _rename_input(data: dict) -> None:
    for t in _tensors(data):
        if t["name"] == "pixel_values":
            t["name"] = "image"
    data["preprocess"]["input_name"] = "image"


def _resize_input(data: dict) -> None:
    for t in _tensors(data):
        if t["name"] == "pixel_values":
            t["shape"] = ["batch", 3, 32, 32]
    data["preprocess"]["size"] = [32, 32]


def _retype_input(data: dict) -> None:
    for t in _tensors(data):
        if t["name"] == "pixel_values":
            t["dtype"] = "float16"


def _swap_files(path: Path, a: str, b: str) -> None:
    """Swap two graph files and 'fix' their checksums: only the file check can notice."""
    pa, pb = path / a, path / b
    da, db = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(db)
    pb.write_bytes(da)
    digest = {a: hashlib.sha256(db).hexdigest(), b: hashlib.sha256(da).hexdigest()}
    _manifest(path, lambda d: d["files"].update(digest))


def _calibration(change):
    return lambda d: change(d["calibration"]["onnxruntime-fp32"])


def _draft(block: int) -> dict:
    return {"draft_block": block, "draft_len": 3, "n": 10, "predicted_ms_per_token": 0.3,
            "monolithic_ms_per_token": 0.5, "acceptance": 0.8, "rule": "measured"}


def _nest(path: Path, depth: int) -> None:
    text = (path / "bundle.json").read_text()
    deep = '{"x": ' * depth + "{}" + "}" * depth
    (path / "bundle.json").write_text(text.replace('"provenance": {', '"provenance": {"deep": ' + deep + ", ", 1))


CASES = {
    # the manifest against its own ONNX files
    "wrong input name": (lambda p: _manifest(p, _rename_input), "the file's inputs are ['pixel_values']"),
    "wrong input shape": (lambda p: _manifest(p, _resize_input), "axis 2 is 16 in the file, 32 in the manifest"),
    "wrong input dtype": (lambda p: _manifest(p, _retype_input), "pixel_values is float32 in the file, float16"),
    "segment file swapped": (lambda p: _swap_files(p, "onnx/segment_1.onnx", "onnx/segment_2.onnx"),
                             "onnx/segment_1.onnx (segment_1, fp32): the file's inputs are ['hidden_3']"),
    "exit files swapped": (lambda p: _swap_files(p, "onnx/fp16/exit_0.onnx", "onnx/fp16/exit_1.onnx"),
                           "onnx/fp16/exit_0.onnx (exit_0, fp16)"),
    # the manifest against itself
    "duplicated exit blocks": (lambda p: _manifest(p, lambda d: d["stages"][1]["exit"].update(block=1)),
                               "stages[1].exit reads block 1, but its segment ends at block 3"),
    "num_blocks below zero": (lambda p: _manifest(p, lambda d: d.update(num_blocks=-1)), "'num_blocks' must be at least 2"),
    "num_blocks past the stages": (lambda p: _manifest(p, lambda d: d.update(num_blocks=9)), "the model has 9 blocks"),
    "labels and class count": (lambda p: _manifest(p, lambda d: d["head"].update(labels=d["head"]["labels"][:5])),
                               "there are 5 labels"),
    "threshold NaN": (lambda p: _manifest(p, lambda d: d["stages"][0]["exit"].update(threshold=float("nan"))),
                      "'threshold' must be a finite number"),
    "threshold negative": (lambda p: _manifest(p, lambda d: d["stages"][0]["exit"].update(threshold=-0.5)),
                           "threshold 0 must be in [0, 1]"),
    "threshold a string": (lambda p: _manifest(p, lambda d: d["stages"][0]["exit"].update(threshold="0.5")),
                           "'threshold' must be a number or null"),
    "certificate thresholds NaN": (lambda p: _manifest(p, _calibration(lambda c: c.update(thresholds=[0.5, float("nan")]))),
                                   "'thresholds[1]' must be a finite number"),
    "certificate threshold negative": (lambda p: _manifest(p, _calibration(lambda c: c.update(thresholds=[-1, 0.5]))),
                                       "threshold 0 must be in [0, 1]"),
    "certificate threshold a string": (lambda p: _manifest(p, _calibration(lambda c: c.update(thresholds=["a", 0.5]))),
                                       "'thresholds[0]' must be a number or null"),
    "certificate wrong count": (lambda p: _manifest(p, _calibration(lambda c: c.update(thresholds=[0.5]))),
                                "has 1 thresholds for 2 exits"),
    "speculative draft not an exit": (lambda p: _manifest(p, _calibration(lambda c: c.update(speculative=_draft(99)))),
                                      "drafts from block 99, which has no exit"),
    "speculative on a classifier": (lambda p: _manifest(p, _calibration(lambda c: c.update(speculative=_draft(1)))),
                                    "applies to generative bundles only"),
    "certificate under another key": (lambda p: _manifest(p, _calibration(lambda c: c.update(key="tensorrt-fp16"))),
                                      "holds a certificate for 'tensorrt-fp16'"),
    "role changed": (lambda p: _manifest(p, lambda d: d["stages"][0]["segment"]["outputs"][0].update(role="final_logits")),
                     "declared with two different dtypes, shapes or roles"),
    "unknown role": (lambda p: _manifest(p, lambda d: d["full"]["outputs"][0].update(role="answer")), "'role' must be one of"),
    "graph kind": (lambda p: _manifest(p, lambda d: d["full"].update(kind="exit")), "full must be a graph of kind 'full', found 'exit'"),
    "graph keys twice": (lambda p: _manifest(p, lambda d: d["stages"][1]["segment"].update(key="segment_0")),
                         "graph keys must be unique"),
    "unknown field": (lambda p: _manifest(p, lambda d: d.update(thresholds=[0.5])), "unknown field(s) 'thresholds'"),
    "preprocess std zero": (lambda p: _manifest(p, lambda d: d["preprocess"].update(std=[0.5, 0.0, 0.5])),
                            "positive finite stds"),
    "precisions differ": (lambda p: _manifest(p, lambda d: d["full"]["files"].pop("fp16")), "the same precisions"),
    # adversarial JSON
    "deep nesting": (lambda p: _nest(p, 100_000), "nested too deeply"),
    "enormous integer": (lambda p: (p / "bundle.json").write_text(
        (p / "bundle.json").read_text().replace('"max": 16', '"max": 1' + "0" * 400)), "too large to be meant"),
    "enormous float": (lambda p: (p / "bundle.json").write_text(
        (p / "bundle.json").read_text().replace('"threshold": 0.58', '"threshold": 1e999', 1)), "must be a finite number"),
    "top level not an object": (lambda p: (p / "bundle.json").write_text("[1, 2]"), "expected an object"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_inconsistent_manifest_is_one_bundle_error(bundle: Path, case: str) -> None:
    damage, words = CASES[case]
    damage(bundle)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    message = str(info.value)
    assert words in message and "\n" not in message, message
    for command in (["inspect", str(bundle)], ["run", str(bundle), "x.png"]):
        res = CliRunner().invoke(cli, command)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == BundleError.exit_code == 5, res.output
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]


def test_the_intact_bundle_loads(bundle: Path) -> None:
    b = load_bundle(bundle)
    assert b.loaded_version == 3 and b.precisions == ("fp32", "fp16")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_v1_digits_bundle_gives_the_same_answers(precision: str) -> None:
    want = np.load(EXPECTED)
    rt = Runtime.load(V1_DIGITS, backend="onnxruntime", precision=precision)
    assert rt.bundle.loaded_version == 1
    assert rt.thresholds == want[f"{precision}_thresholds"].tolist()
    x = {"pixel_values": want["pixel_values"]}
    res = rt.infer(x)
    assert np.array_equal(res.classes, want[f"{precision}_classes"])
    assert np.array_equal(res.exits, want[f"{precision}_exits"])
    # ONNX Runtime picks its kernels by CPU (AVX2, AVX-512, ...): a confidence's last bits may move between
    # machines, the decisions may not
    np.testing.assert_allclose(res.confidences, want[f"{precision}_confidences"], rtol=0, atol=2e-6)
    rec = rt.record(x)
    assert np.array_equal(rec.predictions, want[f"{precision}_record_pred"])
    np.testing.assert_allclose(rec.confidences, want[f"{precision}_record_conf"], rtol=0, atol=2e-6)
    assert (res.exits < 2).mean() > 0.5  # the exits fire: the comparison covers early answers


def test_inspect_shows_the_file_version() -> None:
    res = CliRunner().invoke(cli, ["inspect", str(V1_DIGITS)])
    assert res.exit_code == 0 and "schema 1, read as 3" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(V1_DIGITS), "--json"])
    info = json.loads(res.output)
    assert info["schema_version"] == 3 and info["file_schema_version"] == 1
