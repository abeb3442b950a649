"""Ages for ``prep align``: from the file name (``{age}_…``) or an ages CSV; valid ages are integers 0–100.

CSV layouts (a header row naming the columns is optional; without one the column count decides):

* ``file,age``                      e.g. ``still_03.jpg,41``
* ``file,birth_year,photo_year``    e.g. ``still_03.jpg,1962,2003`` → 41

``file`` is the path relative to the input folder or the bare file name.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

MIN_AGE, MAX_AGE = 0, 100
_NAME_AGE = re.compile(r"^(\d+)(?:[_. \-]|$)")


class AgeError(ValueError):
    """An age that is missing or outside 0–100 (the message names the file and value)."""


def check_age(value: str | float | int, where: str) -> int:
    """Integer age in [0, 100] from ``value``; ``AgeError`` naming ``where`` otherwise."""
    try:
        age = float(str(value).strip())
    except ValueError:
        raise AgeError(f"{where}: age {value!r} is not a number") from None
    if age != age or not MIN_AGE <= age <= MAX_AGE:
        raise AgeError(f"{where}: age {value!r} is outside {MIN_AGE}–{MAX_AGE}")
    if age != int(age):
        raise AgeError(f"{where}: age {value!r} is not a whole number of years")
    return int(age)


def age_from_name(name: str) -> int | None:
    """The integer before the first ``_``, ``.``, space or ``-`` of the file name; None when there is none.

    Raises ``AgeError`` when the prefix is a number outside 0–100 (a year, a typo)."""
    m = _NAME_AGE.match(Path(name).name)
    if m is None:
        return None
    return check_age(m.group(1), f"file name {Path(name).name!r}")


def read_ages_csv(path: Path) -> dict[str, int | AgeError]:
    """``{file: age}``; a row with a bad age maps to its ``AgeError`` (reported per file, not fatal).

    Raises ``ValueError`` for an unreadable file or a row of the wrong shape (one line naming file and row)."""
    if not path.is_file():
        raise FileNotFoundError(f"ages CSV not found: {path}")
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read ages CSV {path}: {e}") from e
    rows = [r for r in rows if any(c.strip() for c in r)]
    if rows and rows[0] and rows[0][0].strip().lower() in ("file", "filename", "name", "path"):
        header = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
    else:
        header = None
    table: dict[str, int | AgeError] = {}
    for n, row in enumerate(rows, start=2 if header else 1):
        cells = [c.strip() for c in row]
        where = f"{path.name} line {n} ({cells[0] if cells else ''})"
        if header is not None and len(cells) != len(header):
            raise ValueError(f"ages CSV {path} line {n}: {len(cells)} columns, the header has {len(header)}")
        if len(cells) == 2 and (header is None or header[1] == "age"):
            age: int | AgeError
            try:
                age = check_age(cells[1], where)
            except AgeError as e:
                age = e
        elif len(cells) == 3 and (header is None or header[1:] == ["birth_year", "photo_year"]):
            try:
                born, taken = int(cells[1]), int(cells[2])
                age = check_age(taken - born, where)
            except ValueError as e:
                age = e if isinstance(e, AgeError) else AgeError(
                    f"{where}: birth year {cells[1]!r} / photo year {cells[2]!r} are not whole numbers")
        else:
            raise ValueError(f"ages CSV {path} line {n}: expected 'file,age' or 'file,birth_year,photo_year', "
                             f"got {','.join(cells)!r}")
        table[cells[0]] = age
    return table
