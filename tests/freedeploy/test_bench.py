"""``freedeploy bench`` on the micro bundle: every variant measured, ratios reported, plots written."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from freedeploy.cli import cli


def test_bench_json_and_plots(micro_bundle, micro_run, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["bench", str(micro_bundle.out), "--batch", "1,8", "--runs", "12", "--batch-runs", "5",
                                   "--run", str(micro_run), "--plot", str(tmp_path / "img"), "--json"])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert set(r["batch1_ms"]) == {"full", "early_exit", "no_exit", "never_exits", "torch"}
    assert all(v["runs"] == 12 and v["p50"] <= v["p99"] for v in r["batch1_ms"].values())
    for key in ("measured_speedup_mean", "analytic_speedup", "measured_over_analytic", "no_exit_over_full_median",
                "never_exits_over_full_mean"):
        assert r[key] > 0
    t = r["throughput"]["8"]
    assert set(t["samples_per_s"]) == {"full", "no_exit", "never_exits", "torch", "early_exit/per_sample",
                                       "early_exit/batch"}
    assert len(r["sweep"]["points"]) >= 5 and 0 <= r["sweep"]["bundle"]["accuracy"] <= 1
    for p in r["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = CliRunner().invoke(cli, ["bench", str(micro_bundle.out), "--batch", "1", "--runs", "10"])
    assert text.exit_code == 0 and "measured speed-up vs monolithic" in text.stdout
