"""A generative bundle: every graph against torch, the chained ONNX greedy decoder against the torch
reference (exits off, on, and every exit path, for both KV rules), the plan's contract, and the
TensorRT profiles over the decoder's named axes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from exporters.config import ExportConfig
from exporters.decoder_export import _decode_parity, export_decoder_bundle, graph_macs
from runtimes.backends.onnxruntime import OrtBackend
from runtimes.bundle import MANIFEST, DecoderHead, load_bundle
from runtimes.decoding import greedy_decode
from runtimes.genconfig import KVRule
from runtimes.errors import BundleError, ConfigError, InputError
from runtimes.preprocess import ImageSpec
from runtimes.records import ValidationReport, read_json_record
from tests.conftest import DECODER_EOS, DECODER_VOCAB, decoder_reference

V, EOS = DECODER_VOCAB, DECODER_EOS


@pytest.fixture(scope="module")
def model(tiny_decoder):
    return tiny_decoder


@pytest.fixture(scope="module")
def data(decoder_data):
    return decoder_data


@pytest.fixture(scope="module")
def exported(decoder_bundle):
    return decoder_bundle


def _reference(model):
    return decoder_reference(model)


def _by_rule(model):
    """The torch reference with either KV rule."""
    from freedeploy.generative.decode import greedy

    return lambda image, prompt, max_new, thresholds, kv: greedy(model, image, prompt, max_new, EOS,
                                                                 thresholds=thresholds, kv=kv)


def test_every_graph_matches_torch_and_greedy_decoding_is_token_for_token(exported) -> None:
    v = exported.validation
    assert v.validated and not v.failures and v.max_abs_diff < 1e-4
    assert {r.batch for r in v.files} == {1, 2} and len({r.past for r in v.files}) == 2
    b = exported.bundle
    assert {r.file for r in v.files} == {b.graph(k).files["fp32"] for k in b.graph_keys()}
    d = v.decoding
    assert d.sequences == 5 and d.mismatched_exits_off == 0 and d.mismatched_exits_on == 0 and d.tokens_exits_off > 5
    assert d.kv == "recompute" and d.mismatched_propagate == 0 and d.tokens_propagate > 5  # both KV rules, checked
    assert set(d.exits_taken) == {"1", "2", "final"} and sum(d.exits_taken.values()) == d.tokens_exits_on
    assert d.graph_macs == graph_macs(b) and d.graph_macs["full_step"] > d.graph_macs["step_0"] > 0
    assert read_json_record(ValidationReport, exported.out / "validation.json") == v


def test_the_plan_names_every_layer_of_every_graph(exported) -> None:
    b = exported.bundle
    assert b.task == "generate" and isinstance(b.head, DecoderHead) and b.head.num_layers == 4
    assert b.graph_keys() == ["encode", "prefill", "step_0", "exit_0", "step_1", "exit_1", "step_2", "fill_1", "fill_2",
                              "full_step"]
    layers = lambda g, role: sorted(t.layer for t in (*g.inputs, *g.outputs) if t.role == role)  # noqa: E731
    assert [layers(s.segment, "past_keys") for s in b.stages] == [[0], [1], [2, 3]]
    assert [layers(s.exit.graph, "past_keys") for s in b.stages[:-1]] == [[1], [2]]  # the next layer's cache
    assert [layers(f, "new_values") for f in b.head.fills] == [[1], [2, 3]]
    assert layers(b.full, "past_values") == layers(b.head.prefill, "new_keys") == [0, 1, 2, 3]
    shapes = {t.name: t.shape for t in b.full.inputs}
    assert shapes["past_key_0"] == ("batch", "past", 128) and shapes["token_ids"] == ("batch", "new")


@pytest.mark.parametrize("kv", list(KVRule))
@pytest.mark.parametrize("thresholds", [[0.0, None], [None, 0.0], [0.0, 0.0], [0.5, 0.3]])
def test_every_exit_path_equals_torch_for_either_kv_rule(exported, model, data, thresholds, kv) -> None:
    backend = OrtBackend(exported.bundle, "fp32")
    tokens, mismatched, taken = _decode_parity(exported.bundle, _by_rule(model), backend, data, thresholds, kv)
    assert mismatched == 0 and tokens > 0
    if thresholds[0] == 0.0:
        assert taken["1"] > 0  # tokens left at the exit at block 1


def test_the_recompute_check_fails_for_the_other_rule(exported, model, data) -> None:
    """Parity is token for token: a reference that propagates does not pass for the chain that
    recomputes, nor the reverse (on these samples, twelve tokens long, the rules write different text)."""
    backend, b, longer = OrtBackend(exported.bundle, "fp32"), exported.bundle, replace(data, max_new=12)
    swapped = {KVRule.RECOMPUTE: KVRule.PROPAGATE, KVRule.PROPAGATE: KVRule.RECOMPUTE}
    wrong = lambda image, prompt, max_new, thresholds, kv: _by_rule(model)(  # noqa: E731
        image, prompt, max_new, thresholds, kv=swapped[kv])
    for kv in KVRule:
        assert _decode_parity(b, wrong, backend, longer, [0.04, 0.04], kv)[1] > 0
        assert _decode_parity(b, _by_rule(model), backend, longer, [0.04, 0.04], kv)[1] == 0


def test_a_reference_without_kv_rules_checks_recomputation_by_exactness(exported, model, data) -> None:
    """A torch reference that only propagates still validates recomputation: against the full model's
    greedy text, the first token that differs must have left at an exit."""
    backend, b = OrtBackend(exported.bundle, "fp32"), exported.bundle
    tokens, mismatched, _ = _decode_parity(b, _reference(model), backend, data, [0.0, 0.0], KVRule.RECOMPUTE)
    assert tokens > 0 and mismatched == 0


def test_decoding_counts_calls_and_refuses_too_long_requests(exported, data) -> None:
    backend, b = OrtBackend(exported.bundle, "fp32"), exported.bundle
    out = greedy_decode(backend, b, data.images[:1], data.prompts[0], 4, thresholds=[0.0, None], kv="propagate")
    # encode + prefill, then per token after the first: step 0, exit 0 and the two fills
    assert out.blocks[0] == 4 and out.calls == 2 + 4 * (len(out.tokens) - 1)
    assert out.graph_calls["fill_1"] == out.graph_calls["fill_2"] == len(out.tokens) - 1
    out = greedy_decode(backend, b, data.images[:1], data.prompts[0], 4, thresholds=[0.0, None])
    # recomputation: step 0 and exit 0 only; the skipped layers wait (the sequence ends before a deep token)
    assert out.calls == 2 + 2 * (len(out.tokens) - 1) and "fill_1" not in out.graph_calls
    with pytest.raises(ConfigError, match="kv"):
        greedy_decode(backend, b, data.images[:1], data.prompts[0], 4, kv="lazy")
    with pytest.raises(InputError, match="positions"):
        greedy_decode(backend, b, data.images[:1], data.prompts[0], 40)
    with pytest.raises(ConfigError, match="thresholds"):
        greedy_decode(backend, b, data.images[:1], data.prompts[0], 3, thresholds=[0.5])


def _edit(bundle_dir: Path, tmp_path: Path, change) -> Path:
    out = shutil.copytree(bundle_dir, tmp_path / "edited")
    data = json.loads((out / MANIFEST).read_text())
    change(data)
    (out / MANIFEST).write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("what, change, message", [
    ("a key tensor without its layer", lambda d: d["stages"][0]["segment"]["inputs"][3].pop("layer"), "layer"),
    ("an exit reading another layer", lambda d: [t.update(layer=0) for t in d["stages"][0]["exit"]["graph"]["inputs"]
                                                 if t["role"] in ("past_keys", "past_values")], "layer"),
    ("a fill missing", lambda d: d["head"]["fills"].pop(), "fill"),
    ("a layer past the depth", lambda d: d["full"]["inputs"][3].update(layer=99), "layer"),
    ("a negative layer", lambda d: d["full"]["inputs"][3].update(layer=-1), "layer"),
    ("no room for the prefix", lambda d: d["head"].update(max_positions=4), "positions"),
    ("a decoder head tagged as a classifier", lambda d: d["head"].update(task="classify"), "unknown field"),
    ("token ids outside the vocabulary", lambda d: d["head"].update(eos_id=99), "vocabulary"),
])
def test_a_broken_generative_plan_is_one_bundle_error(exported, tmp_path: Path, what, change, message) -> None:
    edited = _edit(exported.out, tmp_path, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(edited)


def test_tensorrt_profiles_cover_the_decoder_axes(exported) -> None:
    from exporters.tensorrt import profile_for

    b = exported.bundle
    dims = b.head.axis_ranges()
    assert dims["past"][2] == 31 and dims["new"][1] == 1 and dims["prompt"][2] == 32 - b.head.num_query_tokens
    profile = profile_for(b, "step_2")
    assert profile["past_key_3"] == ((1, 1, 128), (1, dims["past"][1], 128), (b.batch.max, 31, 128))
    assert profile["hidden_2"][2] == (b.batch.max, 32, 128)


def test_other_targets_are_refused_for_decoders(model, data, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp16 / int8"):
        export_decoder_bundle(model, data=data, out=tmp_path / "x", cfg=replace(ExportConfig(), target="trt-fp16"),
                              preprocess=ImageSpec((32, 32)), tokens={"bos": 1, "eos": EOS, "pad": 0, "vocab_size": V},
                              tokenizer_file=tmp_path / "t.json", provenance={}, reference=_reference(model))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_engines_build_for_every_decoder_graph_with_its_profile(exported, tmp_path: Path, version: str) -> None:
    """Against the TensorRT 10.3 / 11.0 API fakes: every graph of the generative bundle builds, each
    with one optimization profile covering batch, prompt, new tokens and past length."""
    from exporters import tensorrt as ex
    from tests.fakes.fake_tensorrt import installed_fakes

    bundle_dir = shutil.copytree(exported.out, tmp_path / "b")
    with installed_fakes(version):
        res = ex.build_engines(bundle_dir, "fp32")
    b = load_bundle(bundle_dir)
    assert set(res.plans) == set(b.graph_keys())
    build = json.loads((res.directory / "build.json").read_text())
    recorded = build["graphs"]["step_1"]["profile"]
    step = ex.profile_for(b, "step_1")
    assert recorded["past_key_1"] == {"min": list(step["past_key_1"][0]), "opt": list(step["past_key_1"][1]),
                                      "max": list(step["past_key_1"][2])}
    assert step["past_key_1"][2][1] == b.head.max_positions - 1 and step["past_mask"][0] == (1, 1)
    assert build["graphs"]["prefill"]["profile"]["prompt_ids"]["max"][1] == \
        b.head.max_positions - b.head.num_query_tokens
