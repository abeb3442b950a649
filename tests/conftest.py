"""Shared test settings. Tests run on CPU with tiny networks; nothing here reads outside the repository or writes
into it (files a test needs live in tests/data, which each test file locates from its own path)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HYDRA_FULL_ERROR", "1")
# paths.data_dir of every run a test starts (in this process or a subprocess) that does not set its own: debug
# runs write the aging world's actor there (debug_world_actor), never into the repository's data/ folder
if "AGINGNET_DATA_DIR" not in os.environ:
    _scratch = tempfile.mkdtemp(prefix="agingnet-tests-")
    atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
    os.environ["AGINGNET_DATA_DIR"] = str(Path(_scratch) / "data")
