"""Never destroy what the user owns; files come out with the user's umask; nothing is left
behind by a killed or terminated command; concurrent writers of one bundle lose nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from calibration.calibrate import write_calibration
from freedeploy.cli import cli
from runtimes.atomic import LOCK_FILE, Replaceable, atomic_directory, atomic_write_text, file_mode
from runtimes.bundle import load_bundle
from runtimes.errors import ConfigError
from runtimes.records import Certificate

ROOT = Path(__file__).parents[1]
V1_DIGITS = ROOT / "tests" / "runtimes" / "v1_digits_bundle"


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(args: list[str], words: str) -> None:
    res = CliRunner().invoke(cli, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == ConfigError.exit_code, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


# -- 1. --overwrite replaces only what freedeploy made; outputs never overlap inputs ---------------------------

def test_export_overwrite_refuses_a_folder_of_other_files(micro_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(os.urandom(2000))
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("keep me")
    before = _snapshot(folder)
    _refused(["export", str(micro_run), "--out", str(folder), "--overwrite"], "refusing to replace")
    assert _snapshot(folder) == before


@pytest.mark.parametrize("where, words", [("same", "is the input"), ("inside", "lies inside the input"),
                                          ("parent", "contains the input")])
def test_export_refuses_an_output_overlapping_the_run(micro_run: Path, tmp_path: Path, where: str,
                                                      words: str) -> None:
    run = Path(shutil.copytree(micro_run, tmp_path / "work" / "run"))
    out = {"same": run, "inside": run / "bundle", "parent": run.parent}[where]
    before = _snapshot(run)
    _refused(["export", str(run), "--out", str(out), "--overwrite"], words)
    assert _snapshot(run) == before  # model.safetensors and all, byte for byte


def test_export_refuses_outputs_in_the_way_of_files(micro_run: Path, tmp_path: Path) -> None:
    file = tmp_path / "a-file"
    file.write_text("mine")
    _refused(["export", str(micro_run), "--out", str(file), "--overwrite"], "is a file")
    _refused(["export", str(micro_run), "--out", str(file / "bundle")], "is a file, not a directory")
    assert file.read_text() == "mine"


def test_train_overwrite_refuses_what_is_not_a_run(micro_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    before = _snapshot(folder)
    _refused(["train", "--data", "digits?limit=50", "--out", str(folder), "--overwrite"], "refusing to replace")
    assert _snapshot(folder) == before
    run = Path(shutil.copytree(micro_run, tmp_path / "run"))
    before = _snapshot(run)
    _refused(["train", "--model", str(run), "--data", "digits?limit=50", "--out", str(run), "--overwrite"],
             "is the input")
    assert _snapshot(run) == before


def test_a_checkpoint_folder_that_is_not_ours_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "run"
    stranger = tmp_path / "run.checkpoint"
    stranger.mkdir()
    (stranger / "data.bin").write_bytes(b"\x01\x02")
    _refused(["train", "--data", "digits?limit=60", "--out", str(out), "--overwrite", "--finetune-epochs", "1",
              "--exit-epochs", "1", "--preset-config", "num_hidden_layers=2", "--exits", "1"], "refusing to remove")
    assert (stranger / "data.bin").read_bytes() == b"\x01\x02"


def test_atomic_directory_replaces_only_its_kind(tmp_path: Path) -> None:
    kind = Replaceable("a thing of ours", "ours.json")
    target = tmp_path / "t"
    with atomic_directory(target, kind=kind) as tmp:
        (tmp / "ours.json").write_text("{}")
    with atomic_directory(target, overwrite=True, kind=kind) as tmp:  # ours: replaced
        (tmp / "ours.json").write_text('{"v": 2}')
    assert (target / "ours.json").read_text() == '{"v": 2}'
    (target / "ours.json").unlink()
    with pytest.raises(ConfigError, match="refusing to replace"):
        with atomic_directory(target, overwrite=True, kind=kind):
            pass


# -- 3. the user's umask, kept modes -------------------------------------------------------------------------

def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "file").write_text("x")
        atomic_write_text(tmp_path / "out" / "manifest.json", "{}")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
        assert (tmp_path / "out" / "manifest.json").stat().st_mode & 0o777 == 0o640
        os.chmod(tmp_path / "out" / "manifest.json", 0o604)  # a mode the user chose is kept on rewrite
        atomic_write_text(tmp_path / "out" / "manifest.json", '{"v": 2}')
        assert (tmp_path / "out" / "manifest.json").stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)


def test_exported_bundle_and_calibration_are_readable_by_others(micro_bundle, tmp_path: Path) -> None:
    root = Path(micro_bundle.out)
    mask = 0o777 & ~file_mode(directory=True)
    assert root.stat().st_mode & 0o777 == 0o777 & ~mask
    for p in root.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, p
    copy = Path(shutil.copytree(V1_DIGITS, tmp_path / "b"))
    os.chmod(copy / "bundle.json", 0o644)
    write_calibration(copy, _certificate("onnxruntime-fp32"))
    assert (copy / "bundle.json").stat().st_mode & 0o777 == 0o644


# -- 4. nothing left behind ---------------------------------------------------------------------------------

def _signal_when(cmd: list[str], marker: str, sig: int, timeout: float = 300) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "freedeploy", *cmd], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline, seen = time.monotonic() + timeout, []
    for line in proc.stderr:
        seen.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    proc.send_signal(sig)
    rest = proc.stderr.read()
    return proc.wait(), "".join(seen) + rest


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_killed_and_terminated_exports_leave_nothing(micro_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    code, _ = _signal_when(["export", str(micro_run), "--out", str(out)], "exporting exit_1", signal.SIGKILL)
    assert code == -signal.SIGKILL and not out.exists()
    assert any(name.endswith(".partial") for name in _leftovers(tmp_path))  # what SIGKILL cannot clean
    code, err = _signal_when(["export", str(micro_run), "--out", str(out)], "exporting exit_1", signal.SIGTERM)
    assert code == 143 and "error: terminated" in err, err
    assert _leftovers(tmp_path) == [] and not out.exists()  # the killed one's leftover went too, and its own
    res = CliRunner().invoke(cli, ["export", str(micro_run), "--out", str(out), "--max-batch", "8", "--no-validate"])
    assert res.exit_code == 0, res.output
    assert _leftovers(tmp_path) == [] and load_bundle(out).batch.max == 8


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("runtimes.atomic", fromlist=["_HOST"])._HOST
    stale = tmp_path / f".bundle.json.{host}-{dead.pid}.abc123.tmp"
    live = tmp_path / f".bundle.json.{host}-{os.getppid()}.def456.tmp"  # a writer that still runs
    other_host = tmp_path / f".bundle.json.elsewhere-{dead.pid}.x.tmp"  # cannot tell: kept
    stranger = tmp_path / ".bundle.json.mine.tmp"  # not one of our names: kept
    for p in (stale, live, other_host, stranger):
        p.write_text("x")
    atomic_write_text(tmp_path / "bundle.json", "{}")
    assert not stale.exists() and live.exists() and other_host.exists() and stranger.exists()


# -- 5. concurrent writers -------------------------------------------------------------------------------------

def _certificate(key: str) -> Certificate:
    return Certificate(key=key, thresholds=(0.5, 0.5), n=100, epsilon=0.05, mode="label-free", method="test",
                       delta=0.01)


def test_concurrent_calibrations_lose_no_certificate(tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(V1_DIGITS, tmp_path / "b"))
    script = textwrap.dedent("""
        import sys
        from calibration.calibrate import write_calibration
        from runtimes.records import Certificate
        for i in range(12):
            key = f"{sys.argv[2]}-{i}"
            write_calibration(sys.argv[1], Certificate(key=key, thresholds=(0.5, 0.5), n=100, epsilon=0.05,
                                                       mode="label-free", method="test", delta=0.01))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(bundle), name], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for name in ("a", "b", "c")]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    keys = set(load_bundle(bundle).calibration)
    assert {f"{n}-{i}" for n in "abc" for i in range(12)} <= keys  # nothing silently lost
    assert (bundle / LOCK_FILE).is_file() and json.loads((bundle / "bundle.json").read_text())["schema_version"] == 3


def test_a_foreign_manifest_of_the_same_name_is_not_ours(micro_run: Path, tmp_path: Path) -> None:
    """Another tool's bundle.json does not make a folder a freedeploy bundle."""
    folder = tmp_path / "webapp"
    folder.mkdir()
    (folder / "bundle.json").write_text('{"name": "my-app", "dependencies": {}}')
    (folder / "index.js").write_text("console.log(1)")
    before = _snapshot(folder)
    _refused(["export", str(micro_run), "--out", str(folder), "--overwrite"], "no bundle.json of ours")
    assert _snapshot(folder) == before


def test_the_writer_lock_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    from runtimes.atomic import exclusive

    bundle = Path(shutil.copytree(V1_DIGITS, tmp_path / "b"))
    victim = tmp_path / "elsewhere"
    os.symlink(victim, bundle / LOCK_FILE)
    with pytest.raises(ConfigError, match="cannot lock"):
        with exclusive(bundle):
            pass
    assert not victim.exists()
