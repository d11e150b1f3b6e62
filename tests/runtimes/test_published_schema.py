"""The JSON Schemas in docs/schema/ are generated from the dataclasses that load the files, match
the code, and accept the golden fixtures (a reader in another language can rely on them)."""

from __future__ import annotations

import json
from pathlib import Path

from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtimes.bundle import load_bundle
from runtimes.errors import BundleError
from runtimes.published import schemas
from runtimes.records import Certificate, EngineSet, ValidationReport, read_json_record
from runtimes.schema import dump_schema

ROOT = Path(__file__).parents[2]
HERE = Path(__file__).parent
DOCS = ROOT / "docs" / "schema"


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((DOCS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", sorted(schemas()))
def test_checked_in_schema_matches_the_code(name: str) -> None:
    assert (DOCS / name).read_text() == dump_schema(schemas()[name]), f"docs/schema/{name} is stale: run `make schema`"


def test_golden_manifests_validate() -> None:
    v = _validator("bundle.schema.json")
    assert not list(v.iter_errors(json.loads((HERE / "golden_bundle_v3" / "bundle.json").read_text())))
    for v1 in ("golden_bundle", "golden_bundle_v2", "v1_digits_bundle"):  # older files validate once migrated
        migrated = json.loads(json.dumps(load_bundle(HERE / v1).to_dict()))
        assert not list(v.iter_errors(migrated)), v1


def test_exported_bundle_and_its_report_validate(micro_bundle) -> None:
    root = Path(micro_bundle.out)
    assert not list(_validator("bundle.schema.json").iter_errors(json.loads((root / "bundle.json").read_text())))
    report = json.loads((root / "validation.json").read_text())
    assert not list(_validator("validation.schema.json").iter_errors(report))
    assert read_json_record(ValidationReport, root / "validation.json").to_dict() == report


def test_version_1_validation_report_reads() -> None:
    report = read_json_record(ValidationReport, HERE / "v1_digits_bundle" / "validation.json")
    assert report.validated and report.chain_parity.equal and report.precision.precision == "fp16"
    assert not list(_validator("validation.schema.json").iter_errors(report.to_dict()))


def test_schema_rejects_what_the_loader_rejects() -> None:
    v = _validator("bundle.schema.json")
    data = json.loads((HERE / "golden_bundle_v3" / "bundle.json").read_text())
    data["full"]["outputs"][0]["role"] = "answer"
    assert list(v.iter_errors(data))
    data = json.loads((HERE / "golden_bundle_v3" / "bundle.json").read_text())
    data["stages"][0]["segment"]["surprise"] = 1
    assert list(v.iter_errors(data))
    data = json.loads((HERE / "golden_bundle_v3" / "bundle.json").read_text())
    data["head"] = {"task": "generate", "labels": ["a"]}  # a decoder head needs its graphs, not labels
    assert list(v.iter_errors(data))


def test_records_round_trip_and_name_the_field() -> None:
    cert = Certificate(key="onnxruntime-fp32", thresholds=(0.5, None), n=10, epsilon=0.05, mode="labels",
                       method="learn-then-test", delta=0.02, exit_share={"2": 0.5, "4": 0.25, "final": 0.25})
    assert Certificate.from_dict(json.loads(json.dumps(cert.to_dict()))) == cert
    bad = {**cert.to_dict(), "n": "ten"}
    with pytest.raises(BundleError, match="'n' must be an integer"):
        Certificate.from_dict(bad, "cert:")
    with pytest.raises(BundleError, match="'mode' must be one of label-free, labels"):
        Certificate.from_dict({**cert.to_dict(), "mode": "vibes"}, "cert:")
    build = {"schema": 1, "key": "k", "precision": "fp16", "tensorrt_version": "10.3.0",
             "graphs": {"segment_0": {"onnx": "onnx/fp16/segment_0.onnx", "onnx_sha256": "0" * 64,
                                      "plan": "../escape.plan", "plan_sha256": "0" * 64}}}
    with pytest.raises(BundleError, match="must be a file name inside the engine set"):
        EngineSet.from_dict(build, "build.json:")
    with pytest.raises(BundleError, match="upgrade freedeploy"):
        EngineSet.from_dict({**build, "schema": 2, "graphs": {}}, "build.json:")


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                               st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=4),
                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=16)


@st.composite
def _records(draw: st.DrawFn) -> tuple[type, Any]:
    """A real record as JSON with a few values replaced by arbitrary JSON, or arbitrary JSON."""
    cls, base = draw(st.sampled_from(list(_BASES.items())))
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(0, 3))):
        node = doc
        for _ in range(draw(st.integers(0, 2))):
            if isinstance(node, dict) and node:
                key = draw(st.sampled_from(sorted(node)))
                if isinstance(node[key], (dict, list)):
                    node = node[key]
        if isinstance(node, dict) and node:
            node[draw(st.sampled_from(sorted(node)))] = draw(_json)
    return cls, doc if draw(st.integers(0, 5)) else draw(_json)


_BASES = {ValidationReport: json.loads((HERE / "v1_digits_bundle" / "validation.json").read_text()),
          Certificate: json.loads((HERE / "v1_digits_bundle" / "bundle.json").read_text())["calibration"][
              "onnxruntime-fp32"] | {"exit_share": {"1": 0.5, "final": 0.5}},
          EngineSet: {"schema": 1, "key": "k", "precision": "fp16", "tensorrt_version": "10.3.0",
                      "graphs": {"full": {"onnx": "onnx/fp16/full.onnx", "onnx_sha256": "0" * 64, "plan": "full.plan",
                                          "plan_sha256": "0" * 64, "profile": {"x": {"min": [1], "opt": [1], "max": [4]}}}}}}
_BASES[Certificate].pop("exit_histogram")


@settings(max_examples=400, deadline=None)
@given(case=_records())
def test_records_raise_only_bundle_errors(case) -> None:
    cls, doc = case
    try:
        record = cls.from_dict(doc, "record:")
    except BundleError:
        return
    assert cls.from_dict(json.loads(json.dumps(record.to_dict())), "again:") == record
