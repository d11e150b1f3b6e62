"""Package boundaries: runtimes, calibration and analysis never import torch, transformers or onnx,
and the bundle commands (eval, bench, calibrate) run without them."""

from __future__ import annotations

import json
import pkgutil
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import analysis
import calibration
import runtimes

ROOT = Path(__file__).parents[1]

BLOCKER = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "onnx", "onnxscript"}:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing torch, transformers or onnx fails."""
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("package", [runtimes, calibration, analysis], ids=lambda p: p.__name__)
def test_every_module_of_the_torch_free_tiers_imports_without_torch(package) -> None:
    names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    assert names
    proc = run_blocked(f"""
        import importlib
        for name in {names!r}:
            importlib.import_module(name)
        assert "torch" not in sys.modules
        assert not {{m.split(".")[0] for m in sys.modules}} & {{"freedeploy", "exporters"}}
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_cli_help_works_without_torch() -> None:
    proc = run_blocked("""
        import sys
        from freedeploy.cli import cli
        try:
            cli.main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0
        assert "torch" not in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout


def test_blocker_really_blocks() -> None:
    proc = run_blocked("import torch")
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_eval_bench_and_calibrate_run_without_torch(micro_bundle, micro_run, tmp_path: Path) -> None:
    bundle = str(shutil.copytree(micro_bundle.out, tmp_path / "b"))  # calibrate writes into the bundle
    commands = {
        "calibrate": ["calibrate", bundle, "--split", "val", "--max-disagreement", "0.3", "--epsilon", "0.1", "--json"],
        "eval": ["eval", bundle, "--split", "test", "--json"],
        "bench": ["bench", bundle, "--batch", "1", "--runs", "10", "--run", str(micro_run), "--json"],
    }
    proc = run_blocked(f"""
        import contextlib, io, json
        from freedeploy.cli import cli
        out = {{}}
        for name, args in {commands!r}.items():
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    cli.main(args)
                except SystemExit as exc:
                    assert exc.code in (0, None), (name, exc.code)
            out[name] = json.loads(buf.getvalue())
        assert "torch" not in sys.modules
        print(json.dumps(out))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert all(t is not None for t in out["calibrate"]["thresholds"])
    assert out["eval"]["n"] > 0 and sum(out["eval"]["exit_histogram"].values()) == out["eval"]["n"]
    assert "torch" not in out["bench"]["batch1_ms"] and out["bench"]["skipped"] == {"torch": "torch is not installed"}
    assert "eager torch variant is skipped" in proc.stderr
