"""Package boundaries: the runtime tier never imports torch, transformers or onnx."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

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


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_every_runtimes_module_imports_without_torch() -> None:
    names = [m.name for m in pkgutil.walk_packages(runtimes.__path__, "runtimes.")]
    proc = _run_blocked(f"""
        import importlib
        for name in {names!r}:
            importlib.import_module(name)
        import runtimes.errors
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_cli_help_works_without_torch() -> None:
    proc = _run_blocked("""
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
    proc = _run_blocked("import torch")
    assert proc.returncode != 0 and "blocked" in proc.stderr
