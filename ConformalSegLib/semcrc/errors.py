"""Errors and warnings of the interval (sem-CRC) methods.

Every error is a :class:`~ConformalSegLib.common.errors.ConformalSegError` (the CLI prints its message and
exits with status 2), so a message always names the offending input and says how to fix it.
"""

from __future__ import annotations

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError


class IntervalInputError(ConformalSegError):
    """Bad interval input: NaN/Inf voxels, mismatched shapes, crossing quantiles, bad labels."""


class IntervalCalibrationError(ConformalSegError):
    """The calibration cannot run as asked: too few scans, a bad split, a bad parameter."""


class IntervalProfileError(ConformalSegError):
    """An interval profile file is missing, corrupt or does not fit the data it is applied to."""


class UncontrollableRiskWarning(CalibrationSetTooSmallWarning):
    """No ``omega`` in the allowed range brings the CRC-adjusted risk under epsilon (for the whole
    scan or for one organ): that group's lambda is set to ``+inf`` (the whole real line: valid but
    uninformative) and its status is ``"uncontrollable"``. The message names the group and the cause
    (too few calibration scans, or ``lambda_max`` too small)."""


class AnchorWarning(UserWarning):
    """The convex anchor problem (PK)/(Psem) had no usable solution for any gamma; the anchor falls
    back to zero (the backtracking step still controls risk, intervals may be longer)."""
