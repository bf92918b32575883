"""The panel's drift badge: what the reviewed-case logs of the loaded profiles say (Slicer-free).

``conformalseg monitor --profile P.json ...`` writes ``P.monitor/monitor.json``; :func:`drift_badge` reads
that log for every loaded profile (:func:`ConformalSegLib.conformal.monitoring.drift_status`) and returns
the text the panel shows under the guarantee, and whether it is a warning (a shift was detected, or the
log belongs to another version of the profile). Profiles without a log add nothing. The result is cached
on the files' modification times, so calling it on every slider move reads nothing new.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.conformal.monitoring import LOG_NAME, default_log_dir, drift_status


def _mtime(path: Path) -> float | None:
    try:
        return os.path.getmtime(path)
    except OSError:
        return None


@lru_cache(maxsize=32)
def _status(profile: str, profile_mtime: float | None, log_mtime: float | None) -> tuple[str, bool]:
    try:
        status = drift_status(profile)
    except (ConformalSegError, OSError, KeyError, TypeError, ValueError) as exc:
        return f"Drift log unreadable: {exc}", True
    return status.text, status.warning


def drift_badge(profile_paths: Iterable[str | os.PathLike[str]]) -> tuple[str, bool]:
    """``(text, warning)`` for the loaded profiles (``("", False)`` when none has a monitoring log)."""
    lines, warning = [], False
    for path in profile_paths:
        path = Path(path)
        log = default_log_dir(path) / LOG_NAME
        if not log.is_file():
            continue
        text, warn = _status(str(path), _mtime(path), _mtime(log))
        lines.append(f"{path.name}: {text}")
        warning = warning or warn
    return "\n".join(lines), warning
