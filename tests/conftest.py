import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clear_geotrain_env(monkeypatch):
    """No GEOTRAIN_* variable from the caller's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("GEOTRAIN_"):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def repo() -> Path:
    return REPO
