"""CSV tables keyed by case id: the group of each scan (``case_id,group``) and the order in which
reviewed cases arrived (``case_id[,time]``).

Format: UTF-8 text, comma-separated, one header row naming the columns (``case_id`` first), one row per
case. Cells are stripped of surrounding white space; empty lines are skipped. A case id may appear only
once. Case ids are matched exactly as :func:`ConformalSegLib.io.dataset.case_id` derives them from file
names (``case01`` for ``case01.nii.gz`` and ``case01_probs.nii.gz``).

Every problem (missing file, missing column, empty cell, duplicate case id) raises
:class:`~ConformalSegLib.common.errors.ConformalSegError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
from os import PathLike
from pathlib import Path

from ..common.errors import ConformalSegError

CASE_COLUMN = "case_id"


def read_case_table(
    path: str | PathLike[str], columns: tuple[str, ...], *, optional: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    """Rows of a case table (dicts with ``case_id``, every column of ``columns`` and those of
    ``optional`` present in the header), in file order. See the module docstring for the format."""
    path = Path(path)
    if not path.is_file():
        raise ConformalSegError("case table not found", path=path, fix="check the path of the CSV file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConformalSegError(f"cannot read the case table ({exc})", path=path, fix="save it as UTF-8 CSV") from exc
    reader = csv.reader(line for line in text.splitlines() if line.strip())
    header = [cell.strip() for cell in next(reader, [])]
    wanted = (CASE_COLUMN, *columns)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ConformalSegError(
            f"the case table has no {', '.join(repr(c) for c in missing)} column "
            f"(header: {','.join(header) or 'none'})",
            path=path,
            fix=f"start the file with the header line {','.join(wanted)}",
        )
    keep = [c for c in (*wanted, *optional) if c in header]
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for line_number, cells in enumerate(reader, start=2):
        row = {c: (cells[header.index(c)].strip() if header.index(c) < len(cells) else "") for c in keep}
        empty = [c for c in wanted if not row[c]]
        if empty:
            raise ConformalSegError(
                f"line {line_number}: empty {', '.join(empty)}",
                path=path,
                fix="fill every cell of the required columns",
            )
        case = row[CASE_COLUMN]
        if case in seen:
            raise ConformalSegError(
                f"case id {case!r} appears twice (lines {seen[case]} and {line_number})",
                path=path,
                fix="keep one row per case",
            )
        seen[case] = line_number
        rows.append(row)
    if not rows:
        raise ConformalSegError("the case table has no rows", path=path, fix="add one row per case after the header")
    return rows


def read_groups(path: str | PathLike[str]) -> dict[str, str]:
    """``case id -> group`` from a ``case_id,group`` table."""
    return {row[CASE_COLUMN]: row["group"] for row in read_case_table(path, ("group",))}


def read_order(path: str | PathLike[str]) -> list[tuple[str, str]]:
    """``(case id, time)`` in the order of the rows of a ``case_id[,time]`` table (time ``""`` when absent)."""
    return [(row[CASE_COLUMN], row.get("time", "")) for row in read_case_table(path, (), optional=("time",))]
