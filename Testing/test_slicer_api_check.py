"""The Slicer-facing code passes the static Slicer API checker against Slicer main and 5.12.3.

``../shared/slicer-api/check_slicer_api.py`` checks every .py and .ui file under ``ConformalSeg/`` and
``ConformalSegLib/`` against an index built from Slicer's own source (see its README). Required: no
error against either index, and no warning that is not explained in :data:`EXPLAINED_WARNINGS`.
Skipped cleanly when ``shared/`` is not beside the repository.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKER = SHARED / "slicer-api" / "check_slicer_api.py"
INDEXES = ("slicer_api.json", "slicer_api_5.12.3.json")
#: (path regex, code, message regex) -> why the warning is fine. Empty: there is no warning today.
EXPLAINED_WARNINGS: dict[tuple[str, str, str], str] = {}
FINDING = re.compile(r"^(?P<path>.+?):(?P<line>\d+): (?P<level>error|warning): (?P<message>.*) \[(?P<code>SA\d+)\]$")


@pytest.mark.parametrize("index", INDEXES)
def test_slicer_api_checker_is_clean(index):
    if not CHECKER.is_file() or not (SHARED / "slicer-api" / index).is_file():
        pytest.skip(f"the Slicer API checker or its index {index} is not available at {SHARED / 'slicer-api'}")
    proc = subprocess.run(
        [sys.executable, str(CHECKER), str(SHARED / "slicer-api" / index), "ConformalSeg/", "ConformalSegLib/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    findings = [FINDING.match(line) for line in proc.stdout.splitlines() if line.strip()]
    unparsed = [line for line, m in zip(proc.stdout.splitlines(), findings) if line.strip() and m is None]
    assert not unparsed, unparsed
    errors = [m.group(0) for m in findings if m and m.group("level") == "error"]
    assert not errors, "\n".join(errors)
    unexplained = [
        m.group(0)
        for m in findings
        if m
        and m.group("level") == "warning"
        and not any(
            re.search(p, m.group("path")) and c == m.group("code") and re.search(r, m.group("message"))
            for p, c, r in EXPLAINED_WARNINGS
        )
    ]
    assert not unexplained, "\n".join(unexplained)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = re.search(r"checked (\d+) file", proc.stderr)
    assert checked and int(checked.group(1)) >= 10, proc.stderr  # ConformalSeg.py, the .ui, the packages
