"""JSON <-> frozen dataclasses, checked field by field from the type hints.

Every record a bundle holds (the manifest, certificates, engine sets, validation reports) is a
frozen dataclass; ``from_dict`` builds one from parsed JSON and names the field of the first
problem (``bundle.json: stages[1].exit.threshold must be a number or null, found a string``), and
``to_dict`` writes it back. What the hints can say is checked here: types, required fields,
unknown fields, enumerations, finite numbers, integers that fit in 64 bits. What they cannot
(ranges, cross-field rules) each record checks in its own ``check()``, called after parsing.

Field metadata understood here and by ``runtimes.schema``:
``{"choices": (...)}`` an enumeration; ``{"json": False}`` not serialised (runtime-only);
``{"required": True}`` required in a file although Python has a default (a builder fills it);
``{"omit_none": True}`` left out of the file when None (an optional field added later);
``{"parse": fn, "dump": fn, "schema": {...}}`` a field with its own codec: ``fn(data, where, error)``
(a preprocessing spec, whose ``kind`` says which record it is).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from runtimes.errors import BundleError, FreedeployError

__all__ = ["from_dict", "to_dict", "json_fields"]

T = TypeVar("T")
_INT_LIMIT = 2 ** 63 - 1
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", type(None): "null"}
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def json_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are serialised, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("json", True)]


def from_dict(cls: type[T], data: Any, where: str, error: type[FreedeployError] = BundleError) -> T:
    """Build ``cls`` from JSON data, or raise ``error`` naming the field at fault."""
    return _value(cls, data, where, error, {})


def to_dict(obj: Any) -> Any:
    """A dataclass (or a value holding them) as JSON-ready data; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in json_fields(type(obj)):
            value = getattr(obj, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue  # an optional field older readers never saw: absent, not null
            dump = f.metadata.get("dump")
            out[f.name] = dump(value) if dump and value is not None else to_dict(value)
        return out
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _join(where: str, name: str) -> str:
    """``bundle.json:`` + ``stages`` -> ``bundle.json: stages``; ``x`` + ``y`` -> ``x.y``."""
    return f"{where} {name}" if where.endswith(":") else f"{where}.{name}" if where else name


def _at(where: str) -> str:
    """The path with its last field quoted: ``bundle.json: stages[0].exit: 'threshold'``."""
    if where.endswith(":"):  # the document itself
        return where[:-1]
    prefix, found, path = where.partition(": ")
    if not found:
        prefix, path = "", where
    head, dot, leaf = path.rpartition(".")
    head = f"{prefix}: {head}" if prefix and head else prefix or head
    return f"{head}: '{leaf}'" if head else f"'{leaf}'"


def _same_kind(hint: Any, data: Any) -> bool:
    """Whether ``data`` is the JSON kind ``hint`` wants (an object, a list, a number, ...)."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint) or origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(data, dict)
    if origin in (tuple, list):
        return isinstance(data, list)
    if hint in (int, float):
        return isinstance(data, (int, float)) and not isinstance(data, bool)
    return isinstance(data, hint) if isinstance(hint, type) else True


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list"}.get(type(value), _NAMES.get(type(value), type(value).__name__))


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin in (tuple, list):
        return "a list"
    if origin in (dict, Mapping) or hint is dict:
        return "an object"
    if dataclasses.is_dataclass(hint):
        return "an object"
    if hint is Any:
        return "anything"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _value(hint: Any, data: Any, where: str, error: type[FreedeployError], meta: Mapping[str, Any]) -> Any:
    if "parse" in meta and data is not None:
        return meta["parse"](data, where, error)
    origin = get_origin(hint)
    if hint is Any:
        return data
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if data is None and type(None) in options:
            return None
        problems = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _value(option, data, where, error, meta)
            except FreedeployError as exc:
                problems.append(exc)
        if len(problems) == 1 and _same_kind(next(o for o in options if o is not type(None)), data):
            raise problems[0]  # the right kind of value, wrong inside: the detail says where
        raise error(f"{_at(where)} must be {_describe(hint)}, found {_kind(data)}")
    if dataclasses.is_dataclass(hint):
        return _record(hint, data, where, error)
    if origin is tuple or origin is list:
        if not isinstance(data, list):
            raise error(f"{_at(where)} must be a list, found {_kind(data)}")
        args = get_args(hint)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(data) != len(args):
                raise error(f"{_at(where)} must have {len(args)} entries, found {len(data)}")
            return tuple(_value(a, v, f"{where}[{i}]", error, {}) for i, (a, v) in enumerate(zip(args, data)))
        item = args[0] if args else Any
        items = [_value(item, v, f"{where}[{i}]", error, meta) for i, v in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(data, dict):
            raise error(f"{_at(where)} must be an object, found {_kind(data)}")
        args = get_args(hint)
        item = args[1] if len(args) == 2 else Any
        return {k: _value(item, v, _join(where, str(k)[:60]), error, {}) for k, v in data.items()}
    return _scalar(hint, data, where, error, meta)


def _scalar(hint: Any, data: Any, where: str, error: type[FreedeployError], meta: Mapping[str, Any]) -> Any:
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise error(f"{_at(where)} must be a number, found {_kind(data)}")
        value = float(data) if abs(data) < 1e308 or isinstance(data, float) else math.inf
        if not math.isfinite(value):
            raise error(f"{_at(where)} must be a finite number, found {data!r:.40}")
        data = value
    elif hint is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise error(f"{_at(where)} must be an integer, found {_kind(data)}")
        if abs(data) > _INT_LIMIT:
            raise error(f"{_at(where)} is an integer too large to be meant ({len(str(abs(data)))} digits)")
    elif hint in (str, bool):
        if not isinstance(data, hint) or (hint is str and isinstance(data, bool)):
            raise error(f"{_at(where)} must be {_NAMES[hint]}, found {_kind(data)}")
    else:  # pragma: no cover - a record declared with a type this module does not handle
        raise TypeError(f"unsupported field type {hint!r} at {where}")
    choices = meta.get("choices")
    if choices is not None and data not in choices:
        raise error(f"{_at(where)} must be one of {', '.join(map(str, choices))}, found {data!r:.60}")
    return data


def _record(cls: type, data: Any, where: str, error: type[FreedeployError]) -> Any:
    if not isinstance(data, dict):
        raise error(f"{_at(where)} must be an object, found {_kind(data)}")
    hints, fields = _hints(cls), json_fields(cls)
    known = {f.name for f in fields}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise error(f"{_at(where)} has unknown field(s) {', '.join(repr(str(k)[:40]) for k in unknown[:5])}; "
                    f"known: {', '.join(sorted(known))}")
    values = {}
    for f in fields:
        required = f.metadata.get("required") or (f.default is dataclasses.MISSING
                                                  and f.default_factory is dataclasses.MISSING)
        if f.name not in data:
            if required:
                raise error(f"{where.rstrip(':')}: field '{f.name}' is missing")
            continue
        value = _value(hints[f.name], data[f.name], _join(where, f.name), error, f.metadata)
        if not f.init:  # a constant of the record (a kind tag): it must say what the record is
            if value != f.default:
                raise error(f"{_at(_join(where, f.name))} must be {f.default!r} here, found {value!r:.60}")
            continue
        values[f.name] = value
    try:
        obj = cls(**values)
    except FreedeployError as exc:  # the record's own __post_init__ checks
        raise error(f"{where.rstrip(':')}: {exc}") from None
    check = getattr(obj, "check", None)
    if check is not None:
        check(where, error)
    return obj
