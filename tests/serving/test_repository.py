"""``freedeploy triton-repo`` (``serving.repository``): the model repository's layout and
config, its ``model.py`` under a stand-in of Triton's Python backend, the real ``tritonserver`` on it,
and what it refuses to write or replace."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from freedeploy.cli import cli
from freedeploy.inputs import Encoder
from freedeploy.rundir import load_run, run_split
from runtimes import Runtime
from runtimes.bundle import load_bundle
from runtimes.errors import BundleError, ConfigError
from serving import protocol, repository
from serving.bench import RepositoryServer
from serving.client import Client
from serving.protocol import model_name
from serving.repository import MODEL_MARKER, write_repository
from tests.fakes import fake_pb_utils as pb
from tests.serving.conftest import ROOT, port_in_use

BUNDLES = {"micro_bundle": "micro_run", "micro_text_bundle": "micro_text_run", "micro_vqa_bundle": "micro_vqa_run"}
RUNTIMES, SERVING = ROOT / "runtimes", ROOT / "serving"


# -- helpers --------------------------------------------------------------------------------------------------

def _pbtxt(text: str) -> dict[str, list[Any]]:
    """Protobuf text format -> {field: [values]} (messages as dicts, repeated fields as lists)."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+',
                        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))

    def value(i: int) -> tuple[Any, int]:
        t = tokens[i]
        if t == "{":
            return message(i + 1, "}")
        if t == "[":
            items, i = [], i + 1
            while tokens[i] != "]":
                v, i = value(i)
                items.append(v)
                i += tokens[i] == ","
            return items, i + 1
        if t.startswith('"'):
            return json.loads(t), i + 1
        return (int(t) if re.fullmatch(r"-?\d+", t) else t), i + 1

    def message(i: int, end: str | None) -> tuple[dict[str, list[Any]], int]:
        out: dict[str, list[Any]] = {}
        while i < len(tokens) and tokens[i] != end:
            key, i = tokens[i], i + 1
            i += tokens[i] == ":"
            v, i = value(i)
            out.setdefault(key, []).extend(v if isinstance(v, list) and key != "dims" else [v])
            i += i < len(tokens) and tokens[i] == ","
        return out, i + 1

    return message(0, None)[0]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _samples(run_dir: Path, n: int) -> tuple[list[tuple[bytes, ...]], list[Any], dict[str, np.ndarray]]:
    """``n`` test rows: as raw Triton inputs (bytes per port), as ``Runtime.infer`` takes them, and as
    the bundle's model inputs."""
    _, info = load_run(run_dir)
    data, idx = run_split(info, "test")
    items = [data.items[i] for i in idx[:n]]
    if isinstance(items[0], str):
        return [(t.encode(),) for t in items], items, Encoder(data, info.preprocess, info.path)(idx[:n])
    if isinstance(items[0], tuple):
        raw = [(_png(im), q.encode()) for im, q in items]
        return raw, [(r[0], q) for r, (_, q) in zip(raw, items)], Encoder(data, info.preprocess, info.path)(idx[:n])
    raw = [(_png(im),) for im in items]
    return raw, [r[0] for r in raw], Encoder(data, info.preprocess, info.path)(idx[:n])


def _mixed_thresholds(bundle_dir: Path, arrays: dict[str, np.ndarray]) -> list[float]:
    """Thresholds at the median confidence of each exit: some rows leave early, some do not."""
    with Runtime.load(bundle_dir, backend="onnxruntime") as rt:
        conf = rt.record(arrays).confidences
    return [float(np.median(conf[:, k])) for k in range(conf.shape[1] - 1)]


def _load_model(repo: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The written model.py, imported and initialised as Triton's stub does (with the stand-in)."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setattr(sys, "path", list(sys.path))  # initialize puts the vendored runtime first
    spec = importlib.util.spec_from_file_location(f"triton_model_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    params = {k: {"string_value": v} for k, v in _parameters(repo / name).items()}
    config = json.dumps({"name": name, "parameters": params})
    model.initialize({"model_config": config, "model_repository": str(repo / name), "model_version": "1",
                      "model_name": name, "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    return model


def _parameters(model_dir: Path) -> dict[str, str]:
    cfg = _pbtxt((model_dir / "config.pbtxt").read_text())
    return {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}


def _request(names: tuple[str, ...], rows: list[tuple[bytes, ...]]) -> pb.InferenceRequest:
    return pb.InferenceRequest([pb.Tensor(n, np.array([[r[j]] for r in rows], dtype=object))
                                for j, n in enumerate(names)])


def _outputs(response: pb.InferenceResponse) -> dict[str, np.ndarray]:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def _same(out: dict[str, np.ndarray], expected: Any, rows: slice | list[int] = slice(None)) -> None:
    """Served outputs (a request's, or rows of it) equal a local ``Runtime.infer`` result."""
    assert np.array_equal(out["class"][rows, 0], expected.classes)
    assert np.array_equal(out["exit_index"][rows, 0], expected.exits)
    assert np.array_equal(out["block"][rows, 0], expected.blocks)
    assert np.allclose(out["confidence"][rows, 0], expected.confidences, rtol=1e-5, atol=1e-6)
    assert [v for v in out["label"][rows, 0]] == [expected.labels[c].encode() for c in expected.classes]
    assert all(v == b"" for v in out["error"][rows, 0])


# -- 1. layout and config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", list(BUNDLES))
def test_layout_and_config(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    bundle_dir = Path(request.getfixturevalue(fixture).out)
    bundle = load_bundle(bundle_dir)
    repo = tmp_path / "models"
    summary = write_repository(bundle_dir, repo)
    name = model_name(bundle.name)
    assert summary["names"] == {"raw": name, "tensors": name + "_tensors"}
    assert summary["command"] == f"tritonserver --model-repository {repo}"
    assert ("tokenizers" in summary["requires"]) == (bundle.preprocess.kind != "image")
    assert ("pillow" in summary["requires"]) == (bundle.preprocess.kind != "text")
    assert sorted(p.name for p in repo.iterdir()) == sorted([name, name + "_tensors"])
    for mode, model in summary["names"].items():
        cfg = _pbtxt((repo / model / "config.pbtxt").read_text())
        assert cfg["name"] == [model] and cfg["backend"] == ["python"]
        assert cfg["max_batch_size"] == [bundle.batch.max] == [16]
        assert cfg["dynamic_batching"][0]["max_queue_delay_microseconds"] == [protocol.DEFAULT_QUEUE_DELAY_US]
        assert cfg["instance_group"] == [{"kind": ["KIND_CPU"], "count": [1]}]
        ports = protocol.inputs_for(bundle, mode)
        assert [(t["name"][0], t["data_type"][0], t["dims"][0]) for t in cfg["input"]] == \
               [(p.name, p.config_type, list(p.shape)) for p in ports]
        assert [(t["name"][0], t["data_type"][0], t["dims"][0]) for t in cfg["output"]] == \
               [(p.name, p.config_type, [1]) for p in protocol.OUTPUTS]
        params = _parameters(repo / model)
        assert params["mode"] == mode and params["early_exit"] == "true" and params["thresholds"] == ""
        assert (repo / model / params["bundle"]).resolve() == (repo / name / "1" / "bundle").resolve()
        assert (repo / model / "1" / "model.py").read_bytes() == (SERVING / "triton_model.py").read_bytes()
        assert json.loads((repo / model / MODEL_MARKER).read_text())["triton_model"]["mode"] == mode
    if bundle.preprocess.kind == "image":
        assert [t["dims"][0] for t in _pbtxt((repo / (name + "_tensors") / "config.pbtxt").read_text())["input"]] \
               == [[3, 16, 16]]
    # one bundle copy, byte for byte, that loads; the runtime's sources and the protocol, nothing compiled
    assert not (repo / (name + "_tensors") / "1" / "bundle").exists()
    copy = repo / name / "1" / "bundle"
    assert _tree(copy) == {k: v for k, v in _tree(bundle_dir).items() if not k.endswith(".lock")}
    assert load_bundle(copy).files == bundle.files
    vendored = _tree(repo / name / "1" / "runtimes")
    assert vendored == {k: v for k, v in _tree(RUNTIMES).items() if "__pycache__" not in k and not k.endswith(".pyc")}
    assert "backends/onnxruntime.py" in vendored and not any(k.startswith("serve/") for k in vendored)
    # of the serving package only the protocol: no server, no client, no repository writer
    served = _tree(repo / name / "1" / "serving")
    assert sorted(served) == ["__init__.py", "protocol.py"]
    assert served["protocol.py"] == _tree(SERVING)["protocol.py"]
    assert sorted(p.name for p in (repo / name / "1").iterdir()) == ["bundle", "model.py", "runtimes", "serving"]
    assert not list((repo / name).rglob("__pycache__"))


def test_the_files_follow_the_umask(micro_bundle, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_repository(micro_bundle.out, tmp_path / "models")
    finally:
        os.umask(old)
    paths = list((tmp_path / "models").rglob("*"))
    assert paths and all(p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640) for p in paths)


def test_options_reach_the_config(micro_bundle, tmp_path: Path) -> None:
    summary = write_repository(micro_bundle.out, tmp_path / "m", name="digits-v2", max_batch=64, queue_delay_us=250,
                               instances=3, early_exit=False, thresholds=[0.5, None], backend="onnxruntime")
    cfg = _pbtxt((tmp_path / "m" / "digits-v2_tensors" / "config.pbtxt").read_text())
    assert cfg["max_batch_size"] == [64] and cfg["instance_group"][0]["count"] == [3]
    assert cfg["dynamic_batching"][0]["max_queue_delay_microseconds"] == [250]
    params = _parameters(tmp_path / "m" / "digits-v2")
    assert (params["early_exit"], params["backend"], json.loads(params["thresholds"])) == ("false", "onnxruntime",
                                                                                          [0.5, None])
    assert summary["thresholds"] == [0.5, None] and summary["max_batch"] == 64
    write_repository(micro_bundle.out, tmp_path / "m", name="plain", batching=False, device="cpu", precision="fp32")
    cfg = _pbtxt((tmp_path / "m" / "plain" / "config.pbtxt").read_text())
    assert "dynamic_batching" not in cfg and cfg["max_batch_size"] == [micro_bundle.bundle.batch.max]
    params = _parameters(tmp_path / "m" / "plain")
    assert (params["device"], params["precision"]) == ("cpu", "fp32")
    with pytest.raises(ConfigError, match="device must be"):
        write_repository(micro_bundle.out, tmp_path / "m", name="gpu", device="gpu0")
    assert not (tmp_path / "m" / "gpu").exists()


# -- 2. model.py under a stand-in of the Python backend -------------------------------------------------------

@pytest.mark.parametrize("fixture", list(BUNDLES))
def test_one_execute_answers_every_request_as_the_runtime(fixture: str, request: pytest.FixtureRequest,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle_dir = Path(request.getfixturevalue(fixture).out)
    raw, items, arrays = _samples(request.getfixturevalue(BUNDLES[fixture]), 9)
    thresholds = _mixed_thresholds(bundle_dir, arrays)
    summary = write_repository(bundle_dir, tmp_path / "models", thresholds=thresholds)
    names = tuple(p["name"] for p in summary["inputs"]["raw"])
    model = _load_model(tmp_path / "models", summary["names"]["raw"], monkeypatch)
    tensors = _load_model(tmp_path / "models", summary["names"]["tensors"], monkeypatch)
    try:
        corrupt = (b"\x89PNG\r\n\x1a\n not an image",) + raw[4][1:] if "image" in names else (b"\xff\xfe not utf-8",)
        batches = [raw[0:1], raw[1:4], raw[4:5] + [corrupt] + raw[5:7], raw[7:9]]  # sizes 1, 3, 4, 2
        responses = model.execute([_request(names, b) for b in batches])
        wrong = model.execute([pb.InferenceRequest([])])  # a request without its inputs fails alone
        split = [{k: v[a:b] for k, v in arrays.items()} for a, b in ((0, 2), (2, 7))]
        answered = tensors.execute([pb.InferenceRequest([pb.Tensor(k, np.ascontiguousarray(v)) for k, v in s.items()])
                                    for s in split])
    finally:
        model.finalize()
        tensors.finalize()
    assert len(responses) == 4 and wrong[0].has_error() and "missing input" in wrong[0].error().message()
    with Runtime.load(bundle_dir, backend="onnxruntime") as rt:
        rt.thresholds = thresholds
        expected = rt.infer(items[:9])
        assert 0 < (expected.exits == 0).sum() < 9  # early exit really compacts rows inside the batch
        outs = [_outputs(r) for r in responses]
        _same(outs[0], rt.infer(items[0:1]))
        _same(outs[1], rt.infer(items[1:4]))
        _same(outs[2], rt.infer(items[4:7]), [0, 2, 3])
        _same(outs[3], rt.infer(items[7:9]))
        bad = outs[2]
        assert bad["class"][1, 0] == -1 and np.isnan(bad["confidence"][1, 0]) and bad["block"][1, 0] == 0
        assert bad["error"][1, 0] and bad["label"][1, 0] == b""
        for got, s in zip(answered, split):
            _same(_outputs(got), rt.infer(s))
    for out in outs:
        assert all(out[p.name].dtype == p.numpy_dtype and out[p.name].shape[1] == 1 for p in protocol.OUTPUTS)


def test_a_failed_batch_fails_each_request_with_its_reason(micro_bundle, micro_run, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    raw, _, _ = _samples(micro_run, 3)
    write_repository(micro_bundle.out, tmp_path / "models", name="d")
    model = _load_model(tmp_path / "models", "d", monkeypatch)
    model.finalize()  # a closed runtime: the whole call fails
    responses = model.execute([_request(("image",), raw[:1]), _request(("image",), raw[1:3])])
    assert [r.has_error() for r in responses] == [True, True]
    assert all("\n" not in r.error().message() and "closed" in r.error().message() for r in responses)


@pytest.mark.parametrize("key, value, words", [("thresholds", "not json", "must be a JSON list"),
                                              ("thresholds", "[0.5, 0.5, 0.5]", "threshold"),
                                              ("early_exit", "maybe", "true or false"),
                                              ("mode", "pixels", "mode must be"),
                                              ("bundle", "../../elsewhere", "is not a bundle directory")])
def test_hand_edited_parameters_that_cannot_work_stop_the_model_loading(micro_bundle, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, key: str,
                                                                       value: str, words: str) -> None:
    """config.pbtxt's parameters may be edited before the server starts: a wrong one fails the load with
    a one-line freedeploy error (Triton reports it and does not serve the model)."""
    from runtimes.errors import FreedeployError

    write_repository(micro_bundle.out, tmp_path / "models", name="d")
    config = tmp_path / "models" / "d" / "config.pbtxt"
    text = config.read_text()
    old = f'key: "{key}"\n  value: {{ string_value: "{_parameters(tmp_path / "models" / "d")[key]}" }}'
    assert old in text
    config.write_text(text.replace(old, f'key: "{key}"\n  value: {{ string_value: "{value}" }}'))
    with pytest.raises(FreedeployError, match=words) as err:
        _load_model(tmp_path / "models", "d", monkeypatch)
    assert "\n" not in str(err.value)


VENDORED_CHECK = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    from tests.fakes import fake_pb_utils as pb

    job = json.loads(sys.argv[1])
    sys.modules["triton_python_backend_utils"] = pb
    spec = importlib.util.spec_from_file_location("model", job["model_py"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "runtimes" not in sys.modules and "serving" not in sys.modules
    model = module.TritonPythonModel()
    model.initialize(job["args"])
    image = pb.Tensor("image", np.array([[bytes.fromhex(job["image"])]], dtype=object))
    out = model.execute([pb.InferenceRequest([image])])
    model.finalize()
    print(json.dumps([sys.modules["runtimes"].__file__, sys.modules["serving.protocol"].__file__,
                      int(pb.get_output_tensor_by_name(out[0], "class").as_numpy()[0, 0])]))
""")


def test_model_py_runs_the_vendored_runtime(micro_bundle, micro_run, tmp_path: Path) -> None:
    """In a fresh interpreter whose path also holds the project's own runtimes and serving packages."""
    raw, _, _ = _samples(micro_run, 1)
    repo = tmp_path / "models"
    write_repository(micro_bundle.out, repo, name="d")
    config = {"parameters": {k: {"string_value": v} for k, v in _parameters(repo / "d").items()}}
    job = {"model_py": str(repo / "d" / "1" / "model.py"), "image": raw[0][0].hex(),
           "args": {"model_config": json.dumps(config), "model_repository": str(repo / "d"), "model_version": "1"}}
    proc = subprocess.run([sys.executable, "-c", VENDORED_CHECK, json.dumps(job)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, protocol_file, cls = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(where) == repo / "d" / "1" / "runtimes" / "__init__.py" and cls >= 0
    assert Path(protocol_file) == repo / "d" / "1" / "serving" / "protocol.py"


# -- 3. the real tritonserver ---------------------------------------------------------------------------------

CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.http as http

    port, jobs = sys.argv[1], json.loads(sys.stdin.read())
    client = http.InferenceServerClient(f"127.0.0.1:{port}", concurrency=len(jobs))
    outputs = ["label", "class", "confidence", "exit_index", "block", "error"]

    def tensor(name, spec):
        if spec["datatype"] == "BYTES":
            array = np.array([[bytes.fromhex(v)] for v in spec["data"]], dtype=object)
        else:
            array = np.array(spec["data"], dtype=spec["dtype"])
        t = http.InferInput(name, list(array.shape), spec["datatype"])
        t.set_data_from_numpy(array, binary_data=True)
        return t

    pending = [client.async_infer(job["model"], [tensor(n, s) for n, s in job["inputs"].items()],
                                  outputs=[http.InferRequestedOutput(n, binary_data=True) for n in outputs])
               for job in jobs]  # sent together: the dynamic batcher may join them
    answers = []
    for p in pending:
        r = p.get_result()
        answers.append({n: [v.hex() if isinstance(v, bytes) else v for v in r.as_numpy(n).reshape(-1).tolist()]
                        for n in outputs})
    print(json.dumps(answers))
""")


def _job(model: str, inputs: dict[str, Any]) -> dict[str, Any]:
    spec = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            spec[name] = {"datatype": protocol.Port(name, value.dtype.name, ()).datatype, "dtype": value.dtype.name,
                          "data": value.tolist()}
        else:
            spec[name] = {"datatype": "BYTES", "data": [v.hex() for v in value]}
    return {"model": model, "inputs": spec}


def _served(answer: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    col = lambda n, dtype: np.array(answer[n], dtype=dtype).reshape(-1, 1)  # noqa: E731
    return {"class": col("class", np.int64), "exit_index": col("exit_index", np.int64), "block": col("block", np.int64),
            "confidence": col("confidence", np.float32),
            "label": np.array([bytes.fromhex(v) for v in answer["label"]], dtype=object).reshape(-1, 1),
            "error": np.array([bytes.fromhex(v) for v in answer["error"]], dtype=object).reshape(-1, 1)}


def test_tritonserver_serves_the_repository(serve_python: str, micro_bundle, micro_run, micro_text_bundle,
                                            micro_text_run, tmp_path: Path) -> None:
    image_raw, image_items, image_arrays = _samples(micro_run, 6)
    text_raw, text_items, _ = _samples(micro_text_run, 3)
    thresholds = _mixed_thresholds(Path(micro_bundle.out), image_arrays)
    repo = tmp_path / "models"
    write_repository(micro_bundle.out, repo, name="digits", thresholds=thresholds)
    write_repository(micro_text_bundle.out, repo, name="tweets")  # a repository holds many models
    server = RepositoryServer(serve_python, repo, tmp_path)
    try:
        corrupt = b"\x89PNG\r\n\x1a\n not an image"
        jobs = [_job("digits", {"image": [r[0] for r in image_raw[:2]]}),
                _job("digits", {"image": [image_raw[2][0], corrupt, image_raw[3][0]]}),
                _job("digits_tensors", {"pixel_values": image_arrays["pixel_values"][4:6]}),
                _job("tweets", {"text": [r[0] for r in text_raw]})]
        client = subprocess.run([serve_python, "-c", CLIENT, str(server.http)], input=json.dumps(jobs), text=True,
                                capture_output=True, timeout=60)
        assert client.returncode == 0, client.stderr[-3000:]
        answers = [_served(a) for a in json.loads(client.stdout)]
        # the project's own client reads the same server
        ours = Client(server.url, "digits").infer([r[0] for r in image_raw[:2]])
    finally:
        rc = server.stop()
    assert rc == 0, server.log_tail()
    with Runtime.load(micro_bundle.out, backend="onnxruntime") as rt:
        rt.thresholds = thresholds
        _same(answers[0], rt.infer(image_items[:2]))
        _same(answers[1], rt.infer([image_items[2], image_items[3]]), [0, 2])
        assert answers[1]["class"][1, 0] == -1 and b"cannot read image" in answers[1]["error"][1, 0]
        _same(answers[2], rt.infer({"pixel_values": image_arrays["pixel_values"][4:6]}))
    with Runtime.load(micro_text_bundle.out, backend="onnxruntime") as rt:
        _same(answers[3], rt.infer(text_items))
    assert [(p.label, p.class_index, p.block) for p in ours] == \
        [(l.decode(), int(c), int(b)) for l, c, b in zip(answers[0]["label"][:, 0], answers[0]["class"][:, 0],
                                                         answers[0]["block"][:, 0])]
    assert not any(port_in_use(p) for p in (server.http, server.grpc, server.metrics))
    stubs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(server.home).encode() in _cmdline(p)]
    assert not stubs  # no Python-backend stub outlived the server


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


# -- 4. the command line, and what is refused -----------------------------------------------------------------

def _refused(args: list[str], error: type, words: str) -> None:
    res = CliRunner().invoke(cli, ["triton-repo", *args])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == error.exit_code, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_cli_writes_and_says_what_to_run(micro_bundle, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    res = CliRunner().invoke(cli, ["triton-repo", str(micro_bundle.out), "--out", str(repo), "--name", "cam"])
    assert res.exit_code == 0, res.output
    assert f"next: tritonserver --model-repository {repo}" in res.stdout and "cam_tensors" in res.stdout
    res = CliRunner().invoke(cli, ["triton-repo", str(micro_bundle.out), "--out", str(repo), "--name", "cam",
                                   "--overwrite", "--json", "--max-batch", "4", "--no-early-exit"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["max_batch"] == 4 and summary["early_exit"] is False and summary["names"]["tensors"] == "cam_tensors"
    assert _parameters(repo / "cam")["early_exit"] == "false"


def test_bundles_that_cannot_be_served_are_refused(micro_bundle, decoder_bundle, tmp_path: Path) -> None:
    out = str(tmp_path / "models")
    _refused([str(tmp_path / "nowhere"), "--out", out], BundleError, "is not a bundle directory")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    _refused([str(tmp_path / "photos"), "--out", out], BundleError, "bundle.json is missing")
    broken = Path(shutil.copytree(micro_bundle.out, tmp_path / "broken"))
    onnx = next((broken / "onnx").glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    _refused([str(broken), "--out", out], BundleError, "checksum mismatch")
    _refused([str(decoder_bundle.out), "--out", out], ConfigError, "is a generate bundle: serving")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["a b", "../up", "-dash", "", "x" * 101, "naïve", "a.b"])
def test_names_triton_would_reject_are_refused(micro_bundle, tmp_path: Path, name: str) -> None:
    _refused([str(micro_bundle.out), "--out", str(tmp_path), "--name", name], ConfigError, "is not one Triton takes")
    assert list(tmp_path.iterdir()) == []


def test_default_names_are_made_valid() -> None:
    assert model_name("digits v2.1") == "digits_v2_1" and model_name("--café--") == "caf"
    assert model_name("...") == "model" and model_name("a" * 300) == "a" * 100


def test_only_our_own_models_are_replaced_and_others_are_left_alone(micro_bundle, micro_text_bundle,
                                                                     tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "detector" / "1").mkdir(parents=True)  # someone else's model in the same repository
    (repo / "detector" / "config.pbtxt").write_text('name: "detector"\nbackend: "onnxruntime"\n')
    (repo / "detector" / "1" / "model.onnx").write_bytes(os.urandom(64))
    theirs = _tree(repo / "detector")
    write_repository(micro_bundle.out, repo, name="cam")
    ours = _tree(repo / "cam")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        write_repository(micro_bundle.out, repo, name="cam")
    write_repository(micro_text_bundle.out, repo, name="cam", overwrite=True)
    assert _tree(repo / "cam") != ours and load_bundle(repo / "cam" / "1" / "bundle").name == load_bundle(
        micro_text_bundle.out).name
    _refused([str(micro_bundle.out), "--out", str(repo), "--name", "detector", "--overwrite"], ConfigError,
             "refusing to replace")
    (repo / "lone_tensors").mkdir()  # only the tensors model's name is taken: nothing is written
    (repo / "lone_tensors" / "notes.txt").write_text("keep")
    _refused([str(micro_bundle.out), "--out", str(repo), "--name", "lone", "--overwrite"], ConfigError,
             "refusing to replace")
    assert not (repo / "lone").exists() and (repo / "lone_tensors" / "notes.txt").read_text() == "keep"
    (repo / "forged").mkdir()  # a marker file of our name, not of our making
    (repo / "forged" / MODEL_MARKER).write_text("[]")
    _refused([str(micro_bundle.out), "--out", str(repo), "--name", "forged", "--overwrite"], ConfigError,
             "refusing to replace")
    assert _tree(repo / "detector") == theirs
    assert sorted(p.name for p in repo.iterdir()) == ["cam", "cam_tensors", "detector", "forged", "lone_tensors"]


def test_an_interrupted_write_leaves_nothing_half_written(micro_bundle, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "models"
    write_repository(micro_bundle.out, repo, name="cam", max_batch=8)
    before = _tree(repo)
    real, calls = repository._copy_tree, []

    def interrupted(src: Path, dst: Path) -> int:
        calls.append(src)
        if len(calls) == 2:  # the bundle is copied, the runtime not yet
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(repository, "_copy_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_repository(micro_bundle.out, repo, name="cam", max_batch=4, overwrite=True)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_repository(micro_bundle.out, repo, name="other")
    assert _tree(repo) == before and sorted(p.name for p in repo.iterdir()) == ["cam", "cam_tensors"]


def test_other_wrong_requests_are_refused(micro_bundle, tmp_path: Path) -> None:
    bundle = str(micro_bundle.out)
    (tmp_path / "file").write_text("x")
    _refused([bundle, "--out", str(tmp_path / "file")], ConfigError, "is a file")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        write_repository(bundle, tmp_path / "file")
    _refused([bundle, "--out", str(Path(bundle) / "repo")], ConfigError, "lies inside the input")
    _refused([bundle, "--out", str(tmp_path / "m"), "--thresholds", "0.5"], ConfigError, "1 thresholds given")
    assert not (tmp_path / "m").exists() and not (Path(bundle) / "repo").exists()
