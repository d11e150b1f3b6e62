"""Fixtures for serving tests: the serving environment (PyTriton pins numpy<2, so it lives in a
virtual environment of its own, built by ``make serve-env``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def serve_python() -> str:
    """The Python of the serving environment; the test skips, saying how to build it, when there is none."""
    path = os.environ.get("FREEDEPLOY_SERVE_PYTHON") or str(ROOT / ".venv-serve" / "bin" / "python")
    if not Path(path).is_file():
        pytest.skip(f"no serving environment at {path}: build it with 'make serve-env' (make test does)")
    return path


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0

