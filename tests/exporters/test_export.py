"""The parity ladder on the CPU: torch segments == torch model (exact, see test_model), torch ~
ONNX Runtime per file and chained; fp16 / int8 transforms checked with ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from freedeploy.cli.export_run import export_run
from runtimes.bundle import load_bundle
from runtimes.errors import ConfigError
from tests.conftest import split_arrays


@pytest.fixture(scope="module")
def vision_run(micro_run) -> Path:
    return micro_run


@pytest.fixture(scope="module")
def onnx_bundle(micro_bundle):
    return micro_bundle


def test_bundle_layout_and_manifest(onnx_bundle) -> None:
    b = onnx_bundle.bundle
    assert [s.blocks for s in b.stages] == [(0, 1), (1, 3), (3, 4)]
    assert [e.block for e in b.exits] == [1, 3] and b.thresholds == (None, None)
    assert b.graph_keys() == ["segment_0", "exit_0", "segment_1", "exit_1", "segment_2", "full"]
    assert [t.name for t in b.stages[0].segment.outputs] == ["hidden_1"]
    assert [t.name for t in b.stages[1].segment.inputs] == ["hidden_1"]
    assert [t.name for t in b.exits[0].graph.outputs] == ["logits_0", "confidence_0", "prediction_0"]
    assert b.inputs[0].shape == ("batch", 3, 16, 16) and b.batch.max == 16
    root = onnx_bundle.out
    assert set(b.files) == {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"bundle.json"}
    for key in b.graph_keys():  # a dynamic batch axis in every graph
        model = onnx.load(str(root / b.graph(key).files["fp32"]))
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert not list(root.parent.glob(".*partial"))


def test_validation_report(onnx_bundle) -> None:
    v = json.loads((onnx_bundle.out / "validation.json").read_text())
    assert v["max_abs_diff"] <= 1e-4 and not v["failures"]
    assert {r["batch"] for r in v["files"]} == {1, 5}  # export traced at batch 2
    assert len({r["file"] for r in v["files"]}) == 6
    assert v["chain_parity"]["equal"] and v["chain_parity"]["n"] == 80


def test_fp16_keeps_io_and_confidence_in_fp32(vision_run: Path, tmp_path: Path) -> None:
    res = export_run(vision_run, tmp_path / "b16", target="trt-fp16", max_batch=16)
    b = res.bundle
    assert b.precisions == ("fp32", "fp16")
    model = onnx.load(str(b.path(b.exits[0].graph.files["fp16"])))
    types = {o.name: o.type.tensor_type.elem_type for o in [*model.graph.input, *model.graph.output]}
    assert types == {"hidden_1": 1, "logits_0": 1, "confidence_0": 1, "prediction_0": 7}
    ops16 = {n.op_type for n in model.graph.node}
    assert "Cast" in ops16  # mixed precision, with fp32 islands
    r = res.validation.precision
    assert min(r.exit_decision_agreement) >= 0.99 and abs(r.accuracy_change) <= 0.02


def test_int8_is_explicit_qdq(vision_run: Path, tmp_path: Path) -> None:
    res = export_run(vision_run, tmp_path / "b8", target="trt-int8", max_batch=16, calib_samples=64,
                     max_accuracy_drop=1.0)
    b = res.bundle
    model = onnx.load(str(b.path(b.stages[0].segment.files["int8"])))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    r = res.validation.precision
    assert r.precision == "int8" and len(r.exit_decision_agreement) == 2
    assert 0.0 <= r.final_accuracy <= 1.0


def test_text_bundle_feeds_the_mask_to_every_graph(micro_text_bundle) -> None:
    res = micro_text_bundle
    b = res.bundle
    for key in b.graph_keys():
        assert "attention_mask" in [t.name for t in b.graph(key).inputs]
    assert (res.out / "tokenizer.json").is_file() and "tokenizer.json" in b.files
    assert res.validation.chain_parity.equal and res.validation.max_abs_diff <= 1e-4
    assert b.exits[0].head == "cls-query"


def test_existing_bundle_is_kept(vision_run: Path, onnx_bundle) -> None:
    before = (onnx_bundle.out / "bundle.json").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        export_run(vision_run, onnx_bundle.out, target="onnx")
    assert (onnx_bundle.out / "bundle.json").read_bytes() == before
    load_bundle(onnx_bundle.out)


def test_cls_query_and_full_block_bundles_agree(vision_run: Path, onnx_bundle, tmp_path: Path, test_inputs) -> None:
    from runtimes import Runtime

    cheap = onnx_bundle.bundle
    assert all(e.head == "cls-query" and e.cost < 0.3 for e in cheap.exits)
    full = export_run(vision_run, tmp_path / "full", target="onnx", max_batch=16, exit_head="full-block").bundle
    assert all(e.head == "full-block" and e.cost == 1.0 for e in full.exits)
    a = Runtime.load(onnx_bundle.out).record(test_inputs)
    b = Runtime.load(tmp_path / "full").record(test_inputs)
    assert np.abs(a.confidences - b.confidences).max() <= 1e-5
    assert np.array_equal(a.predictions, b.predictions)
    nodes = [len(onnx.load(str(root / bnd.exits[0].graph.files["fp32"])).graph.node)
             for root, bnd in ((onnx_bundle.out, cheap), (tmp_path / "full", full))]
    assert nodes[0] > 0 and nodes[1] > 0


@pytest.fixture(scope="module")
def test_inputs(vision_run: Path) -> dict:
    return split_arrays(vision_run)
