"""The CLI: one-line errors with stable exit codes, and --json output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from freedeploy.cli import cli
from runtimes.errors import ConfigError, DataError, ModelError
from tests.conftest import MICRO_VISION, preset_args


def _run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, args)
    if isinstance(result.exception, SystemExit) or result.exception is None:
        return result.exit_code, result.stdout, result.stderr
    raise result.exception


def test_train_json(tmp_path: Path) -> None:
    code, out, err = _run(["train", "--exits", "1,3", "--finetune-epochs", "1", "--exit-epochs", "1",
                           "--out", str(tmp_path / "r"), "--json", "--no-progress", *preset_args(MICRO_VISION)])
    assert code == 0, err
    data = json.loads(out)
    assert data["out"] == str(tmp_path / "r") and data["config"]["exits"] == [1, 3]
    assert [e["block"] for e in data["metrics"]["test"]["exits"]] == [1, 3]


BAD = [
    (["--model", "no-such-model-xyz"], ModelError.exit_code, "unknown model"),
    (["--exits", "3,1"], ModelError.exit_code, "strictly increasing"),
    (["--exits", "2,40"], ModelError.exit_code, "out of range"),
    (["--exits", "two"], 2, "comma-separated"),
    (["--data", "imagefolder:/nonexistent/dir"], DataError.exit_code, "does not exist"),
    (["--data", "text:{tmp}/nolabel.csv", "--model", "bert-tiny"], DataError.exit_code, "no column 'label'"),
    (["--data", "text:{tmp}/empty.csv", "--model", "bert-tiny"], DataError.exit_code, "empty"),
    (["--data", "cifar"], ConfigError.exit_code, "unknown data spec"),
    (["--objective", "gan"], 2, "gan"),
    (["--preset-config", "hidden_size"], 2, "KEY=VALUE"),
]


@pytest.mark.parametrize("args, code, words", BAD)
def test_bad_arguments_give_one_line_and_a_stable_code(tmp_path: Path, args: list[str], code: int, words: str) -> None:
    (tmp_path / "nolabel.csv").write_text("text,category\nhi,a\nho,b\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    got, out, err = _run(["train", "--out", str(tmp_path / "run"), "--no-progress", *args])
    assert got == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--debug", "train", "--model", "no-such-model-xyz", "--out", str(tmp_path / "r")])
    assert isinstance(result.exception, ModelError)


def test_help_and_version() -> None:
    code, out, _ = _run(["--version"])
    assert code == 0 and "freedeploy" in out
    code, out, _ = _run(["train", "--help"])
    assert code == 0 and "--labelled-fraction" in out
