"""runtimes.schema: the generated JSON Schema accepts what the dataclasses write and rejects the
rest, checked with the jsonschema package."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Union

import pytest

from runtimes.schema import DRAFT, dataclass_schema, dump_schema

jsonschema = pytest.importorskip("jsonschema")


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: Literal["float32", "float16", "int64"]
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class Node:
    """A recursive type: each node may hold children of its own type."""

    label: str
    children: tuple[Node, ...] = ()


@dataclass(frozen=True)
class Exit:
    __schema_extra__: ClassVar[dict] = {"description": "one exit head"}

    position: int = field(metadata={"schema": {"minimum": 1, "description": "block index, 1-based"}})
    threshold: float | None = None


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    name: str
    precision: Precision
    level: Level
    inputs: tuple[Tensor, ...]
    outputs: list[Tensor]
    exits: Mapping[str, Exit]
    files: dict[str, str]
    pair: tuple[int, str]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    note: Optional[str] = None
    either: Union[int, str] = 0
    nothing: None = None
    extra: Any = None
    flag: bool = False
    tree: Node | None = None
    parent: Manifest | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    path: str = field(default="", metadata={"json": False})

    @classmethod
    def __schema_extra__(cls) -> dict:
        return {"$comment": "generated"}


GOOD = Manifest(
    schema_version=2, name="m", precision=Precision.FP16, level=Level.HIGH,
    inputs=(Tensor("x", "float32", ("batch", 3)),), outputs=[Tensor("y", "int64", ("batch",))],
    exits={"0": Exit(2, 0.9), "1": Exit(4)}, files={"onnx/full.onnx": "ab" * 32}, pair=(1, "a"),
    either="s", extra={"any": [1, None]}, flag=True, tree=Node("r", (Node("a"), Node("b", (Node("c"),)))),
    parent=Manifest(1, "p", Precision.FP32, Level.LOW, (), [], {}, {}, (0, "")), tags=("t",))


def to_json(obj: Any) -> Any:
    """What a writer would put in the file: tuples as lists, enums as values, runtime fields dropped."""
    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "path"}
        if isinstance(v, (list, tuple)):
            return [strip(x) for x in v]
        return v.value if isinstance(v, enum.Enum) else v
    return json.loads(json.dumps(strip(dataclasses.asdict(obj))))


SCHEMA = dataclass_schema(Manifest, title="Bundle manifest", schema_id="https://example.org/manifest.json")
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def test_schema_is_a_valid_draft_2020_12_document() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == DRAFT and list(SCHEMA)[:3] == ["$schema", "$id", "title"]
    assert SCHEMA["title"] == "Bundle manifest" and SCHEMA["$id"] == "https://example.org/manifest.json"
    assert dataclass_schema(Tensor)["title"] == "Tensor" and "$id" not in dataclass_schema(Tensor)


def test_the_constructs() -> None:
    props = SCHEMA["properties"]
    assert list(props) == [f.name for f in dataclasses.fields(Manifest) if f.name != "path"]
    assert SCHEMA["required"] == ["schema_version", "name", "precision", "level", "inputs", "outputs", "exits",
                                  "files", "pair"]
    assert SCHEMA["additionalProperties"] is False and SCHEMA["$comment"] == "generated"
    assert props["schema_version"] == {"type": "integer"}
    assert props["precision"] == {"type": "string", "enum": ["fp32", "fp16"]}
    assert props["level"] == {"type": "integer", "enum": [1, 2]}
    assert props["inputs"] == {"type": "array", "items": {"$ref": "#/$defs/Tensor"}}
    assert props["outputs"] == {"type": "array", "items": {"$ref": "#/$defs/Tensor"}}
    assert props["exits"] == {"type": "object", "additionalProperties": {"$ref": "#/$defs/Exit"}}
    assert props["files"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert props["pair"] == {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                             "minItems": 2, "maxItems": 2}
    assert props["mean"]["default"] == [0.5, 0.5, 0.5] and props["mean"]["maxItems"] == 3
    assert props["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    assert props["either"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert props["nothing"]["type"] == "null" and props["extra"] == {"default": None}
    assert props["flag"] == {"type": "boolean", "default": False}
    assert props["parent"]["anyOf"][0] == {"$ref": "#"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}  # no default shown for a factory
    defs = SCHEMA["$defs"]
    assert list(defs) == ["Exit", "Node", "Tensor"]
    assert defs["Tensor"]["properties"]["dtype"] == {"enum": ["float32", "float16", "int64"]}
    assert defs["Tensor"]["properties"]["shape"]["items"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert defs["Node"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert defs["Exit"]["description"] == "one exit head" and defs["Exit"]["required"] == ["position"]
    assert defs["Exit"]["properties"]["position"] == {"type": "integer", "minimum": 1,
                                                      "description": "block index, 1-based"}


def test_output_is_deterministic() -> None:
    text = dump_schema(SCHEMA)
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == dump_schema(dataclass_schema(Manifest, title="Bundle manifest",
                                                schema_id="https://example.org/manifest.json"))
    assert json.loads(text) == SCHEMA


def test_accepts_what_the_dataclasses_write() -> None:
    doc = to_json(GOOD)
    VALIDATOR.validate(doc)
    minimal = {k: doc[k] for k in SCHEMA["required"]}
    VALIDATOR.validate(minimal)


def _mutated(change: Any) -> dict:
    doc = to_json(GOOD)
    change(doc)
    return doc


@pytest.mark.parametrize("change, keyword", [
    (lambda d: d.update(schema_version="2"), "type"),
    (lambda d: d.update(schema_version=2.5), "type"),
    (lambda d: d.update(flag=1), "type"),
    (lambda d: d.update(files={"a": 1}), "type"),
    (lambda d: d.pop("name"), "required"),
    (lambda d: d["exits"]["0"].pop("position"), "required"),
    (lambda d: d.update(unknown=1), "additionalProperties"),
    (lambda d: d.update(path="/x"), "additionalProperties"),
    (lambda d: d["inputs"][0].update(extra=1), "additionalProperties"),
    (lambda d: d.update(precision="int8"), "enum"),
    (lambda d: d.update(level=3), "enum"),
    (lambda d: d["inputs"][0].update(dtype="bool"), "enum"),
    (lambda d: d.update(pair=[1]), "minItems"),
    (lambda d: d.update(pair=[1, "a", 2]), "maxItems"),
    (lambda d: d.update(pair=["a", 1]), "type"),
    (lambda d: d.update(mean=[0.5, 0.5]), "minItems"),
    (lambda d: d["exits"]["1"].update(position=0), "minimum"),
    (lambda d: d["tree"]["children"][1]["children"][0].update(label=3), "type"),
    (lambda d: d["parent"].update(schema_version=None), "type"),
    (lambda d: d.update(note=3), "type"),
    (lambda d: d.update(nothing=0), "type"),
    (lambda d: d["inputs"][0].update(shape=[1.5]), "type"),
])
def test_rejects_bad_documents(change: Any, keyword: str) -> None:
    errors = list(VALIDATOR.iter_errors(_mutated(change)))
    assert errors
    assert keyword in {e.validator for err in errors for e in [err, *(err.context or [])]}


@dataclass
class Unsupported:
    s: set[int]


@dataclass
class BadKeys:
    m: dict[int, str]


@dataclass
class Plain:
    n: int = 0


def test_types_without_json_form_are_refused() -> None:
    with pytest.raises(TypeError, match=r"Unsupported\.s"):
        dataclass_schema(Unsupported)
    with pytest.raises(TypeError, match="keys are strings"):
        dataclass_schema(BadKeys)
    with pytest.raises(TypeError, match="needs a dataclass"):
        dataclass_schema(Plain(1))  # type: ignore[arg-type]
    assert dataclass_schema(Plain)["properties"] == {"n": {"type": "integer", "default": 0}}
    assert "required" not in dataclass_schema(Plain)


class Outer:
    @dataclass(frozen=True)
    class Tensor:
        size: Annotated[int, "bytes"]


@dataclass(frozen=True)
class TwoTensors:
    a: Tensor
    b: Outer.Tensor
    c: Outer.Tensor


def test_classes_of_one_name_get_distinct_defs() -> None:
    schema = dataclass_schema(TwoTensors)
    qualified = f"{Outer.Tensor.__module__}.Outer.Tensor"
    assert list(schema["$defs"]) == ["Tensor", qualified]
    assert schema["properties"]["b"] == schema["properties"]["c"] == {"$ref": f"#/$defs/{qualified}"}
    assert schema["$defs"][qualified]["properties"]["size"] == {"type": "integer"}
    validator = jsonschema.Draft202012Validator(schema)
    good = {"a": {"name": "x", "dtype": "int64", "shape": []}, "b": {"size": 1}, "c": {"size": 2}}
    validator.validate(good)
    assert not validator.is_valid({**good, "b": {"size": "1"}})
