"""Plain JSON values from results that hold numpy arrays, numpy scalars and non-finite floats.

:func:`jsonable` is the one converter the writers of JSON files use (evaluation results, cascade
reports, interval tables and evaluations). The JSON standard has no NaN or infinity, so each file
format states how it writes them; ``non_finite`` picks the convention:

* ``"null"``: NaN and +-inf become ``null`` (evaluation ``results.json``: a null cutoff is explained
  by the ``trivial`` flags next to it);
* ``"string"``: ``"nan"``, ``"inf"``, ``"-inf"`` (cascade reports);
* ``"inf-string"``: +-inf become ``"inf"`` / ``"-inf"`` and NaN ``null`` (interval profiles and
  tables: the convention of the calibration profiles, where an infinite threshold is meaningful and
  NaN means "not defined").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["NON_FINITE", "jsonable"]

NON_FINITE = ("null", "string", "inf-string")


def jsonable(obj: Any, *, non_finite: str = "null") -> Any:
    """``obj`` with dicts (keys as strings), lists and tuples converted recursively, numpy arrays as
    (nested) lists, numpy booleans and numbers as Python ones, and non-finite floats as ``non_finite``
    says (module docstring). Anything else is returned as it is."""
    if non_finite not in NON_FINITE:
        raise ValueError(f"non_finite must be one of {NON_FINITE}, got {non_finite!r}")
    return _convert(obj, non_finite)


def _convert(obj: Any, non_finite: str) -> Any:
    if isinstance(obj, dict):
        return {str(k): _convert(v, non_finite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_convert(v, non_finite) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype == bool or obj.dtype.kind in "iu":
            return obj.tolist()
        return _convert(obj.astype(np.float64).tolist(), non_finite)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _float(float(obj), non_finite)
    return obj


def _float(value: float, non_finite: str) -> float | str | None:
    if math.isfinite(value):
        return value
    if non_finite == "null" or (non_finite == "inf-string" and math.isnan(value)):
        return None
    return str(value)  # "nan", "inf", "-inf"
