"""A ViLT checkpoint in a local Hugging Face directory loads through the vilt adapter, with its own
tokenizer and image normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from analysis.data import load_dataset, make_splits
from freedeploy.backbones import load_backbone
from freedeploy.inputs import _train_wordpiece, make_preprocess
from runtimes.preprocess import ImageTextSpec
from tests.conftest import MICRO_VILT


def _checkpoint(path: Path, answers: tuple[str, ...]) -> torch.nn.Module:
    from transformers import ViltConfig, ViltForQuestionAnswering

    torch.manual_seed(0)
    cfg = ViltConfig(vocab_size=128, image_size=32, patch_size=8, num_labels=len(answers),
                     id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)}, **MICRO_VILT)
    hf = ViltForQuestionAnswering(cfg).eval()
    hf.save_pretrained(path)
    _train_wordpiece(["which digit is this?", "is it even?"], vocab_size=128).save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.4, 0.4],
                                                               "image_std": [0.3, 0.3, 0.3]}))
    return hf


def test_local_vilt_directory_loads_with_its_tokenizer(tmp_path: Path) -> None:
    data = load_dataset("vqa-digits?limit=60")
    saved = _checkpoint(tmp_path / "ckpt", data.label_names)
    bb = load_backbone(str(tmp_path / "ckpt"), data.label_names)
    assert bb.adapter.name == "vilt" and bb.pretrained and not bb.head_is_new
    assert bb.tokenizer_dir == str(tmp_path / "ckpt")
    for (n, a), (_, b) in zip(saved.state_dict().items(), bb.hf.state_dict().items()):
        assert torch.equal(a, b), n
    out = tmp_path / "run"
    out.mkdir()
    spec = make_preprocess(bb, data, make_splits(data.labels, groups=data.groups)["train"], out, None)
    assert isinstance(spec, ImageTextSpec) and spec.image.size == (32, 32) and spec.image.mean == (0.4, 0.4, 0.4)
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "ckpt" / "tokenizer.json").read_bytes()
    other = load_backbone(str(tmp_path / "ckpt"), ("yes", "no"))  # other answers: a new classifier
    assert other.head_is_new and other.hf.classifier[-1].out_features == 2
    assert np.isfinite(other.hf.classifier[-1].weight.detach().numpy()).all()
