"""The examples and the README's runtime path run as written (on the micro bundle)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.data import load_dataset
from tests.test_layout import run_blocked

ROOT = Path(__file__).parents[1]


def _video(path: Path, frames: int = 4) -> Path:
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for img in load_dataset("digits").items[:frames]:
        frame = cv2.resize(np.repeat(img[:, :, None], 3, axis=2), (32, 32), interpolation=cv2.INTER_LINEAR)
        writer.write(frame)
    writer.release()
    return path


def test_camera_example_on_a_video_file(micro_bundle, tmp_path: Path) -> None:
    video = _video(tmp_path / "digits.avi")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "camera.py"), str(micro_bundle.out), str(video),
                           "--frames", "3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"frame {i}:") and " ms" in line for i, line in enumerate(lines))


def test_run_command_on_a_video_file(micro_bundle, tmp_path: Path) -> None:
    video = _video(tmp_path / "digits.avi")
    proc = subprocess.run([sys.executable, "-m", "freedeploy", "run", str(micro_bundle.out), str(video),
                           "--max-frames", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [f"{video}#0", f"{video}#1"]


def test_predict_example_needs_only_the_runtime(micro_bundle, tmp_path: Path) -> None:
    images = tmp_path / "images"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "save_test_images.py"), str(micro_bundle.out),
                           str(images), "3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert len(list(images.glob("*.png"))) == 3
    proc = run_blocked(f"""
        import runpy
        sys.argv = ["predict.py", {str(micro_bundle.out)!r}, {str(images)!r}]
        runpy.run_path({str(ROOT / "examples" / "predict.py")!r}, run_name="__main__")
        assert not {{m.split(".")[0] for m in sys.modules}} & {{"torch", "freedeploy", "analysis", "exporters"}}
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("predicted") == 3
