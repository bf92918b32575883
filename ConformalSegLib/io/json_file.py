"""Reading the project's JSON files (model cards, cascade configs, profiles) with errors that name the file.

Profiles are also read through :func:`read_bounded_json` (size, nesting depth and integer length
bounded, so a crafted file gives a message instead of a ``RecursionError`` or a 5,000-digit integer)
and carry a content checksum (:func:`content_sha256`) over every field, so a hand edit of ``n``,
epsilon, alpha, a threshold, a lambda or the method is refused (:func:`verify_content_checksum`);
:func:`sibling_file` resolves a file name stored in a profile only as a plain name beside it.
"""

from __future__ import annotations

import hashlib
import json
from os import PathLike
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError

#: Largest JSON file read as a profile (bytes), deepest nesting and longest integer literal accepted.
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40
#: The profile key holding :func:`content_sha256`.
CHECKSUM_KEY = "content_sha256"
EDITED = "the profile's content does not match its checksum (edited by hand?)"


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
    except OSError as exc:
        raise error(f"cannot read the {what} ({exc.strerror or exc})", path=path, fix=fix) from exc


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (scanned without recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped = not escaped and char == "\\"
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def read_bounded_json(
    path: str | PathLike[str], what: str, fix: str, error: type[ConformalSegError] = ConformalSegError
) -> Any:
    """:func:`read_json_file` with the size, depth and integer bounds of the module docstring."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # read_json_file says what is wrong
    if size > MAX_JSON_BYTES:
        raise error(f"{what} is {size} bytes, more than a profile can be ({MAX_JSON_BYTES} bytes)", path=path, fix=fix)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        text = None
    if text is not None and _depth(text) > MAX_JSON_DEPTH:
        raise error(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", path=path, fix=fix)
    if text is None:
        return read_json_file(path, what, fix, error)
    try:
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise error(
            f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", path=path, fix=fix
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} holds an unreadable value ({exc})", path=path, fix=fix) from exc


def content_sha256(doc: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``doc`` without its :data:`CHECKSUM_KEY`."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def with_content_checksum(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` plus its :data:`CHECKSUM_KEY`; the checksum survives a JSON round trip (floats print exactly)."""
    return {**doc, CHECKSUM_KEY: content_sha256(json.loads(json.dumps(doc, allow_nan=False)))}


def verify_content_checksum(
    doc: dict[str, Any], path: str | PathLike[str], fix: str, error: type[ConformalSegError] = ConformalSegError
) -> None:
    """Raise ``error`` ("edited by hand?") unless ``doc`` carries the checksum of its own content."""
    stored = doc.get(CHECKSUM_KEY)
    if stored is None:
        raise error(
            f"the profile has no '{CHECKSUM_KEY}' (written by an older ConformalSeg, or edited by hand?)",
            path=path,
            fix=fix,
        )
    if stored != content_sha256(doc):
        raise error(EDITED, path=path, fix=fix)


def sibling_file(
    profile_path: Path, name: Any, what: str, fix: str, error: type[ConformalSegError] = ConformalSegError
) -> Path:
    """The file ``name`` beside ``profile_path``: ``name`` must be a plain file name (no folder, no ``..``)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise error(f"the {what} name {name!r} is not a plain file name beside the profile", path=profile_path, fix=fix)
    return profile_path.with_name(name)
