"""Personal dataset preparation: raw photos of one actor → aligned, filtered, split ``shot_train``/``shot_test``.

``python -m agingnet.prep align | filter | split | report`` (see :mod:`agingnet.prep.__main__`)."""

from agingnet.prep.aligning import run_align
from agingnet.prep.filtering import FilterConfig, run_filter
from agingnet.prep.reporting import run_report
from agingnet.prep.splitting import run_split

__all__ = ["run_align", "run_filter", "run_split", "run_report", "FilterConfig"]
