"""Shared fixtures. Tests run on CPU with tiny networks; nothing here reads outside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HYDRA_FULL_ERROR", "1")
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
