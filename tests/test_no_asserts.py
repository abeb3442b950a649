"""Input checks must survive ``python -O``: the package holds no ``assert`` statement, and shape checks at the
network entry points raise real exceptions naming what they expected."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "agingnet"


def test_the_package_has_no_assert_statement():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [f"{path.relative_to(PACKAGE.parent)}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    assert not found, found


def test_entry_point_shape_checks_raise_value_errors():
    from agingnet.data.sampler import TargetAgeSampler
    from agingnet.nn.aging_net import add_age_channel
    from agingnet.nn.dex import DEX

    with pytest.raises(ValueError, match=r"expected \[B,3,H,W\], got \(2, 4, 8, 8\)"):
        add_age_channel(torch.zeros(2, 4, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"ages must be \[B\], got \(3,\)"):
        add_age_channel(torch.zeros(2, 3, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match=r"DEX expects \[B,3,H,W\]"):
        DEX(widths=(2, 2, 2, 2, 2), fc_dim=4, input_size=32)(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"input ages must be \[B\]"):
        TargetAgeSampler().sample(torch.zeros(2, 2))
