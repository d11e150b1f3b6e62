"""Property-based fuzzing of bundle.json: whatever the manifest holds, loading either succeeds or
raises BundleError; nothing else escapes."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtimes.bundle import Bundle, load_bundle
from runtimes.errors import BundleError

GOLDEN = Path(__file__).parent / "golden_bundle"  # schema version 1: migrated on load
GOLDEN_V2 = Path(__file__).parent / "golden_bundle_v2"
BASES = [json.loads((g / "bundle.json").read_text()) for g in (GOLDEN, GOLDEN_V2)]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["../x", "/etc/passwd", "onnx/full.onnx", "\x00", "batch",
                                                           "fp32", "float32", "a" * 64]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


PATHS = [_paths(base) for base in BASES]
NASTY_PATHS = st.sampled_from(["\x00", "onnx/\x00.onnx", "a" * 5000, "../up", "/abs", "onnx/../../etc", "C:\\x",
                               "~/x", ".", "", "onnx//full.onnx", "onnx/full.onnx/", "bundle.json"])


@st.composite
def manifests(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # an arbitrary document
    version = draw(st.integers(0, 1))
    doc = json.loads(json.dumps(BASES[version]))
    if draw(st.integers(0, 4)) == 0:  # a listed file with a hostile name
        doc["files"][draw(NASTY_PATHS)] = draw(st.sampled_from(["0" * 64, "x"]))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(PATHS[version]))
        if not path:
            continue
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    return doc


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=manifests(), raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_only_bundle_errors_escape(doc: Any, raw: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(GOLDEN, Path(tmp) / "b"))
        if raw is not None and raw[:1] == b"\x00":
            (root / "bundle.json").write_bytes(raw)  # not even text
        else:
            (root / "bundle.json").write_text(json.dumps(doc, allow_nan=True))
        try:
            assert isinstance(load_bundle(root), Bundle)
        except BundleError:
            pass
