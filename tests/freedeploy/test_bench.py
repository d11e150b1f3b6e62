"""``freedeploy bench`` on the micro bundle: every variant measured, ratios reported, plots written."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from analysis.benchmark import cost_model
from freedeploy.cli import cli


def test_bench_json_and_plots(micro_bundle, micro_run, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["bench", str(micro_bundle.out), "--batch", "1,8", "--runs", "12", "--batch-runs", "5",
                                   "--run", str(micro_run), "--plot", str(tmp_path / "img"), "--json"])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert set(r["batch1_ms"]) == {"full", "early_exit", "no_exit", "never_exits", "torch"}
    assert all(v["runs"] == 12 and v["p50"] <= v["p99"] for v in r["batch1_ms"].values())
    for key in ("measured_speedup_mean", "analytic_speedup", "measured_over_analytic", "no_exit_over_full_median",
                "never_exits_over_full_mean", "expected_speedup", "measured_over_expected"):
        assert r[key] > 0
    t = r["throughput"]["8"]
    assert set(t["samples_per_s"]) == {"full", "no_exit", "never_exits", "torch", "early_exit/per_sample",
                                       "early_exit/batch"}
    assert len(r["sweep"]["points"]) >= 5 and 0 <= r["sweep"]["bundle"]["accuracy"] <= 1
    for p in r["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = CliRunner().invoke(cli, ["bench", str(micro_bundle.out), "--batch", "1", "--runs", "10"])
    assert text.exit_code == 0 and "measured speed-up vs monolithic" in text.stdout


def test_cost_model_weighs_each_path_by_the_exit_histogram() -> None:
    # two exits: segments 2, 3, 5 ms, heads 1 ms each, monolithic 10 ms
    heads = {"segment_ms": [2.0, 3.0, 5.0], "head_ms": [1.0, 1.0], "full_ms": 10.0}
    # paths: first exit (block 1) = 2 + 1; second exit (block 3) = 2 + 3 + 1 + 1; final = 10 + 2 heads
    report = {"heads": heads, "exit_share": {"1": 0.5, "3": 0.25, "final": 0.25}, "measured_speedup_mean": 1.5}
    r = cost_model(report, [0.9, 0.9])
    expected = 10.0 / (0.5 * 3 + 0.25 * 7 + 0.25 * 12)
    assert abs(r["expected_speedup"] - expected) < 1e-12
    assert abs(r["measured_over_expected"] - 1.5 / expected) < 1e-12
    # a switched-off exit costs nothing on the paths that pass it
    off = cost_model(report, [None, 0.9])
    assert abs(off["expected_speedup"] - 10.0 / (0.5 * 2 + 0.25 * 6 + 0.25 * 11)) < 1e-12
