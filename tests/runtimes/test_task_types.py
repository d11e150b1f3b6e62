"""The task as a type: a bundle's head is a ClassifierHead or a DecoderHead, decided once when the manifest is
read; ``Runtime.load`` gives a Classifier or a Generator; one threshold rule everywhere; generation settings as
a value object with enum modes; version-2 generative manifests migrate to the tagged head."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from freedeploy.cli import cli
from runtimes import NEVER, Classifier, Generator, Runtime
from runtimes.backends.fake import FakeBackend, fake_bundle
from runtimes.bundle import ClassifierHead, DecoderHead, load_bundle, save_bundle
from runtimes.errors import BundleError, ConfigError, InputError
from runtimes.genconfig import GenerationConfig, KVRule, Mode
from runtimes.thresholds import check_thresholds, parse_thresholds

HERE = Path(__file__).parent
V1_DIGITS = HERE / "v1_digits_bundle"


# -- the head ---------------------------------------------------------------------------------------------------

def test_a_classifier_bundle_has_a_classifier_head_and_loads_as_a_classifier() -> None:
    b = load_bundle(V1_DIGITS)
    assert isinstance(b.head, ClassifierHead) and b.task == "classify" and len(b.head.labels) == 10
    assert b.expect(ClassifierHead, "eval") is b.head
    with pytest.raises(ConfigError, match="classify bundle: generate\\(\\) takes generate bundles"):
        b.expect(DecoderHead, "generate()")
    rt = Runtime.load(V1_DIGITS)
    assert type(rt) is Classifier and isinstance(rt, Runtime) and rt.labels == b.head.labels
    assert not hasattr(rt, "generate")
    rt.close()
    assert type(Classifier.load(V1_DIGITS)) is Classifier
    with pytest.raises(ConfigError, match="load it with Runtime.load or Classifier.load, not Generator.load"):
        Generator.load(V1_DIGITS)


def test_constructing_a_runtime_gives_the_one_for_the_head() -> None:
    bundle = fake_bundle(num_exits=2)
    rt = Runtime(bundle, FakeBackend(bundle), policy="batch")
    assert type(rt) is Classifier and rt.policy == "batch"


def test_a_generative_bundle_loads_as_a_generator(decoder_bundle) -> None:
    b = load_bundle(decoder_bundle.out)
    assert isinstance(b.head, DecoderHead) and b.task == "generate"
    assert [g.kind for g in b.head.graphs_around()[0]] == ["encode", "prefill"]
    gen = Runtime.load(decoder_bundle.out)
    assert type(gen) is Generator and not hasattr(gen, "infer") and gen.head == b.head
    gen.close()
    with pytest.raises(ConfigError, match="not Classifier.load"):
        Classifier.load(decoder_bundle.out)
    for option, value in (("monitor", 0.1), ("policy", "batch"), ("nonfinite", "flag")):
        with pytest.raises(ConfigError, match="classifier bundles"):
            Runtime.load(decoder_bundle.out, **{option: value})


def test_every_decode_graph_names_the_past_mask_it_reads(decoder_bundle) -> None:
    b = load_bundle(decoder_bundle.out)
    stage = {g.key: [t.stage for t in g.inputs if t.role == "sequence_mask"] for g in b.graphs}
    for s in b.stages:
        assert stage[s.segment.key] == [s.index]
        if s.exit is not None:
            assert stage[s.exit.graph.key] == [s.index + 1]  # it reads the next stage's first layer's cache
    assert stage[b.full.key] == [0] and stage[b.head.prefill.key] == [None]


def _edited(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "bundle.json").read_text())
    change(data)
    (dst / "bundle.json").write_text(json.dumps(data))
    return dst


def _mask_input(graph: dict) -> dict:
    return next(t for t in graph["inputs"] if t["role"] == "sequence_mask")


@pytest.mark.parametrize("change, words", [
    (lambda d: _mask_input(d["stages"][0]["exit"]["graph"]).update(stage=0), "must read one sequence_mask, of stage 1"),
    (lambda d: _mask_input(d["full"]).pop("stage"), "must read one sequence_mask, of stage 0"),
    (lambda d: _mask_input(d["head"]["prefill"]).update(stage=0), "only decode steps and exits read a past mask"),
    (lambda d: d["head"].update(tokenizer_file="elsewhere.json"), "is not one of the bundle's files"),
    (lambda d: d["head"]["encode"].update(kind="prefill"), "head.encode must be a graph of kind 'encode'"),
    (lambda d: d["head"].update(task="classify"), "head"),
    (lambda d: d.update(head={"task": "summarise"}), "'task' must be one of classify, generate"),
])
def test_a_hand_edited_decoder_head_is_one_bundle_error(decoder_bundle, tmp_path: Path, change, words: str) -> None:
    bad = _edited(Path(decoder_bundle.out), tmp_path / "b", change)
    with pytest.raises(BundleError, match="") as info:
        load_bundle(bad, verify=False)
    assert words in str(info.value) and "\n" not in str(info.value)


def _as_version_2(data: dict) -> dict:
    """What freedeploy wrote before the head became a tagged union."""
    v2 = copy.deepcopy(data)
    head = v2.pop("head")
    v2["schema_version"], v2["task"] = 2, head.pop("task")
    v2["labels"] = head.pop("labels", [])
    if v2["task"] == "generate":
        head["encode"]["kind"] = "prefill"
        v2["decoder"] = head
        graphs = [v2["full"], *[s["segment"] for s in v2["stages"]],
                  *[s["exit"]["graph"] for s in v2["stages"] if s["exit"]]]
        for g in graphs:
            _mask_input(g).pop("stage")
    return v2


def test_version_2_generative_manifests_migrate(decoder_bundle, tmp_path: Path) -> None:
    now = load_bundle(decoder_bundle.out)
    def to_v2(data: dict) -> None:
        v2 = _as_version_2(data)
        data.clear()
        data.update(v2)

    old = _edited(Path(decoder_bundle.out), tmp_path / "v2", to_v2)
    assert json.loads((old / "bundle.json").read_text())["schema_version"] == 2
    migrated = load_bundle(old)
    assert migrated.loaded_version == 2 and migrated == now
    save_bundle(migrated, old)
    assert json.loads((old / "bundle.json").read_text()) == json.loads((Path(decoder_bundle.out) / "bundle.json").read_text())


# -- one threshold rule -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, True, "0.5", -math.inf])
def test_one_rule_refuses_what_no_confidence_means(value) -> None:
    with pytest.raises(ConfigError, match="threshold 1 must be in \\[0, 1\\]"):
        parse_thresholds([0.5, value], 2)
    with pytest.raises(BundleError, match="threshold 0 must be in \\[0, 1\\], None \\(exit off\\), found"):
        check_thresholds([value], "bundle.json", BundleError)


def test_never_is_a_run_time_setting_not_a_bundle_value() -> None:
    assert parse_thresholds([0.0, None, NEVER, 1], 4) == [0.0, None, NEVER, 1.0]
    with pytest.raises(ConfigError, match="2 thresholds given; this bundle has 3 exits"):
        parse_thresholds([0.5, 0.5], 3)
    b = load_bundle(V1_DIGITS)
    with pytest.raises(BundleError, match="in \\[0, 1\\]"):
        b.with_thresholds((NEVER, NEVER), None)


def test_never_runs_the_heads_and_takes_no_early_answer() -> None:
    rt = Runtime.load(V1_DIGITS)
    x = {"pixel_values": np.load(HERE / "v1_digits_expected.npz")["pixel_values"][:16]}
    k = len(rt.bundle.exits)
    never, off = rt.infer(x, thresholds=[NEVER] * k), rt.infer(x, thresholds=[None] * k)
    assert (never.exits == k).all() and np.array_equal(never.classes, off.classes)
    assert set(never.timings) > set(off.timings)  # the heads ran
    for bad in ([1.01] * k, [2.0] * k, [0.5]):
        with pytest.raises(ConfigError):
            rt.thresholds = bad
    rt.close()


def test_the_cli_takes_never_and_refuses_numbers_outside_the_rule(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    ok = CliRunner().invoke(cli, ["run", str(V1_DIGITS), str(tmp_path / "a.png"), "--thresholds", "never,off", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)[0]["block"] == load_bundle(V1_DIGITS).num_blocks
    bad = CliRunner().invoke(cli, ["run", str(V1_DIGITS), str(tmp_path / "a.png"), "--thresholds", "0.5,1.01"])
    assert bad.exit_code == 2 and "threshold 1 must be in [0, 1]" in bad.stderr


# -- generation settings ------------------------------------------------------------------------------------------

def test_generation_config_is_a_value_with_enum_modes() -> None:
    cfg = GenerationConfig(mode="speculative", kv="propagate", draft_len=3)
    assert cfg.mode is Mode.SPECULATIVE and cfg.kv is KVRule.PROPAGATE and Mode("exit") is Mode.EXIT
    assert GenerationConfig() == GenerationConfig(mode=Mode.EXIT, kv=KVRule.RECOMPUTE)
    with pytest.raises(ConfigError, match="mode must be one of exit, speculative, full"):
        GenerationConfig(mode="fast")
    with pytest.raises(ConfigError, match="kv must be one of recompute, propagate"):
        GenerationConfig(kv="copy")
    for field, value, error in (("draft_len", 0, ConfigError), ("max_new_tokens", True, InputError),
                                ("draft_block", 2.0, ConfigError)):
        with pytest.raises(error, match=f"{field} must be a positive integer"):
            GenerationConfig(**{field: value})
