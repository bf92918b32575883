"""Reading the project's small JSON files (model cards, cascade configs) with errors that name the file."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError


def read_json_file(
    path: str | PathLike[str], what: str, fix: str, error: type[ConformalSegError] = ConformalSegError
) -> Any:
    """Parse the JSON file ``path`` (a ``what``, e.g. "model card"); a missing file, a folder, bad
    UTF-8 or bad JSON raises ``error`` naming the file, the line and column, and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise error(
            f"{what} not found" if not path.exists() else f"{what} is not a file",
            path=path,
            fix=f"give the path of a {what} JSON file",
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not a UTF-8 text file", path=path, fix=fix) from exc
    except json.JSONDecodeError as exc:
        raise error(
            f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", path=path, fix=fix
        ) from exc
