"""Table-1 / Fig.-3 evaluation of the interval methods (ConformalSegLib.semcrc.evaluation)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.semcrc import IntervalCalibrationError, calibrate_semcrc, scan_loss, synthetic_intervals  # noqa: E402
from ConformalSegLib.semcrc.evaluation import evaluate_interval_methods, evaluation_markdown, write_interval_evaluation  # noqa: E402


@pytest.fixture(scope="module")
def summary() -> dict:
    data = synthetic_intervals(120, shape=(1, 16, 16), seed=5).data()
    return evaluate_interval_methods(
        data, 0.1, runs=3, n_cal=60, n_test=40, n_opt=10, d_opt=60, gammas=(0.5,), from_anchor=False, seed=1
    )


def test_summary_layout_and_values(summary: dict) -> None:
    assert list(summary["methods"]) == ["crc", "k-crc", "sem-crc", "sem-crc-organ"]
    assert summary["runs"] == 3 and summary["n_test"] == 40
    for s in summary["methods"].values():
        assert 0 <= s["risk"]["mean"] <= 1 and s["risk"]["std"] >= 0
        assert len(s["runs"]["risk"]) == 3 and s["length"]["mean"] > 0
        assert set(s["organ_risk"]) == set(summary["organs"])


def test_per_run_risk_is_recomputable() -> None:
    """The evaluation's run 0 equals calibrating by hand on the same split and averaging test losses."""
    data = synthetic_intervals(60, shape=(1, 12, 12), seed=8).data()
    s = evaluate_interval_methods(
        data, 0.2, runs=1, n_cal=30, methods=["sem-crc"], n_opt=8, d_opt=40, gammas=(0.5,), seed=4
    )
    perm = np.random.default_rng(4).permutation(data.n)
    calib = calibrate_semcrc(data.subset(perm[:30]), 0.2, n_opt=8, d_opt=40, gammas=(0.5,), seed=0)
    test = data.subset(perm[30:])
    expected = np.mean([scan_loss(sc.need, calib.voxel_lambda(sc)) for sc in test.scans])
    assert s["methods"]["sem-crc"]["runs"]["risk"][0] == pytest.approx(expected, abs=1e-15)


def test_markdown_and_files(summary: dict, tmp_path: Path) -> None:
    md = evaluation_markdown(summary)
    assert "| sem-CRC (per organ) |" in md and "| pancreas |" in md and "Length (×10⁻²)" in md
    paths = write_interval_evaluation(summary, tmp_path)
    assert [p.name for p in paths] == ["interval_evaluation.json", "interval_evaluation.md", "interval_evaluation.png"]
    assert (
        json.loads(paths[0].read_text())["methods"]["crc"]["risk"]["mean"] == summary["methods"]["crc"]["risk"]["mean"]
    )
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments() -> None:
    data = synthetic_intervals(10, shape=(1, 8, 8), seed=1).data()
    with pytest.raises(IntervalCalibrationError, match="n_cal"):
        evaluate_interval_methods(data, 0.1, n_cal=10)
    with pytest.raises(IntervalCalibrationError, match="unknown"):
        evaluate_interval_methods(data, 0.1, n_cal=5, methods=["nope"])
