"""A JSON Schema (draft 2020-12) generated from dataclasses, so that a manifest's schema is
written once, as the dataclasses that load it, and a checked-in schema file can be compared
with a fresh generation.

Python types map to schema as follows::

    str, int, float, bool, None     string, integer, number, boolean, null
    X | None, Union[X, Y]           anyOf, in the order written
    tuple[X, ...], list[X]          array of X
    tuple[X, Y]                     array of fixed length (prefixItems)
    Mapping[str, X], dict[str, X]   object with additionalProperties X
    Literal[...], an Enum subclass  enum of the values
    Any                             {} (no constraint)
    a dataclass                     object, emitted once under $defs and used by $ref

A dataclass object lists its fields in order, requires those without a default and allows no
other key. ``field(metadata={"schema": {...}})`` merges extra keywords into a field's schema;
``field(metadata={"json": False})`` leaves a runtime-only field out; ``{"choices": (...)}`` is an
enum; ``{"required": True}`` requires a field that has a default in Python (set by a builder). A class attribute or
classmethod ``__schema_extra__`` returning a dict is merged into the class's object schema (set
it without an annotation, or as a ClassVar, or the dataclass takes it for a field). A field's plain
default (a JSON scalar, tuple or Enum member) is shown as ``default``.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import enum
import json
import math
import re
import types
import typing
from typing import Any

__all__ = ["DRAFT", "dataclass_schema", "dump_schema"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"

_SCALARS: dict[type, str] = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
_ARRAYS = (list, tuple, collections.abc.Sequence)
_OBJECTS = (dict, collections.abc.Mapping)
_NO_DEFAULT = object()


def dataclass_schema(cls: type, *, title: str | None = None, schema_id: str | None = None) -> dict:
    """The JSON Schema document of dataclass ``cls``; nested dataclasses go under ``$defs``.

    Raises TypeError for a type that has no JSON form (a set, a non-str mapping key, ...).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"dataclass_schema needs a dataclass, got {cls!r}")
    builder = _Builder(cls)
    doc: dict = {"$schema": DRAFT}
    if schema_id is not None:
        doc["$id"] = schema_id
    doc["title"] = title if title is not None else cls.__name__
    doc.update(builder.object(cls))
    if builder.defs:
        doc["$defs"] = {name: builder.defs[name] for name in sorted(builder.defs)}
    return doc


def dump_schema(schema: dict) -> str:
    """The schema as stable JSON text: indented by two, keys in their order, a final newline."""
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


class _Builder:
    """Walks the types reachable from one root dataclass, collecting ``$defs``."""

    def __init__(self, root: type) -> None:
        self.root = root
        self.names: dict[type, str] = {}
        self.defs: dict[str, dict] = {}

    def ref(self, cls: type) -> dict:
        if cls is self.root:
            return {"$ref": "#"}
        if cls not in self.names:
            name = cls.__name__
            if name in self.defs:  # two classes of one name: qualify the later one
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{cls.__module__}.{cls.__qualname__}")
            self.names[cls] = name
            self.defs[name] = {}  # reserved first, so that recursive types terminate
            self.defs[name] = {"title": cls.__name__, **self.object(cls)}
        return {"$ref": f"#/$defs/{self.names[cls]}"}

    def object(self, cls: type) -> dict:
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception as e:  # an annotation that does not resolve at module level
            raise TypeError(f"{cls.__qualname__}: cannot resolve its type hints ({e})") from e
        props: dict[str, dict] = {}
        required: list[str] = []
        for f in dataclasses.fields(cls):
            if not f.metadata.get("json", True):
                continue
            where = f"{cls.__qualname__}.{f.name}"
            prop = self.type(hints[f.name], where)
            default = _default(f)
            if default is not _NO_DEFAULT and not f.metadata.get("required"):
                prop["default"] = default
            if "choices" in f.metadata:
                prop["enum"] = list(f.metadata["choices"])
            prop.update(copy.deepcopy(dict(f.metadata.get("schema", {}))))
            props[f.name] = prop
            if f.metadata.get("required") or (f.default is dataclasses.MISSING
                                              and f.default_factory is dataclasses.MISSING):
                required.append(f.name)
        out: dict = {"type": "object", "properties": props}
        if required:
            out["required"] = required
        out["additionalProperties"] = False
        extra = getattr(cls, "__schema_extra__", None)
        if callable(extra):
            extra = extra()
        if extra:
            out.update(copy.deepcopy(dict(extra)))
        return out

    def type(self, tp: Any, where: str) -> dict:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated:
            return self.type(args[0], where)
        if tp is Any or tp is object:
            return {}
        if origin is typing.Union or origin is types.UnionType:
            return {"anyOf": [self.type(a, where) for a in args]}
        if origin is typing.Literal:
            return {"enum": [_json_value(v, where) for v in args]}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _enum(tp, where)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.ref(tp)
        if tp is None or (isinstance(tp, type) and tp in _SCALARS):
            return {"type": _SCALARS[type(None) if tp is None else tp]}
        if tp in _ARRAYS or tp is typing.Tuple or (origin in _ARRAYS and origin is not tuple and not args):
            return {"type": "array"}
        if tp in _OBJECTS or (origin in _OBJECTS and not args):
            return {"type": "object"}
        if origin is tuple and args in ((), ((),)):  # tuple[()]: the empty tuple
            return {"type": "array", "maxItems": 0}
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return {"type": "array", "prefixItems": [self.type(a, where) for a in args],
                    "minItems": len(args), "maxItems": len(args)}
        if origin in _ARRAYS:
            return {"type": "array", "items": self.type(args[0], where)}
        if origin in _OBJECTS:
            if args[0] is not str:
                raise TypeError(f"{where}: JSON object keys are strings, not {args[0]!r}")
            return {"type": "object", "additionalProperties": self.type(args[1], where)}
        raise TypeError(f"{where}: no JSON Schema for type {tp!r}")


def _json_value(v: Any, where: str) -> Any:
    """A Literal or Enum value, or a default, as JSON; TypeError when it has no JSON form."""
    if isinstance(v, enum.Enum):
        v = v.value
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return v
    if isinstance(v, (tuple, list)):
        return [_json_value(x, where) for x in v]
    raise TypeError(f"{where}: value {v!r} has no JSON form")


def _enum(cls: type[enum.Enum], where: str) -> dict:
    values = [_json_value(m.value, f"{where} ({cls.__name__})") for m in cls]
    if all(isinstance(v, str) for v in values):
        return {"type": "string", "enum": values}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return {"type": "integer", "enum": values}
    return {"enum": values}


def _default(f: dataclasses.Field) -> Any:
    """A field's plain default as JSON, for documentation; _NO_DEFAULT for factories and objects."""
    if f.default is dataclasses.MISSING:
        return _NO_DEFAULT
    try:
        return _json_value(f.default, f.name)
    except TypeError:
        return _NO_DEFAULT
