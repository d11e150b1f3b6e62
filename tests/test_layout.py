"""Package boundaries: runtimes, calibration, analysis and serving never import torch, transformers or
onnx, and the bundle commands (eval, bench, calibrate) run without them; imports point one way
(docs/layout.md's table), function bodies included, and no two modules import each other."""

from __future__ import annotations

import ast
import json
import pkgutil
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest

import analysis
import calibration
import runtimes
import serving

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


@pytest.mark.parametrize("package", [runtimes, calibration, analysis, serving], ids=lambda p: p.__name__)
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


# -- the direction of imports -------------------------------------------------------------------------------
# docs/layout.md's table. Every import counts, module level and inside function bodies alike; only imports
# under ``if TYPE_CHECKING:`` (type-only) are left out.

PACKAGES = ("runtimes", "calibration", "analysis", "serving", "exporters", "freedeploy")
HEAVY = ("torch", "transformers", "onnx", "onnxscript")
MAY_IMPORT = {  # the other packages of the project each one may import
    "runtimes": (),
    "calibration": ("runtimes",),
    "analysis": ("calibration", "runtimes"),
    "serving": ("runtimes",),
    "exporters": ("analysis", "calibration", "runtimes"),
    "freedeploy": ("exporters", "analysis", "calibration", "runtimes", "serving"),
}
NEVER = {"runtimes": HEAVY, "calibration": HEAVY, "analysis": HEAVY, "serving": HEAVY}  # libraries, by package
ONLY_UNDER = {  # an import only this part of a package may make
    ("runtimes", "onnxruntime"): "runtimes.backends",
    ("runtimes", "tensorrt"): "runtimes.backends",
    ("runtimes", "cuda"): "runtimes.backends",
    ("serving", "pytriton"): "serving.server",
    ("freedeploy", "exporters"): "freedeploy.cli",  # the training package hands its models to the CLI
    ("freedeploy", "serving"): "freedeploy.cli",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    where: str  # file:line
    name: str  # the module named by the import statement
    target: str | None  # the project module it loads; None for a library


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, except those under ``if TYPE_CHECKING:``."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = list(node.orelse)
        todo.extend(children)
    return sorted(found, key=lambda n: n.lineno)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The deepest project module of a dotted name (``a.b.c`` -> ``a.b`` when c is a name in a.b)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def project_imports(root: Path, packages: Sequence[str] = PACKAGES) -> list[Import]:
    """The imports of every module of ``packages`` under ``root``."""
    files = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))
             if "__pycache__" not in p.parts}
    modules, out = set(files), []
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _statements(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importing module's package, up level - 1
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                if base == "__future__":
                    continue
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
            out.extend(Import(module, where, n, _resolve(n, modules)) for n in dict.fromkeys(names))
    return out


def direction_violations(imports: Sequence[Import]) -> list[str]:
    """One line per import that points the wrong way, naming the file and line."""
    bad = []
    for imp in imports:
        package, top = imp.module.split(".")[0], imp.name.split(".")[0]
        if top in PACKAGES and top != package and top not in MAY_IMPORT[package]:
            allowed = ", ".join(MAY_IMPORT[package]) or "no other package"
            bad.append(f"{imp.where}: {package} imports {imp.name} (of the project, {package} may import {allowed})")
        elif top in NEVER.get(package, ()):
            bad.append(f"{imp.where}: {package} imports {imp.name} ({package} never imports "
                       f"{', '.join(NEVER[package])})")
        under = ONLY_UNDER.get((package, top))
        if under is not None and imp.module != under and not imp.module.startswith(under + "."):
            bad.append(f"{imp.where}: {imp.module} imports {imp.name} (only {under} may, in {package})")
    return bad


def import_cycles(imports: Sequence[Import]) -> list[str]:
    """Each cycle between project modules as one block: the modules, then every import that ties them."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target is not None and imp.target != imp.module:
            graph.setdefault(imp.module, set()).add(imp.target)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    cycles, done = [], set()
    for m in sorted(graph):
        if m in done or m not in reachable[m]:
            continue
        ring = {n for n in reachable[m] if m in reachable.get(n, ())}
        done |= ring
        ties = sorted(f"  {i.where}: {i.module} -> {i.target}" for i in imports if i.module in ring
                      and i.target in ring and i.target != i.module)
        cycles.append(f"cycle of {', '.join(sorted(ring))}:\n" + "\n".join(ties))
    return cycles


def test_imports_point_one_way() -> None:
    bad = direction_violations(project_imports(ROOT))
    assert not bad, "imports against the direction of the layers (docs/layout.md):\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    cycles = import_cycles(project_imports(ROOT))
    assert not cycles, "import cycles (function-level imports count too):\n" + "\n".join(cycles)


def test_the_direction_check_sees_function_bodies_and_skips_type_only_imports(tmp_path: Path) -> None:
    files = {
        "runtimes/__init__.py": "",
        "runtimes/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from analysis.b import X\n",
        "runtimes/c.py": "def f():\n    from calibration import d\n",
        "calibration/__init__.py": "",
        "calibration/d.py": "from runtimes import c\n",
        "analysis/__init__.py": "",
        "analysis/b.py": "import numpy\n\ndef g():\n    import onnx\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    imports = project_imports(tmp_path, ("runtimes", "calibration", "analysis"))
    assert sorted(direction_violations(imports)) == [
        "analysis/b.py:4: analysis imports onnx (analysis never imports torch, transformers, onnx, onnxscript)",
        "runtimes/c.py:2: runtimes imports calibration.d (of the project, runtimes may import no other package)"]
    assert import_cycles(imports) == ["cycle of calibration.d, runtimes.c:\n  calibration/d.py:1: calibration.d -> "
                                      "runtimes.c\n  runtimes/c.py:2: runtimes.c -> calibration.d"]
