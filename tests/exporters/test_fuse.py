"""A stage fused into one graph (segment + exit head) computes exactly what the two graphs compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from exporters.fuse import identity2onnx, stage2onnx
from runtimes import Runtime
from tests.conftest import split_arrays


@pytest.mark.parametrize("fixture, run_fixture", [("micro_bundle", "micro_run"),
                                                  ("micro_text_bundle", "micro_text_run")])
def test_fused_stage_equals_two_calls(request, fixture: str, run_fixture: str, tmp_path: Path) -> None:
    bundle = request.getfixturevalue(fixture).bundle
    inputs = {k: v[:5] for k, v in split_arrays(request.getfixturevalue(run_fixture)).items()}
    rt = Runtime.load(bundle.root, backend="onnxruntime")
    state = rt.backend.start(inputs)
    for stage in bundle.stages[:-1]:
        feeds = rt.backend.fetch(state, [t.name for t in stage.segment.inputs])
        rt.backend.run(stage.segment.key, state)
        rt.backend.run(stage.exit.graph.key, state)
        fused = ort.InferenceSession(str(stage2onnx(bundle.path(stage.segment.files["fp32"]),
                                                    bundle.path(stage.exit.graph.files["fp32"]),
                                                    tmp_path / f"fused_{stage.index}.onnx")))
        names = [o.name for o in fused.get_outputs()]
        assert names == [t.name for t in (*stage.segment.outputs, *stage.exit.graph.outputs)]
        assert sorted(i.name for i in fused.get_inputs()) == sorted(t.name for t in stage.segment.inputs)
        for name, value in zip(names, fused.run(names, feeds)):
            assert np.array_equal(value, rt.backend.fetch(state, [name])[name]), name


def test_identity_graph_copies(tmp_path: Path) -> None:
    s = ort.InferenceSession(str(identity2onnx("x", 1, ["batch", 3], tmp_path / "id.onnx")))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(s.run(None, {"x": x})[0], x)
