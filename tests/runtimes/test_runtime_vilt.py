"""A vision-language bundle in the runtime: image + question preprocessing without torch, chained
early exit against the monolithic graph, and ``freedeploy run --question``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from analysis.data import load_dataset
from freedeploy.cli import cli
from freedeploy.inputs import Encoder
from freedeploy.rundir import load_run, run_split
from runtimes.thresholds import NEVER
from runtimes import Runtime
from runtimes.errors import ConfigError, InputError
from tests.conftest import split_arrays
from tests.test_layout import BLOCKER


@pytest.fixture(scope="module")
def vqa_inputs(micro_vqa_run) -> dict[str, np.ndarray]:
    return split_arrays(micro_vqa_run)


@pytest.fixture(scope="module")
def rt(micro_vqa_bundle):
    with Runtime.load(micro_vqa_bundle.out, backend="onnxruntime") as runtime:
        yield runtime


def test_chain_matches_the_monolithic_graph_and_the_first_exit(rt, vqa_inputs) -> None:
    rt.thresholds = [NEVER, NEVER]
    chained, full = rt.infer(vqa_inputs), rt.infer_full(vqa_inputs)
    assert (chained.exits == 2).all() and np.array_equal(chained.classes, full.classes)
    assert np.allclose(chained.confidences, full.confidences, atol=1e-5)
    rt.thresholds = [0.0, 0.0]
    first = rt.infer(vqa_inputs)
    assert (first.exits == 0).all() and np.array_equal(first.classes, rt.record(vqa_inputs).predictions[:, 0])


def test_compaction_carries_the_joint_mask(rt, vqa_inputs) -> None:
    conf = rt.record(vqa_inputs).confidences
    rt.thresholds = [float(np.median(conf[:, 0])), float(np.median(conf[:, 1]))]
    batched = rt.infer(vqa_inputs)
    assert 0 < (batched.exits == 0).sum() < len(batched)
    alone = [rt.infer({k: v[i:i + 1] for k, v in vqa_inputs.items()}) for i in range(16)]
    assert np.array_equal(batched.exits[:16], np.concatenate([a.exits for a in alone]))
    assert np.array_equal(batched.classes[:16], np.concatenate([a.classes for a in alone]))


def test_raw_image_and_question_forms_agree(rt, micro_vqa_run, tmp_path: Path) -> None:
    _, info = load_run(micro_vqa_run)
    data, idx = run_split(info, "test")
    pairs = [data.items[i] for i in idx[:6]]
    rt.thresholds = [0.5, 0.5]
    encoded = rt.infer(Encoder(data, info.preprocess, info.path)(idx[:6]))
    assert np.array_equal(rt.infer(pairs).classes, encoded.classes)
    image, question = pairs[0]
    Image.fromarray(image).save(tmp_path / "d.png")
    one = rt.infer(str(tmp_path / "d.png"), question=question)
    assert len(one) == 1 and one.classes[0] == encoded.classes[0] == rt.infer((image, question)).classes[0]
    assert rt.infer(Image.fromarray(image), question=question).classes[0] == encoded.classes[0]
    many = rt.infer([p[0] for p in pairs], question=[p[1] for p in pairs])
    assert np.array_equal(many.classes, encoded.classes)
    with pytest.raises(InputError, match=r"\(image, question\) pairs"):
        rt.infer([image])
    with pytest.raises(InputError, match="2 questions for 1 images"):
        rt.infer([image], question=["a?", "b?"])


def test_question_is_refused_by_an_image_bundle(micro_bundle) -> None:
    with Runtime.load(micro_bundle.out) as image_rt, pytest.raises(InputError, match="vision-language"):
        image_rt.infer(np.zeros((8, 8), dtype=np.uint8), question="which digit is this?")


def test_run_question_cli(micro_vqa_bundle, micro_bundle, tmp_path: Path) -> None:
    digit = load_dataset("digits").items[3]
    Image.fromarray(digit).save(tmp_path / "three.png")
    args = ["run", str(micro_vqa_bundle.out), str(tmp_path / "three.png"), "--question", "which digit is this?"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    rec = json.loads(result.stdout)[0]
    assert rec["question"] == "which digit is this?" and rec["label"] in micro_vqa_bundle.bundle.head.labels
    with Runtime.load(micro_vqa_bundle.out) as rt:
        p = rt.infer(str(tmp_path / "three.png"), question="which digit is this?")[0]
    assert (rec["label"], rec["exit_index"]) == (p.label, p.exit_index)
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 0 and "three.png: " in plain.stdout
    for bad, bundle in ((args[:3], micro_vqa_bundle), ([*args[:3], "--question", "q?"], micro_bundle)):
        bad = ["run", str(bundle.out), str(tmp_path / "three.png"), *bad[3:]]
        res = CliRunner().invoke(cli, bad)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == ConfigError.exit_code and len(lines) == 1 and "question" in lines[0], res.stderr


def test_a_vqa_bundle_runs_where_torch_cannot_be_imported(micro_vqa_bundle, tmp_path: Path) -> None:
    Image.fromarray(load_dataset("digits").items[5]).save(tmp_path / "five.png")
    code = BLOCKER + textwrap.dedent(f"""
        import numpy as np
        from runtimes import Runtime
        rt = Runtime.load({str(micro_vqa_bundle.out)!r})
        rt.thresholds = [0.5, 0.5]
        res = rt.infer([({str(tmp_path / "five.png")!r}, "is it even?"), (np.zeros((8, 8), np.uint8), "is this a 0?")])
        again = rt.infer({str(tmp_path / "five.png")!r}, question="is it even?")
        assert len(res) == 2 and again.classes[0] == res.classes[0]
        assert "torch" not in sys.modules and "onnx" not in sys.modules and "transformers" not in sys.modules
        print("ran", res[0].label)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0 and proc.stdout.startswith("ran"), proc.stderr


def test_calibrate_eval_and_bench_on_the_vqa_bundle(micro_vqa_bundle, micro_vqa_run, tmp_path: Path) -> None:
    import shutil

    from runtimes.bundle import load_bundle

    bundle_dir = Path(shutil.copytree(micro_vqa_bundle.out, tmp_path / "b"))
    n_val = len(json.loads((micro_vqa_run / "splits.json").read_text())["val"])
    res = CliRunner().invoke(cli, ["calibrate", str(bundle_dir), "--max-disagreement", "0.3", "--epsilon", "0.1",
                                   "--json"])
    assert res.exit_code == 0, res.stderr
    cert = json.loads(res.stdout)
    assert load_bundle(bundle_dir).thresholds == tuple(cert["thresholds"])
    assert load_bundle(bundle_dir).calibration["onnxruntime-fp32"].n == n_val
    ev = CliRunner().invoke(cli, ["eval", str(bundle_dir), "--split", "test", "--json"])
    assert ev.exit_code == 0, ev.stderr
    m = json.loads(ev.stdout)
    assert m["certificate"]["delta"] == 0.3 and sum(m["exit_histogram"].values()) == m["n"] > 0
    bench = CliRunner().invoke(cli, ["bench", str(bundle_dir), "--batch", "1,4", "--runs", "10", "--batch-runs", "5",
                                     "--run", str(micro_vqa_run), "--json"])
    assert bench.exit_code == 0, bench.stderr
    r = json.loads(bench.stdout)
    assert {"full", "early_exit", "torch"} <= set(r["batch1_ms"]) and r["measured_speedup_mean"] > 0
