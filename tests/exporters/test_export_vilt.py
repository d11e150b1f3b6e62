"""The parity ladder on a vision-language model (ViLT): the bundle's segment 0 takes the image and
the question, computes the joint token mask and hands it to every later graph."""

from __future__ import annotations

import json

import onnx

from runtimes.preprocess import ImageTextSpec


def test_segment_0_takes_both_inputs_and_emits_the_joint_mask(micro_vqa_bundle) -> None:
    b = micro_vqa_bundle.bundle
    model_inputs = ["input_ids", "attention_mask", "pixel_values"]
    assert [t.name for t in b.inputs] == model_inputs
    assert [t.name for t in b.stages[0].segment.inputs] == model_inputs
    assert [t.name for t in b.stages[0].segment.outputs] == ["hidden_1", "token_mask"]
    text_len = b.inputs[0].shape[1]
    hidden = b.stages[0].segment.outputs[0]
    assert hidden.shape == ("batch", text_len + 1 + 16, 32)  # question tokens, [IMG], 4x4 patches
    for key in b.graph_keys()[1:-1]:  # every later graph reads the joint hidden states and mask
        names = [t.name for t in b.graph(key).inputs]
        assert names[1:] == ["token_mask"] and names[0].startswith("hidden_"), key
    assert [t.name for t in b.full.inputs] == model_inputs
    mask = b.stages[0].segment.outputs[1]
    assert mask.dtype == "int64" and mask.shape == ("batch", hidden.shape[1])
    for key in b.graph_keys():
        onnx.checker.check_model(onnx.load(str(b.path(b.graph(key).files["fp32"]))))


def test_manifest_describes_image_and_question_preprocessing(micro_vqa_bundle) -> None:
    b = micro_vqa_bundle.bundle
    assert isinstance(b.preprocess, ImageTextSpec)
    assert b.preprocess.image.size == (32, 32) and b.preprocess.text.tokenizer_file == "tokenizer.json"
    assert "tokenizer.json" in b.files and b.head.labels == tuple(str(i) for i in range(10)) + ("yes", "no")
    data = json.loads((micro_vqa_bundle.out / "bundle.json").read_text())
    assert data["preprocess"]["kind"] == "image-text" and data["provenance"]["source"]["adapter"] == "vilt"


def test_validation_against_torch(micro_vqa_bundle) -> None:
    v = json.loads((micro_vqa_bundle.out / "validation.json").read_text())
    assert v["max_abs_diff"] <= 1e-4 and not v["failures"]
    assert {r["batch"] for r in v["files"]} == {1, 5}
    assert len({r["file"] for r in v["files"]}) == 6
    assert v["chain_parity"]["equal"] and v["chain_parity"]["n"] >= 50
    assert v["chain_parity"]["mismatches_per_head"] == [0, 0, 0]
