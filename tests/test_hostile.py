"""Bad input, hostile bundles and load: one row per situation, each with its exact error type and
the key words of its message; kill tests; a concurrent load test."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from freedeploy.cli import cli
from runtimes import Runtime
from runtimes.bundle import load_bundle
from runtimes.errors import BundleError, ConfigError, DataError, InputError

ROOT = Path(__file__).parents[1]


@pytest.fixture
def bundle(micro_bundle, tmp_path: Path) -> Path:
    return Path(shutil.copytree(micro_bundle.out, tmp_path / "b"))


def _manifest(path: Path, change) -> None:
    data = json.loads((path / "bundle.json").read_text())
    change(data)
    (path / "bundle.json").write_text(json.dumps(data))


def _truncate_with_checksum(path: Path) -> None:
    """A truncated ONNX file whose checksum was 'fixed': only the parser can notice."""
    import hashlib

    onnx = path / "onnx" / "exit_0.onnx"
    onnx.write_bytes(onnx.read_bytes()[:300])
    _manifest(path, lambda d: d["files"].update({"onnx/exit_0.onnx": hashlib.sha256(onnx.read_bytes()).hexdigest()}))


BUNDLE_CASES = {
    "missing file": (lambda p: (p / "onnx" / "exit_1.onnx").unlink(), "onnx/exit_1.onnx is missing"),
    "extra file": (lambda p: (p / "onnx" / "stray.onnx").write_bytes(b"x"), "onnx/stray.onnx is in the bundle but not listed"),
    "checksum mismatch": (lambda p: (p / "onnx" / "segment_1.onnx").write_bytes(b"tampered"),
                          "checksum mismatch for onnx/segment_1.onnx"),
    "path with ..": (lambda p: _manifest(p, lambda d: d["full"]["files"].update(fp32="../full.onnx")), "leaves the bundle"),
    "absolute path": (lambda p: _manifest(p, lambda d: d["full"]["files"].update(fp32="/tmp/full.onnx")), "must be relative"),
    "symlink outside": (lambda p: (os.remove(p / "onnx" / "full.onnx"),
                                   os.symlink(p.parent / "elsewhere.onnx", p / "onnx" / "full.onnx")), "outside the bundle"),
    "future schema": (lambda p: _manifest(p, lambda d: d.update(schema_version=99)), "schema version 99"),
    "malformed JSON": (lambda p: (p / "bundle.json").write_text('{"schema_version": 1,'), "not valid JSON"),
    "wrong field type": (lambda p: _manifest(p, lambda d: d["batch"].update(max="64")), "'max' must be an integer"),
    "truncated onnx": (_truncate_with_checksum, "onnx/exit_0.onnx: not a valid ONNX model"),  # caught at load
}


@pytest.mark.parametrize("case", sorted(BUNDLE_CASES))
def test_hostile_bundles(bundle: Path, case: str) -> None:
    damage, words = BUNDLE_CASES[case]
    (bundle.parent / "elsewhere.onnx").write_bytes(b"outside")
    damage(bundle)
    with pytest.raises(BundleError) as info:
        Runtime.load(bundle)
    assert words in str(info.value)
    res = CliRunner().invoke(cli, ["run", str(bundle), "x.png"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == BundleError.exit_code and len(lines) == 1 and lines[0].startswith("error: ")


@pytest.fixture(scope="module")
def rt(micro_bundle):
    return Runtime.load(micro_bundle.out)


def _good(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32)


INPUT_CASES = {
    "wrong rank": ({"pixel_values": _good()[0]}, InputError, "must have shape (batch, 3, 16, 16)"),
    "wrong shape": ({"pixel_values": _good()[:, :, :, :15]}, InputError, "must have shape (batch, 3, 16, 16)"),
    "wrong dtype": ({"pixel_values": _good().astype(np.float64)}, InputError, "must be float32"),
    "missing input": ({"pixels": _good()}, InputError, "'pixel_values' is missing"),
    "NaN": ({"pixel_values": np.where(np.arange(2)[:, None, None, None] == 1, np.nan, _good())}, InputError,
            "contain NaN or Inf (rows [1])"),
    "Inf": ({"pixel_values": np.full((1, 3, 16, 16), np.inf, np.float32)}, InputError, "NaN or Inf"),
    "empty list": ([], InputError, "empty batch"),
    "empty array batch": ({"pixel_values": _good(0)}, InputError, "non-zero batch"),
    "float image array": ([np.zeros((8, 8), np.float32)], InputError, "must be uint8"),
    "unreadable image file": (["/nonexistent/frame.png"], InputError, "cannot read image"),
    "not an image": ([object()], InputError, "expected an image path"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_bad_inputs(rt, case: str) -> None:
    value, error, words = INPUT_CASES[case]
    with pytest.raises(error) as info:
        rt.infer(value)
    assert words in str(info.value)


def test_nonfinite_can_be_flagged_instead(micro_bundle) -> None:
    rt = Runtime.load(micro_bundle.out, nonfinite="flag")
    x = _good(3)
    x[1, 0, 0, 0] = np.nan
    res = rt.infer({"pixel_values": x})
    assert res.flagged.tolist() == [False, True, False] and len(res) == 3
    x = _good(4)  # one bad element per row kind, anywhere in the row; the largest finite float is fine
    x[0, 2, 15, 15], x[2, 1, 3, 7], x[3, 0, 0, 1] = -np.inf, np.inf, np.finfo(np.float32).max
    assert rt.infer({"pixel_values": x}).flagged.tolist() == [True, False, True, False]
    with pytest.raises(ConfigError, match="nonfinite"):
        Runtime.load(micro_bundle.out, nonfinite="ignore")


def test_oversized_batches_are_split(rt) -> None:
    x = _good(40)  # the bundle's max batch is 16
    assert np.array_equal(rt.infer({"pixel_values": x}).classes,
                          np.concatenate([rt.infer({"pixel_values": x[i:i + 1]}).classes for i in range(40)]))


def test_text_that_is_not_utf8(micro_text_bundle) -> None:
    rt = Runtime.load(micro_text_bundle.out)
    assert len(rt.infer(["good morning", "bonjour".encode("utf-8")])) == 2
    with pytest.raises(InputError, match="not valid UTF-8"):
        rt.infer([b"caf\xe9 au lait"])
    with pytest.raises(InputError, match="must be str"):
        rt.infer([42])


CLI_CASES = [
    (["run", "/nonexistent/bundle", "a.png"], BundleError.exit_code, "not a bundle directory"),
    (["inspect", "/nonexistent/bundle"], BundleError.exit_code, "not a bundle directory"),
    (["eval", "/nonexistent/bundle"], BundleError.exit_code, "not a bundle directory"),
    (["calibrate", "/nonexistent/bundle"], BundleError.exit_code, "not a bundle directory"),
    (["bench", "/nonexistent/bundle"], BundleError.exit_code, "not a bundle directory"),
    (["export", "/nonexistent/run", "--out", "/tmp/never"], 4, "is not a freedeploy run dir"),
    (["export", "/nonexistent/run", "--target", "trt-fp61"], 2, "did you mean 'trt-fp16'"),
    (["build", "/nonexistent/bundle", "--target", "onnx"], 2, "is not a target"),
    (["run", "{bundle}", "a.png", "--thresholds", "0.5,high"], 2, "numbers in [0, 1], 'off' or 'never'"),
    (["run", "{bundle}", "a.png", "--thresholds", "0.5,1.5"], 2, "threshold 1 must be in [0, 1]"),
    (["run", "{bundle}", "a.png", "--thresholds", "0.5"], ConfigError.exit_code, "1 thresholds given"),
    (["calibrate", "{bundle}", "--max-disagreement", "2"], 2, "max-disagreement"),
    (["bench", "{bundle}", "--batch", "0"], 2, "positive"),
    (["nonsense"], 2, "No such command"),
    (["run", "{bundle}", "a.png", "--device", "nope"], ConfigError.exit_code,
     "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["run", "{bundle}", "a.png", "--device", "cuda:x"], ConfigError.exit_code, "device must be 'cpu', 'cuda' or"),
    (["run", "{bundle}", "a.png", "--backend", "tensorrt", "--device", "cpu"], ConfigError.exit_code,
     "tensorrt backend runs on 'cuda' or 'cuda:N'"),
    (["bench", "{bundle}", "--device", "nope"], ConfigError.exit_code, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["calibrate", "{bundle}", "--device", "nope"], ConfigError.exit_code, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["eval", "{bundle}", "--device", "gpu0"], ConfigError.exit_code, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["bench", "{bundle}", "--threads", "1000000"], ConfigError.exit_code, "threads must be an integer from 1 to"),
    (["eval", "{bundle}", "--data", "text:/nonexistent/t.csv?encoding=nope"], DataError.exit_code,
     "unknown text encoding 'nope'"),
]


@pytest.mark.parametrize("args, code, words", CLI_CASES)
def test_cli_user_errors_are_one_line(micro_bundle, args: list[str], code: int, words: str) -> None:
    args = [a.replace("{bundle}", str(micro_bundle.out)) for a in args]
    res = CliRunner().invoke(cli, args)
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith(("benchmarking", "80 "))]
    assert res.exit_code == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr


def _rejecting_uniform_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime rejects every batch holding a uniform image (one colour), as it rejects a value
    no check before it can see."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    run = onnxruntime.InferenceSession.run

    def rejecting(self, outputs, feeds, *args, **kwargs):
        x = feeds.get("pixel_values")
        if x is not None and (np.ptp(x.reshape(len(x), -1), axis=1) == 0).any():
            raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : a value this model cannot take")
        return run(self, outputs, feeds, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", rejecting)
    # the batch-1 path binds its inputs once (I/O binding): reject there too, on what was bound
    bound: dict[tuple[int, str], np.ndarray] = {}
    bind, run_bound = onnxruntime.IOBinding.bind_cpu_input, onnxruntime.InferenceSession.run_with_iobinding

    def binding(self, name, array):
        bound[id(self), name] = array
        return bind(self, name, array)

    def rejecting_bound(self, iobinding, *args, **kwargs):
        x = bound.get((id(iobinding), "pixel_values"))
        if x is not None and (np.ptp(x.reshape(len(x), -1), axis=1) == 0).any():
            raise InvalidArgument("Error in execution: a value this model cannot take")
        return run_bound(self, iobinding, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.IOBinding, "bind_cpu_input", binding)
    monkeypatch.setattr(onnxruntime.InferenceSession, "run_with_iobinding", rejecting_bound)


def test_one_bad_input_does_not_end_the_run(micro_bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.runtimes.test_preprocess import _png_claiming

    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"good{i}.png")
    deep = np.random.default_rng(1).integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit gray: scaled, not clipped
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(tmp_path / "uniform.png")  # rejected by ONNX Runtime
    _png_claiming(tmp_path / "bomb.png", 100_000, 100_000)  # refused by Pillow's decompression-bomb check
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    names = ["good0.png", "bomb.png", "missing.png", "uniform.png", "broken.png", "deep.png", "good1.png"]
    args = ["run", str(micro_bundle.out), *(str(tmp_path / n) for n in names), "--thresholds", "off,off"]
    _rejecting_uniform_images(monkeypatch)

    res = CliRunner().invoke(cli, args)
    assert res.exit_code == InputError.exit_code and not isinstance(res.exception, (AssertionError, TypeError))
    assert "Traceback" not in res.stderr + res.stdout
    assert [line.split(":")[0].rsplit("/", 1)[-1] for line in res.stdout.splitlines()] == \
        ["good0.png", "deep.png", "good1.png"]
    errors = {line.split(": error: ")[0].rsplit("/", 1)[-1]: line.split(": error: ")[1]
              for line in res.stderr.splitlines()}
    assert sorted(errors) == ["bomb.png", "broken.png", "missing.png", "uniform.png"]
    assert "decompression bomb" in errors["bomb.png"] and "does not exist" in errors["missing.png"]
    assert "ONNX Runtime rejected the input" in errors["uniform.png"] and "cannot read image" in errors["broken.png"]

    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == InputError.exit_code
    rows = json.loads(res.stdout)
    assert [r["input"].rsplit("/", 1)[-1] for r in rows] == names
    assert [("error" in r) for r in rows] == [False, True, True, True, True, False, False]
    assert rows[0]["exit_index"] == 2 and rows[0]["block"] == rows[-1]["block"] and "label" in rows[-1]
    assert all(r["error"]["type"] == "InputError" and r["error"]["exit_code"] == InputError.exit_code
               for r in rows if "error" in r)
    assert "ONNX Runtime rejected the input" in rows[3]["error"]["message"]
    assert len(res.stderr.strip().splitlines()) == 4  # every failed input also gets its line on stderr


def test_results_so_far_are_printed_when_a_run_stops(micro_bundle, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An error that is not one input's (here a backend that breaks down) stops the run with its own
    code, after the JSON of the inputs already done."""
    from runtimes.backends.onnxruntime import OrtBackend

    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    run, calls = OrtBackend.run, []

    def failing(self, graph, state):
        calls.append(graph)
        if calls.count("segment_0") == 3:
            raise BundleError("the backend broke down")
        return run(self, graph, state)

    monkeypatch.setattr(OrtBackend, "run", failing)
    res = CliRunner().invoke(cli, ["run", str(micro_bundle.out), *(str(tmp_path / f"{i}.png") for i in range(3)),
                                   "--json"])
    assert res.exit_code == BundleError.exit_code and res.stderr.strip() == "error: the backend broke down"
    assert [r["input"].rsplit("/", 1)[-1] for r in json.loads(res.stdout)] == ["0.png", "1.png"]


def _kill_when(cmd: list[str], marker: str, timeout: float = 300) -> int:
    """Start a freedeploy command, SIGKILL it once ``marker`` appears on its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "freedeploy", *cmd], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if marker in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_killed_export_leaves_the_previous_bundle_intact(micro_run, bundle: Path) -> None:
    before = (bundle / "bundle.json").read_bytes()
    code = _kill_when(["export", str(micro_run), "--out", str(bundle), "--overwrite"], "exporting exit_1")
    assert code == -signal.SIGKILL
    assert (bundle / "bundle.json").read_bytes() == before
    load_bundle(bundle)  # every checksum still holds


def test_killed_calibration_leaves_the_bundle_intact(bundle: Path) -> None:
    before = (bundle / "bundle.json").read_bytes()
    code = _kill_when(["calibrate", str(bundle), "--max-disagreement", "0.3"], "samples from")
    assert code == -signal.SIGKILL
    assert (bundle / "bundle.json").read_bytes() == before
    load_bundle(bundle)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_load_eight_threads_thousand_calls_each(micro_bundle) -> None:
    rt = Runtime.load(micro_bundle.out)
    rt.thresholds = [0.3, 0.3]
    frames = [_good(1) + i for i in range(16)]
    serial = [rt.infer({"pixel_values": f}).classes[0] for f in frames]
    errors: list[BaseException] = []
    mismatches = [0]

    def work(t: int) -> None:
        try:
            for i in range(1000):
                k = (i + t) % len(frames)
                if rt.infer({"pixel_values": frames[k]}).classes[0] != serial[k]:
                    mismatches[0] += 1
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    rss0, t0 = _rss_mb(), time.perf_counter()
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    seconds, rss1 = time.perf_counter() - t0, _rss_mb()
    print(f"\nload: 8 threads x 1000 calls in {seconds:.1f} s; RSS {rss0:.0f} -> {rss1:.0f} MB "
          f"(peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    assert not errors and mismatches[0] == 0
    assert rss1 - rss0 < 64, f"memory grew by {rss1 - rss0:.0f} MB over 8000 calls"
