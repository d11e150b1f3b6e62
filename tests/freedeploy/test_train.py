"""End-to-end training on micro models: run dir contents, reload, reproducibility, objectives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.data import load_dataset
from freedeploy.inputs import Encoder
from freedeploy.rundir import load_run
from freedeploy.train import TrainConfig, default_exits, predict, train
from runtimes.errors import ConfigError, ModelError
from tests.conftest import MICRO_TEXT, MICRO_VISION


def _cfg(tmp: Path, name: str, **kw) -> TrainConfig:
    base = dict(model="vit-tiny", data="digits", out=str(tmp / name), exits=(1, 2, 3), finetune_epochs=10, finetune_lr=3e-3,
                exit_epochs=1, preset_config=tuple(MICRO_VISION.items()), progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("train")
    return train(_cfg(tmp, "run", labelled_fraction=0.5))


def test_run_dir_contents(vision_run) -> None:
    out = vision_run.out
    assert sorted(p.name for p in out.iterdir()) == ["freedeploy.json", "metrics.json", "model.safetensors", "splits.json"]
    manifest = json.loads((out / "freedeploy.json").read_text())
    assert manifest["exits"] == [1, 2, 3] and manifest["adapter"] == "vit"
    assert manifest["preprocess"]["kind"] == "image" and manifest["preprocess"]["size"] == [16, 16]
    assert manifest["train_config"]["augment"] == "shift" and manifest["train_config"]["finetune_lr"] == 3e-3
    assert manifest["data"]["split_sizes"]["test"] == 359 and manifest["data"]["labelled"] < 600
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["block"] for e in metrics["test"]["exits"]] == [1, 2, 3]
    for key in ("final_accuracy", "overthinking_rate"):
        assert 0.0 <= metrics["test"][key] <= 1.0
    assert metrics["test"]["final_accuracy"] > 0.2  # a few epochs of a micro model: well above chance (0.1)
    assert not list(out.parent.glob(".*partial"))
    assert b"pickle" not in (out / "model.safetensors").read_bytes()[:64]


def test_reloaded_run_predicts_what_training_measured(vision_run) -> None:
    model, info = load_run(vision_run.out)
    splits = info.splits()
    data = load_dataset(info.data["spec"])
    exit_preds, final = predict(model, Encoder(data, info.preprocess, info.path), np.array(splits["test"]),
                                torch.device("cpu"))
    labels = data.labels[splits["test"]]
    assert float((final == labels).mean()) == vision_run.metrics["test"]["final_accuracy"]
    assert float((exit_preds[0] == labels).mean()) == vision_run.metrics["test"]["exits"][0]["accuracy"]


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = train(_cfg(tmp_path, "a", objective="free", exit_epochs=1))
    b = train(_cfg(tmp_path, "b", objective="free", exit_epochs=1))
    assert (a.out / "model.safetensors").read_bytes() == (b.out / "model.safetensors").read_bytes()
    c = train(_cfg(tmp_path, "c", objective="free", exit_epochs=1, seed=1))
    assert (a.out / "model.safetensors").read_bytes() != (c.out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("objective", ["ce", "ce+kd"])
def test_ablation_objectives_train_from_an_earlier_run(vision_run, tmp_path: Path, objective: str) -> None:
    res = train(_cfg(tmp_path, objective, model=str(vision_run.out), preset_config=(), finetune_epochs=None,
                     finetune_lr=None,
                     objective=objective, labelled_fraction=0.1))
    assert res.resolved["finetune_epochs"] == 0  # the run's classifier is trained already
    before, _ = load_run(vision_run.out)
    after, _ = load_run(res.out)
    for (n, p), (_, q) in zip(before.hf.named_parameters(), after.hf.named_parameters()):
        assert torch.equal(p, q), f"backbone parameter {n} changed while training exits"


def test_text_model_with_its_own_tokenizer(tweets_csv: str, tmp_path: Path) -> None:
    res = train(_cfg(tmp_path, "text", model="bert-tiny", data=f"text:{tweets_csv}", exits=(2,),
                     preset_config=tuple(MICRO_TEXT.items())))
    assert (res.out / "tokenizer.json").is_file()
    manifest = json.loads((res.out / "freedeploy.json").read_text())
    spec = manifest["preprocess"]
    assert spec["kind"] == "text" and 8 <= spec["max_length"] <= 512 and spec["max_length"] % 8 == 0
    assert manifest["train_config"]["augment"] == "none"
    model, _ = load_run(res.out)
    assert model.adapter.name == "bert"


def test_default_exits_are_quarter_points() -> None:
    assert default_exits(8) == (2, 4, 6)
    assert default_exits(12) == (3, 6, 9)
    assert default_exits(2) == (1,)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="out of range"):
        train(_cfg(tmp_path, "x", exits=(2, 9)))
    with pytest.raises(ConfigError, match="text models only"):
        train(_cfg(tmp_path, "x", max_length=16))
    with pytest.raises(ConfigError, match="takes image inputs"):
        train(_cfg(tmp_path, "x", data="tweets"))
    assert not (tmp_path / "x").exists()


def test_existing_run_dir_is_kept(vision_run) -> None:
    before = (vision_run.out / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        train(_cfg(vision_run.out.parent, vision_run.out.name))
    assert (vision_run.out / "model.safetensors").read_bytes() == before


def _train_cmd(out: Path, *extra: str) -> list[str]:
    import sys

    from tests.conftest import preset_args

    return [sys.executable, "-m", "freedeploy", "train", "--data", "digits?limit=600", "--exits", "1,3",
            "--finetune-epochs", "6", "--exit-epochs", "3", "--lr", "3e-3", "--out", str(out), "--no-progress",
            "--device", "cpu", *preset_args(MICRO_VISION), *extra]


def test_killed_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).parents[2]
    subprocess.run(_train_cmd(tmp_path / "whole"), check=True, env=env, cwd=root, capture_output=True)
    proc = subprocess.Popen(_train_cmd(tmp_path / "cut"), env=env, cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "cut.checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (tmp_path / "cut").exists(), "the kill should land mid-training"
    with pytest.raises(subprocess.CalledProcessError):  # a fresh start must not silently discard it
        subprocess.run(_train_cmd(tmp_path / "cut"), check=True, env=env, cwd=root, capture_output=True)
    subprocess.run(_train_cmd(tmp_path / "cut", "--resume"), check=True, env=env, cwd=root, capture_output=True)
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (tmp_path / "cut.checkpoint").exists()


def test_presets_resolve_their_own_stage_1_recipe() -> None:
    from freedeploy.backbones import load_backbone
    from freedeploy.train import _resolve

    labels = tuple("0123456789")
    vilt = _resolve(TrainConfig(model="vilt-tiny", data="vqa-digits", out="unused"), load_backbone("vilt-tiny", labels))
    vit = _resolve(TrainConfig(model="vit-tiny", data="digits", out="unused"), load_backbone("vit-tiny", labels))
    assert (vilt.finetune_epochs, vilt.finetune_lr) == (40, 1e-4)
    assert (vit.finetune_epochs, vit.finetune_lr) == (60, 5e-4)
    mine = _resolve(TrainConfig(model="vilt-tiny", data="vqa-digits", out="unused", finetune_epochs=5, finetune_lr=3e-4),
                    load_backbone("vilt-tiny", labels))
    assert (mine.finetune_epochs, mine.finetune_lr) == (5, 3e-4)
