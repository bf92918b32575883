"""``benchmarks/eval_validation_noise.py``: a bootstrap replicate scores the drawn scans exactly as training's
validation does (the whole set reproduces ``validation_scores``; ``p >= cutoff`` counted by binary search,
ties included), and the quick run prints both tables."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_validation_noise as V  # noqa: E402

from ConformalSegLib.common.shipped_models import LESION_MODEL, shipped_model  # noqa: E402
from ConformalSegLib.training.validation import validation_scores  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maps(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Probability maps on a coarse grid (many tied values) with a blob lesion in most scans."""
    rng = np.random.default_rng(seed)
    maps = []
    for i in range(n):
        p = np.round(rng.random((6, 10, 10)), 2).astype(np.float32)
        truth = np.zeros(p.shape, bool)
        if i % 5:  # every fifth scan has no lesion
            z, y, x = rng.integers(1, 5), rng.integers(1, 8), rng.integers(1, 8)
            truth[z : z + 2, y : y + 3, x : x + 2] = True
            p[truth] = np.clip(p[truth] + rng.uniform(-0.2, 0.6), 0, 1)
        maps.append((p, truth))
    return maps


def test_the_whole_set_reproduces_training_validation():
    maps = _maps(40)
    table = V.ScanTable(maps)
    dice, pc = table.scores(np.arange(len(maps)))
    expected = validation_scores(maps)
    assert dice == pytest.approx(expected["val_dice"], abs=1e-12)
    assert pc == pytest.approx(expected["val_cls_pc"], abs=1e-12)
    assert 0 < pc < 1


def test_a_replicate_is_the_validation_of_the_drawn_scans():
    maps = _maps(30, seed=1)
    table = V.ScanTable(maps)
    scans = np.random.default_rng(2).integers(0, len(maps), len(maps))
    dice, pc = table.scores(scans)
    expected = validation_scores([maps[i] for i in scans])
    assert (dice, pc) == pytest.approx((expected["val_dice"], expected["val_cls_pc"]), abs=1e-12)


def test_counting_at_or_above_a_cutoff_includes_ties():
    p = np.array([[[0.1, 0.2], [0.2, 0.5]]], dtype=np.float32)
    table = V.ScanTable([(p, p > 0.3)])
    for cutoff in (0.0, float(np.float32(0.2)), 0.25, float(np.float32(0.5)), 0.6, float("-inf")):
        assert table.share_at_or_above(0, cutoff) == np.count_nonzero(p >= cutoff) / p.size


def test_quick_run_prints_both_tables(capsys):
    models = [shipped_model(LESION_MODEL), shipped_model("phantom_lesion_unet_v10")]
    assert V.main(["--quick", "--model", *map(str, models)]) == 0
    text = capsys.readouterr().out
    assert "6 held-out phantoms of stream 1010" in text
    assert f"| `{LESION_MODEL}` |" in text and "#### Paired against `" + LESION_MODEL + "`" in text
    rows = [line for line in text.splitlines() if line.startswith("| `phantom_lesion_unet_v10` |")]
    assert [len(row.split("|")) for row in rows] == [7, 8]  # its scores, then its difference from the first
