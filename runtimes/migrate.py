"""Older manifests -> the current plan (``migrate``), so bundles exported before keep working.

Version 1 implied the plan by names: graph keys ``segment_<k>`` / ``exit_<k>`` / ``full`` and
tensor roles from ``runtimes.naming``'s rules. Migration writes them out: each graph gets its key
and kind, each tensor its role. Thresholds, certificates, files and checksums are kept as they
are, so predictions and thresholds do not change. A manifest from a newer freedeploy is refused.

Version 2 held the task, the labels and a generative bundle's ``decoder`` at the top level; version 3
holds them in one tagged ``head`` (``task`` plus the labels, or plus the decoder's fields), gives the
encode graph its own kind (``encode``; version 2 called it ``prefill``) and names on each decode
graph's ``sequence_mask`` input the stage whose past mask it reads (``stage``), as version 2's loop
knew by convention: a segment its own stage's, an exit the next stage's, the monolithic step the first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from runtimes import naming
from runtimes.errors import BundleError
from runtimes.roles import EXIT_DECISION, FINAL_DECISION

__all__ = ["SCHEMA_VERSION", "migrate"]

SCHEMA_VERSION = 3  # what this freedeploy writes


def migrate(data: Any, where: Path | str) -> Any:
    """``data`` in the current schema version (a copy when it had to change)."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise BundleError(f"{where}: expected an object at the top level, found {type(data).__name__}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{where}: 'schema_version' must be an integer")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{where} has schema version {version}; this freedeploy reads up to {SCHEMA_VERSION}: "
                          "upgrade freedeploy")
    if version < 1:
        raise BundleError(f"{where} has an invalid schema version {version}")
    if version < SCHEMA_VERSION:
        data = copy.deepcopy(data)
    while version < SCHEMA_VERSION:
        try:
            data = _STEPS[version](data)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise BundleError(f"{where}: version-{version} manifest is malformed and cannot be migrated "
                              f"({type(exc).__name__}: {str(exc)[:120]})") from None
        version += 1
    return data


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    for t in data.get("inputs", []):
        if isinstance(t, dict):
            t["role"] = "model_input"
    data["schema_version"] = 2
    data.setdefault("task", "classify")
    stages = data.get("stages")
    if not isinstance(stages, list):
        return data  # the typed parser names what is missing
    model_inputs = {t["name"] for t in data.get("inputs", []) if isinstance(t, dict)}
    last = len(stages) - 1
    for k, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        final = k == last
        _graph(stage.get("segment"), naming.segment_key(k), "segment", model_inputs,
               naming.FINAL_DECISION if final else (), FINAL_DECISION)
        ex = stage.get("exit")
        if isinstance(ex, dict):
            _graph(ex.get("graph"), naming.exit_key(k), "exit", model_inputs, naming.exit_decision(k), EXIT_DECISION)
    _graph(data.get("full"), naming.FULL, "full", model_inputs, naming.FINAL_DECISION, FINAL_DECISION)
    blocks = [str(s["exit"]["block"]) for s in stages if isinstance(s, dict) and isinstance(s.get("exit"), dict)]
    for cert in (data.get("calibration") or {}).values():
        share = cert.pop("exit_histogram", None) if isinstance(cert, dict) else None
        if isinstance(share, list) and len(share) == len(blocks) + 1:  # per exit in chain order, then final
            cert["exit_share"] = {**dict(zip(blocks, share)), "final": share[-1]}
    return data


def _graph(graph: Any, key: str, kind: str, model_inputs: set[str], decision: tuple[str, ...],
           roles: tuple[str, ...]) -> None:
    if not isinstance(graph, dict):
        return
    graph["key"], graph["kind"] = key, kind
    for t in [*graph.get("inputs", []), *graph.get("outputs", [])]:
        if isinstance(t, dict):
            t["role"] = _role(t.get("name"), model_inputs, decision, roles)


def _role(name: Any, model_inputs: set[str], decision: tuple[str, ...], roles: tuple[str, ...]) -> str:
    if name in model_inputs:
        return "model_input"
    if name in decision:
        return roles[decision.index(name)]
    if naming.is_hidden_name(name):
        return "hidden"
    if name == naming.TOKEN_MASK:
        return "token_mask"
    raise ValueError(f"tensor {name!r:.60} follows none of version 1's naming rules")


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    data["schema_version"] = 3
    task = data.pop("task", "classify")
    labels = data.pop("labels", None)
    decoder = data.pop("decoder", None)
    if task == "generate" and isinstance(decoder, dict):
        head: dict[str, Any] = {"task": task, **decoder}
        if isinstance(head.get("encode"), dict):
            head["encode"]["kind"] = "encode"
        _mask_stages(data)
    elif task == "generate" or decoder is not None:
        raise ValueError("a generative bundle needs both task 'generate' and a 'decoder'")
    else:
        head = {"task": task, "labels": labels}
    data["head"] = head
    return data


def _mask_stages(data: dict[str, Any]) -> None:
    """Write version 2's convention into the plan: which stage's past mask each decode graph reads."""
    def mark(graph: Any, stage: int) -> None:
        for t in graph.get("inputs", []) if isinstance(graph, dict) else []:
            if isinstance(t, dict) and t.get("role") == "sequence_mask":
                t["stage"] = stage

    for k, st in enumerate(data.get("stages") or []):
        if isinstance(st, dict):
            mark(st.get("segment"), k)
            if isinstance(st.get("exit"), dict):
                mark(st["exit"].get("graph"), k + 1)  # it reads the next stage's first layer
    mark(data.get("full"), 0)


_STEPS = {1: _v1_to_v2, 2: _v2_to_v3}  # version -> the step to the next one, in place
