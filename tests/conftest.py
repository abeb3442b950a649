"""Shared test settings. Tests run on CPU with tiny networks; nothing here reads outside the repository
(files a test needs live in tests/data, which each test file locates from its own path)."""

from __future__ import annotations

import os

os.environ.setdefault("HYDRA_FULL_ERROR", "1")
