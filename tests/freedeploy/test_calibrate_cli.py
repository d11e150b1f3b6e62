"""``freedeploy calibrate`` / ``eval`` / ``inspect`` / ``run`` on a real exported bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from analysis.data import load_dataset
from freedeploy.cli import cli
from runtimes import Runtime
from runtimes.bundle import load_bundle
from runtimes.errors import CalibrationError, InputError


@pytest.fixture
def bundle_dir(micro_bundle, tmp_path: Path) -> Path:
    return Path(shutil.copytree(micro_bundle.out, tmp_path / "b"))


def _cli(args: list[str]):
    return CliRunner().invoke(cli, args)


def test_calibrate_writes_thresholds_and_certificate(bundle_dir: Path) -> None:
    res = _cli(["calibrate", str(bundle_dir), "--max-disagreement", "0.3", "--epsilon", "0.1", "--json"])
    assert res.exit_code == 0, res.stderr
    cert = json.loads(res.stdout)
    b = load_bundle(bundle_dir)
    assert b.thresholds == tuple(cert["thresholds"]) and all(t is not None for t in b.thresholds)
    stored = b.calibration["onnxruntime-fp32"]
    assert stored.delta == 0.3 and stored.epsilon == 0.1 and stored.n == 80
    assert stored.mode == "label-free" and stored.pvalue <= 0.1 and stored.expected_speedup > 0
    assert Runtime.load(bundle_dir).thresholds == list(cert["thresholds"])
    ev = _cli(["eval", str(bundle_dir), "--json"])
    assert ev.exit_code == 0, ev.stderr
    m = json.loads(ev.stdout)
    assert m["certificate"]["delta"] == 0.3 and 0 <= m["disagreement_with_full"] <= 1 and m["n"] == 80
    assert m["analytic_speedup"] > 0 and sum(m["exit_histogram"].values()) == 80
    text = _cli(["eval", str(bundle_dir)])
    assert "measured here" in text.stdout


def test_uncertifiable_tolerance_leaves_the_bundle_alone(bundle_dir: Path) -> None:
    before = (bundle_dir / "bundle.json").read_bytes()
    res = _cli(["calibrate", str(bundle_dir), "--max-disagreement", "0.001"])
    assert res.exit_code == CalibrationError.exit_code
    assert "tightest this n can certify" in res.stderr and len(res.stderr.strip().splitlines()) == 2  # note + error
    assert (bundle_dir / "bundle.json").read_bytes() == before


def test_inspect_and_run(bundle_dir: Path, tmp_path: Path) -> None:
    res = _cli(["inspect", str(bundle_dir), "--json"])
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert [s["stage"] for s in info["stages"]] == [0, 1, 2] and info["engines"] == []
    assert info["validation"]["chain_parity"] is True
    assert set(info["validation"]["per_file"]) == {
        f"onnx/{n}.onnx" for n in ("segment_0", "segment_1", "segment_2", "exit_0", "exit_1", "full")}
    assert max(info["validation"]["per_file"].values()) == info["validation"]["max_abs_diff"] <= 1e-4
    text = _cli(["inspect", str(bundle_dir)]).stdout
    assert "onnx/exit_1.onnx" in text and "chained predictions equal torch: True" in text
    assert "with probability >= 0.95" in text or "calibration: none" in text
    digits = load_dataset("digits")
    for i in range(3):
        Image.fromarray(digits.items[i]).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    res = _cli(["run", str(bundle_dir), str(tmp_path / "0.png"), str(tmp_path / "broken.png"), str(tmp_path / "1.png"),
                "--thresholds", "0,off", "--json"])
    assert res.exit_code == InputError.exit_code
    rows = json.loads(res.stdout)
    assert [("error" in r) for r in rows] == [False, True, False]
    assert rows[0]["exit_index"] == 0 and rows[0]["label"] in {str(i) for i in range(10)}
    folder = _cli(["run", str(bundle_dir), str(tmp_path), "--thresholds", "off,off"])
    assert folder.stdout.count("final head") == 3 and "broken.png: error" in folder.stderr


def test_select_exits_switches_off_an_exit_that_does_not_pay(bundle_dir: Path, monkeypatch) -> None:
    from runtimes.records import StageCosts

    # the head after block 3 costs far more than the one segment it could save: it cannot pay
    monkeypatch.setattr("calibration.calibrate.measure_costs",
                        lambda *args, **kwargs: StageCosts((1.0, 1.0, 1.0), (0.1, 100.0), 3.0))
    args = ["calibrate", str(bundle_dir), "--max-disagreement", "0.3", "--epsilon", "0.1", "--select-exits"]
    text = _cli(args)
    assert text.exit_code == 0, text.stderr
    assert "exits kept: blocks 1; off: 3" in text.stdout and "thresholds: " in text.stdout and ", off " in text.stdout
    assert "with 56 certification samples" in text.stdout and "with all 80" in text.stdout
    res = _cli(args + ["--json"])
    assert res.exit_code == 0, res.stderr
    cert = json.loads(res.stdout)
    choice = cert["exit_selection"]
    assert (choice["exits_on"], choice["exits_off"]) == ([1], [3])
    assert (choice["n_selection"], choice["n_certification"]) == (24, 56)
    assert cert["n"] == 80 and cert["tightest_tolerance"] > choice["tightest_tolerance_without_split"]
    assert "certification split of 56" in cert["method"] and "seed 0" in cert["method"]
    assert cert["thresholds"][0] is not None and cert["thresholds"][1] is None
    b = load_bundle(bundle_dir)
    assert b.thresholds == tuple(cert["thresholds"])
    assert b.calibration["onnxruntime-fp32"].exit_selection.exits_off == (3,)
    ev = _cli(["eval", str(bundle_dir), "--json"])
    assert ev.exit_code == 0, ev.stderr
    m = json.loads(ev.stdout)
    assert m["thresholds"][1] is None and m["exit_histogram"]["3"] == 0 and sum(m["exit_histogram"].values()) == 80
    assert "(n = 80: 24 chose the exits, 56 certified)" in _cli(["eval", str(bundle_dir)]).stdout


def test_selection_options_need_select_exits(bundle_dir: Path) -> None:
    res = _cli(["calibrate", str(bundle_dir), "--selection-seed", "3"])
    assert res.exit_code == 2 and "apply to --select-exits only" in res.stderr
    res = _cli(["calibrate", str(bundle_dir), "--select-exits", "--latency-budget-ms", "5"])
    assert res.exit_code == 2 and "does not combine" in res.stderr


def test_calibrate_says_when_early_exit_does_not_pay(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtimes.records import StageCosts

    # heads that cost more than the blocks they could save: certified, but slower than the monolithic graph
    monkeypatch.setattr("calibration.calibrate.measure_costs",
                        lambda *args, **kwargs: StageCosts((1.0, 1.0, 1.0), (5.0, 5.0), 3.0))
    res = _cli(["calibrate", str(bundle_dir), "--max-disagreement", "0.3", "--epsilon", "0.1"])
    assert res.exit_code == 0, res.stderr
    assert "expected to be slower than the monolithic graph" in res.stdout
