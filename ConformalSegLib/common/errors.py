"""User-facing errors and warnings.

Every failure a user can cause (bad file, wrong parameter, too little data) raises
:class:`ConformalSegError`, whose message names the offending file (when there is one) and the fix.
The CLI prints that message alone and exits non-zero; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

from os import PathLike


class ConformalSegError(Exception):
    """An error caused by the user's input, with the file involved and how to fix it."""

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None, fix: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


class CalibrationSetTooSmallWarning(UserWarning):
    """The calibration set is too small for the requested risk level: the conformal quantile is
    infinite, so the result is the trivial (whole image / empty) set. The message says how many
    cases are needed."""


class WholeImageWarning(UserWarning):
    """A finite threshold still selects the whole image: ties at probability 0 (saturated or quantised
    maps, a cascade's zero outside its ROIs) put the calibrated cutoff at 0, and ``prob >= 0`` is every voxel."""
