"""The one JSON converter (ConformalSegLib.common.jsonable) and its three non-finite conventions."""

import json
import math

import numpy as np
import pytest

from ConformalSegLib.common.jsonable import jsonable


def test_numpy_values_become_plain_json():
    data = {
        1: np.array([[1, 2], [3, 4]], dtype=np.int16),
        "b": np.array([True, False]),
        "f": np.float32(0.5),
        "i": np.int64(7),
        "t": (np.bool_(True), 2.5, "s", None),
        "nested": [{"x": np.array([0.25, 1.0])}],
    }
    out = jsonable(data)
    assert out == {
        "1": [[1, 2], [3, 4]],
        "b": [True, False],
        "f": 0.5,
        "i": 7,
        "t": [True, 2.5, "s", None],
        "nested": [{"x": [0.25, 1.0]}],
    }
    assert type(out["f"]) is float and type(out["i"]) is int and type(out["t"][0]) is bool
    json.dumps(out, allow_nan=False)  # nothing numpy or non-finite is left


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("null", [None, None, None, 1.5]),
        ("string", ["nan", "inf", "-inf", 1.5]),
        ("inf-string", [None, "inf", "-inf", 1.5]),
    ],
)
def test_non_finite_conventions(mode, expected):
    values = [math.nan, math.inf, -math.inf, 1.5]
    assert jsonable(values, non_finite=mode) == expected
    assert jsonable(np.array(values), non_finite=mode) == expected
    assert jsonable([np.float32(v) for v in values], non_finite=mode) == expected


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="non_finite"):
        jsonable(1.0, non_finite="zero")
