"""The published JSON Schemas of every file a bundle holds, generated from the dataclasses that read
them; ``make schema`` writes them under ``docs/schema/``, a test checks they match the code."""

from __future__ import annotations

from runtimes.bundle import Bundle
from runtimes.migrate import SCHEMA_VERSION
from runtimes.records import BUILD_SCHEMA, EngineSet, ValidationReport
from runtimes.schema import dataclass_schema

__all__ = ["schemas"]

BASE = "https://freedeploy.dev/schema/"


def schemas() -> dict[str, dict]:
    """Each schema by its file name under ``docs/schema/``."""
    return {
        "bundle.schema.json": dataclass_schema(Bundle, title=f"freedeploy bundle.json, schema version {SCHEMA_VERSION}",
                                               schema_id=f"{BASE}bundle-v{SCHEMA_VERSION}.json"),
        "build.schema.json": dataclass_schema(EngineSet, title=f"freedeploy engine set build.json, schema {BUILD_SCHEMA}",
                                              schema_id=f"{BASE}build-v{BUILD_SCHEMA}.json"),
        "validation.schema.json": dataclass_schema(ValidationReport, title="freedeploy validation.json",
                                                   schema_id=f"{BASE}validation.json"),
    }
