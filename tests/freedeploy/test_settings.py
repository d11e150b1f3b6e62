"""Every setting is written once: the CLI's defaults are the config dataclasses' and its choice lists
are the registries'."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import click
import pytest
from click.testing import CliRunner

from exporters.config import TARGETS, ExportConfig
from freedeploy.cli import cli
from freedeploy.settings import (AUTO, PRETRAINED_FINETUNE, SCRATCH_FINETUNE, TrainConfig, finetune_defaults)
from runtimes.backends import BACKENDS
from runtimes.bundle import HEADS, PRECISIONS
from runtimes.confidence import CONFIDENCE
from tests.test_layout import run_blocked

# TrainConfig fields the train command does not take as an option of the same name, and why
TRAIN_NOT_OPTIONS = {"progress": "--no-progress", "weight_decay": "not exposed", "warmup": "not exposed"}
TRAIN_CLI_COMPUTED = {"out": "the CLI names the run dir after its data and model"}
EXPORT_NOT_OPTIONS = {"validate": "--no-validate", "tolerance": "not exposed"}


def _parsed(name: str, *args: str) -> dict[str, Any]:
    """The values a command would be called with: defaults resolved, callbacks applied."""
    command = cli.commands[name]
    with command.make_context(name, list(args)) as ctx:
        return dict(ctx.params)


def _choices(command: str, option: str) -> tuple[str, ...]:
    param = next(p for p in cli.commands[command].params if p.name == option)
    return tuple(param.type.choices)


def test_train_options_default_to_train_config() -> None:
    params = _parsed("train")
    for f in fields(TrainConfig):
        if f.name in TRAIN_NOT_OPTIONS:
            assert f.name not in params, f"--{f.name.replace('_', '-')} is an option now: check its default"
            continue
        assert f.name in params, f"TrainConfig.{f.name} has no train option: add one or list it in TRAIN_NOT_OPTIONS"
        if f.name in TRAIN_CLI_COMPUTED:
            assert params[f.name] is None
            continue
        assert params[f.name] == f.default, f"train --{f.name.replace('_', '-')}: {params[f.name]!r} != {f.default!r}"
    assert params["no_progress"] is not TrainConfig.progress


def test_export_options_default_to_export_config(tmp_path) -> None:

    params = _parsed("export", str(tmp_path))
    for f in fields(ExportConfig):
        if f.name in EXPORT_NOT_OPTIONS:
            continue
        assert f.name in params, f"ExportConfig.{f.name} has no export option: add one or list it in EXPORT_NOT_OPTIONS"
        assert params[f.name] == f.default, f"export --{f.name.replace('_', '-')}: {params[f.name]!r} != {f.default!r}"
    assert params["no_validate"] is not ExportConfig.validate


def test_build_options_default_to_build_engines(tmp_path) -> None:
    from exporters.tensorrt import build_engines

    signature = inspect.signature(build_engines).parameters
    params = _parsed("build", str(tmp_path))
    assert params["workspace_gb"] == signature["workspace_gb"].default
    assert params["opt_level"] == signature["optimization_level"].default


def test_export_help_shows_the_config_values() -> None:
    out = " ".join(CliRunner().invoke(cli, ["export", "--help"]).output.split())
    for value in (ExportConfig.max_batch, ExportConfig.opset, ExportConfig.calib_samples, ExportConfig.confidence):
        assert f"[default: {value}" in out, out


def test_help_of_the_torch_free_commands_needs_no_torch() -> None:
    proc = run_blocked("""
        import sys
        from freedeploy.cli import cli
        for command in ("build", "export", "train"):
            try:
                cli.main([command, "--help"])
            except SystemExit as exc:
                assert exc.code == 0
        assert "torch" not in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr
    assert f"[default: {ExportConfig.max_batch}" in " ".join(proc.stdout.split())  # read without torch


def test_choice_lists_are_the_registries() -> None:
    from freedeploy.cli.export_cmd import TargetType
    from freedeploy.free import OBJECTIVES as FREE_OBJECTIVES
    from freedeploy.model import EXIT_HEADS as MODEL_EXIT_HEADS
    from freedeploy.settings import OBJECTIVES

    backends = ("auto", *(b for b in BACKENDS if b != "fake"))
    for command in ("run", "bench", "calibrate", "eval"):
        assert _choices(command, "backend") == backends, command
        assert _choices(command, "precision") == PRECISIONS, command
    assert _choices("export", "confidence") == tuple(CONFIDENCE)
    assert FREE_OBJECTIVES is OBJECTIVES and _choices("train", "objective") == OBJECTIVES
    assert MODEL_EXIT_HEADS is HEADS
    for command in ("train", "export"):
        assert _choices(command, "exit_head") == (AUTO, *HEADS), command
    export_target = next(p for p in cli.commands["export"].params if p.name == "target")
    build_target = next(p for p in cli.commands["build"].params if p.name == "target")
    assert isinstance(export_target.type, TargetType) and export_target.type.choices == tuple(TARGETS)
    assert build_target.type.choices == tuple(t for t in TARGETS if t.startswith("trt-"))
    assert all(t in export_target.help for t in TARGETS)


def test_loss_weights_default_to_train_config() -> None:
    from freedeploy.free import LossWeights

    w = LossWeights()
    c = TrainConfig()
    assert (w.kd, w.adv, w.temperature, w.adv_warmup) == (c.kd_weight, c.adv_weight, c.temperature, c.adv_warmup)


@pytest.mark.parametrize("head_is_new, pretrained, recipe, expected", [
    (True, True, {}, PRETRAINED_FINETUNE),
    (True, False, {}, SCRATCH_FINETUNE),
    (True, False, {"finetune_epochs": 40, "finetune_lr": 1e-4}, (40, 1e-4)),
    (False, True, {}, (0, PRETRAINED_FINETUNE[1])),
])
def test_finetune_defaults(head_is_new: bool, pretrained: bool, recipe: dict, expected: tuple) -> None:
    assert finetune_defaults(head_is_new, pretrained, recipe) == expected


def test_train_help_formats_the_stage_1_defaults() -> None:
    param = next(p for p in cli.commands["train"].params if p.name == "finetune_epochs")
    assert isinstance(param, click.Option)
    assert f"{PRETRAINED_FINETUNE[0]} for pretrained" in param.help and f"{SCRATCH_FINETUNE[0]} from scratch" in param.help
