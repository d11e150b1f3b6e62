"""The runtime on a real exported bundle with ONNX Runtime: parity with the monolithic graph and
with torch's first exit, compaction, threads, and no torch anywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from analysis.data import load_dataset
from runtimes.thresholds import NEVER
from runtimes import Runtime
from tests.conftest import split_arrays
from tests.test_layout import BLOCKER


@pytest.fixture(scope="module")
def test_inputs(micro_run) -> dict[str, np.ndarray]:
    return split_arrays(micro_run)


@pytest.fixture(scope="module")
def rt(micro_bundle):
    with Runtime.load(micro_bundle.out, backend="onnxruntime") as runtime:
        yield runtime


def test_no_exit_equals_the_monolithic_graph(rt, test_inputs) -> None:
    rt.thresholds = [NEVER, NEVER]
    chained = rt.infer(test_inputs)
    full = rt.infer_full(test_inputs)
    assert (chained.exits == 2).all() and np.array_equal(chained.classes, full.classes)
    assert np.allclose(chained.confidences, full.confidences, atol=1e-5)


def test_zero_thresholds_leave_at_the_first_exit_with_its_prediction(rt, test_inputs, micro_bundle) -> None:
    rt.thresholds = [0.0, 0.0]
    res = rt.infer(test_inputs)
    record = rt.record(test_inputs)
    v = micro_bundle.validation.chain_parity
    assert v.equal  # the recorded first-exit predictions equal torch's (checked at export)
    assert (res.exits == 0).all() and np.array_equal(res.classes, record.predictions[:, 0])


def test_compaction_gives_the_same_answers_as_single_samples(rt, test_inputs) -> None:
    conf = rt.record(test_inputs).confidences
    rt.thresholds = [float(np.median(conf[:, 0])), float(np.median(conf[:, 1]))]
    batched = rt.infer(test_inputs)
    assert 0 < (batched.exits == 0).sum() < len(batched)  # a real mix of exits
    n = 24
    alone = [rt.infer({k: v[i:i + 1] for k, v in test_inputs.items()}) for i in range(n)]
    assert np.array_equal(batched.exits[:n], np.concatenate([a.exits for a in alone]))
    assert np.array_equal(batched.classes[:n], np.concatenate([a.classes for a in alone]))
    both = rt.infer(test_inputs, policy="batch")
    assert np.array_equal(both.classes, batched.classes) and np.array_equal(both.exits, batched.exits)


def test_concurrent_calls_match_serial_calls(rt, test_inputs) -> None:
    rt.thresholds = [0.6, 0.6]
    chunks = [{k: v[i:i + 7] for k, v in test_inputs.items()} for i in range(0, 70, 7)]
    serial = [rt.infer(c).classes for c in chunks]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = rt.infer(chunks[i]).classes

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(chunks))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(np.array_equal(results[i], serial[i]) for i in range(len(chunks)))


def test_raw_images_go_through_the_bundle_preprocessing(rt, tmp_path: Path) -> None:
    from PIL import Image

    digit = load_dataset("digits").items[0]
    Image.fromarray(digit).save(tmp_path / "d.png")
    a, b = rt.infer([str(tmp_path / "d.png")]), rt.infer([digit])
    assert a.classes[0] == b.classes[0] and a[0].label == rt.labels[a.classes[0]]


def test_a_bundle_runs_where_torch_cannot_be_imported(micro_bundle) -> None:
    code = BLOCKER + textwrap.dedent(f"""
        import numpy as np
        from runtimes import Runtime
        rt = Runtime.load({str(micro_bundle.out)!r})
        rt.thresholds = [0.5, 0.5]
        res = rt.infer([np.zeros((8, 8), dtype=np.uint8), np.full((8, 8), 255, dtype=np.uint8)])
        assert len(res) == 2
        assert "torch" not in sys.modules and "onnx" not in sys.modules
        print("ran", res[0].label)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0 and proc.stdout.startswith("ran"), proc.stderr


def test_cpu_threads_spin_only_while_a_run_lasts(micro_bundle, rt, test_inputs) -> None:
    def entries(r: Runtime, key: str) -> set[str]:
        opts = r.backend.sessions["segment_0"].get_session_options()
        return {opts.get_session_config_entry(key)}

    assert entries(rt, "session.intra_op.allow_spinning") == {"1"} and rt.backend.describe()["spinning"]
    assert entries(rt, "session.force_spinning_stop") == {"1"}  # idle pools never steal the next session's cores
    quiet = Runtime.load(micro_bundle.out, backend="onnxruntime", spinning=False)
    assert entries(quiet, "session.intra_op.allow_spinning") == {"0"} and not quiet.backend.describe()["spinning"]
    x = {k: v[:8] for k, v in test_inputs.items()}
    assert np.array_equal(quiet.infer(x, thresholds=rt.thresholds).classes, rt.infer(x).classes)


def test_unknown_backend_options_are_refused(micro_bundle) -> None:
    from runtimes.errors import ConfigError

    with pytest.raises(ConfigError, match="takes threads, .* not threds"):
        Runtime.load(micro_bundle.out, backend="onnxruntime", threds=2)
