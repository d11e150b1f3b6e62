"""The served tensors and one batch's answers, without a server: what every served model and the
repository's model compute, against the local runtime; and the client's checks that need no server."""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import numpy as np
import pytest

from runtimes import Runtime
from runtimes.errors import BackendUnavailableError, ConfigError, InputError
from serving.bench import free_ports
from serving.client import Client, Fleet, _bytes_blob
from serving.protocol import OUTPUTS, answer, answer_requests, inputs_for, model_names


def png(seed: int, size: int = 8) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def column(values) -> np.ndarray:
    out = np.empty((len(values), 1), dtype=object)
    for i, v in enumerate(values):
        out[i, 0] = v
    return out


@pytest.fixture(scope="module")
def rt(micro_bundle):
    with Runtime.load(micro_bundle.out) as r:
        yield r


def test_ports_follow_the_bundles_input_kind(micro_bundle, micro_text_bundle, micro_vqa_bundle, decoder_bundle):
    image, text, vqa = (b.bundle for b in (micro_bundle, micro_text_bundle, micro_vqa_bundle))
    assert [(p.name, p.datatype, p.shape) for p in inputs_for(image, "raw")] == [("image", "BYTES", (1,))]
    assert [p.name for p in inputs_for(text, "raw")] == ["text"]
    assert [p.name for p in inputs_for(vqa, "raw")] == ["image", "question"]
    tensors = inputs_for(image, "tensors")
    assert [(p.name, p.datatype, p.config_type) for p in tensors] == [("pixel_values", "FP32", "TYPE_FP32")]
    assert tensors[0].shape == tuple(image.inputs[0].shape[1:])
    assert {p.name for p in inputs_for(text, "tensors")} == {s.name for s in text.inputs}
    assert [p.config_type for p in OUTPUTS] == ["TYPE_STRING", "TYPE_INT64", "TYPE_FP32", "TYPE_INT64", "TYPE_INT64",
                                                "TYPE_STRING"]
    assert model_names("digits") == {"raw": "digits", "tensors": "digits_tensors"}
    with pytest.raises(ConfigError, match="generative"):
        inputs_for(decoder_bundle.bundle, "raw")
    with pytest.raises(ConfigError, match="mode must be"):
        inputs_for(image, "pixels")


def test_a_batch_answers_as_the_runtime_and_a_bad_row_costs_only_itself(rt):
    images = [png(i) for i in range(5)]
    local = rt.infer(images)
    batch = images[:2] + [b"not an image"] + images[2:]
    out = answer(rt, "raw", {"image": column(batch)})
    assert all(v.shape == (6, 1) for v in out.values())
    good = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(out["class"][good, 0], local.classes)
    np.testing.assert_array_equal(out["block"][good, 0], local.blocks)
    np.testing.assert_array_equal(out["exit_index"][good, 0], local.exits)
    np.testing.assert_allclose(out["confidence"][good, 0], local.confidences, rtol=0, atol=1e-6)
    assert [x.decode() for x in out["label"][good, 0]] == [local.labels[c] for c in local.classes]
    assert out["error"][2, 0].startswith(b"cannot read image") and out["class"][2, 0] == -1
    assert np.isnan(out["confidence"][2, 0]) and out["block"][2, 0] == 0
    assert all(e == b"" for e in out["error"][good, 0])
    # numpy bytes scalars (what Triton hands over) read the same
    again = answer(rt, "raw", {"image": np.array([[images[0]]], dtype=np.bytes_)})
    assert again["class"][0, 0] == local.classes[0]


def test_early_exit_off_is_the_monolithic_graph(rt):
    images = [png(i) for i in range(4)]
    full = rt.infer_full(images)
    out = answer(rt, "raw", {"image": column(images)}, early_exit=False)
    np.testing.assert_array_equal(out["class"][:, 0], full.classes)
    assert (out["exit_index"][:, 0] == -1).all() and (out["block"][:, 0] == rt.bundle.num_blocks).all()


def test_requests_of_one_batch_run_together_and_split_back(rt):
    images = [png(i) for i in range(6)]
    local = rt.infer(images)
    requests = [{"image": column(images[:1])}, {"image": column(images[1:4])}, {"image": column(images[4:])}]
    outs = answer_requests(rt, "raw", requests)
    assert [len(o["class"]) for o in outs] == [1, 3, 2]
    np.testing.assert_array_equal(np.concatenate([o["class"][:, 0] for o in outs]), local.classes)
    arrays = rt.encode(images)
    outs = answer_requests(rt, "tensors", [{"pixel_values": arrays["pixel_values"][:2]},
                                           {"pixel_values": arrays["pixel_values"][2:]}])
    np.testing.assert_array_equal(np.concatenate([o["class"][:, 0] for o in outs]), local.classes)


def test_malformed_batches_say_why_on_every_row(rt):
    out = answer(rt, "raw", {"picture": column([png(0), png(1)])})
    assert out["error"].shape == (2, 1) and all(b"missing input(s) image" in e for e in out["error"][:, 0])
    wide = np.empty((2, 2), dtype=object)
    wide[:] = png(0)
    assert b"one element per row" in answer(rt, "raw", {"image": wide})["error"][0, 0]
    wrong = answer(rt, "tensors", {"pixel_values": np.zeros((1, 3, 5, 5), np.float32)})
    assert wrong["error"][0, 0] and wrong["class"][0, 0] == -1


def test_text_and_question_rows(micro_text_bundle, micro_vqa_bundle):
    with Runtime.load(micro_text_bundle.out) as rt:
        texts = ["what a day", "so sad today", "ok"]
        local = rt.infer(texts)
        out = answer(rt, "raw", {"text": column([t.encode() for t in texts] + [b"\xff\xfe"])})
        np.testing.assert_array_equal(out["class"][:3, 0], local.classes)
        assert b"UTF-8" in out["error"][3, 0]
    with Runtime.load(micro_vqa_bundle.out) as rt:
        images, questions = [png(1, 16), png(2, 16)], ["is it even?", "is it 3?"]
        local = rt.infer(images, question=questions)
        out = answer(rt, "raw", {"image": column(images), "question": column([q.encode() for q in questions])})
        np.testing.assert_array_equal(out["class"][:, 0], local.classes)


def test_runtime_reads_encoded_image_bytes_and_runs_the_full_graph_keeping_errors(rt):
    images = [png(i) for i in range(3)]
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(b))) for b in images]
    np.testing.assert_array_equal(rt.infer(images).classes, rt.infer(arrays).classes)
    kept = rt.infer_full([images[0], bytearray(b"junk"), images[1]], errors="keep")
    assert list(kept.errors) == [1] and "3 bytes" not in str(kept.errors[1])
    np.testing.assert_array_equal(kept.classes[[0, 2]], rt.infer_full([images[0], images[1]]).classes)
    assert kept.blocks.tolist() == [rt.bundle.num_blocks, 0, rt.bundle.num_blocks]
    with pytest.raises(ConfigError, match="errors must be"):
        rt.infer_full(images, errors="ignore")


def test_client_checks_what_needs_no_server():
    assert _bytes_blob([b"ab", b""]) == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    with pytest.raises(ConfigError, match="http://HOST:PORT"):
        Client("ftp://host:1", "m")
    with pytest.raises(ConfigError, match="plain name"):
        Client("http://host:1", "a/b")
    with pytest.raises(ConfigError, match="list"):
        Fleet("http://host:1", "m")
    with pytest.raises(ConfigError, match="twice"):
        Fleet(["http://h:1", "h:1"], "m")
    (port,) = free_ports(1)
    client = Client(f"127.0.0.1:{port}", "m", timeout=2)
    assert not client.ready()
    with pytest.raises(BackendUnavailableError, match="cannot be reached"):
        client.infer([b"x"])
    with pytest.raises(InputError, match="encode frames first"):
        client.infer([np.zeros((4, 4), np.uint8)])
    with pytest.raises(InputError, match="empty batch"):
        client.infer([])
    with pytest.raises(InputError, match="cannot be sent"):
        client.infer({"pixel_values": np.array([["a"]], dtype=object)})
    with pytest.raises(BackendUnavailableError, match="no server of the fleet answered"):
        Fleet([f"http://127.0.0.1:{port}"], "m", timeout=2).infer([b"x"])


def test_serve_without_pytriton_says_how_to_install_it(micro_bundle):
    """The toolchain's environment (numpy 2) has no PyTriton: one line, exit code 6."""
    pytest.importorskip("numpy", minversion="2")
    r = subprocess.run([sys.executable, "-m", "freedeploy", "serve", str(micro_bundle.out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 6 and "freedeploy[serve]" in r.stderr and r.stderr.count("\n") == 1, r.stderr
