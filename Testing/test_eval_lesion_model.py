"""``benchmarks/eval_lesion_model.py``: the held-out test of one or several lesion models, side by side, and
with ``--demo`` the demo's question for each (the numbers a new model must beat to ship). Quick settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_lesion_model as E  # noqa: E402

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.common.shipped_models import LESION_MODEL, shipped_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def out(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "OUT", tmp_path / "cache")
    return tmp_path / "cache"


def test_one_row_per_model_and_the_records(out, capsys):
    models = [shipped_model(LESION_MODEL), shipped_model("phantom_lesion_unet_v2")]
    assert E.main(["--quick", "--device", "cpu", "--model", *map(str, models)]) == 0
    text = capsys.readouterr().out
    assert f"| `{LESION_MODEL}` |" in text and "| `phantom_lesion_unet_v2` |" in text
    assert "The demo's question" not in text  # only with --demo
    records = json.loads((out / "quick.json").read_text())
    assert [r["model"] for r in records] == [LESION_MODEL, "phantom_lesion_unet_v2"]
    assert all(len(r["cases"]) == 6 and r["seed"] == 4000 for r in records)
    assert records[0]["cases"] != records[1]["cases"]  # two models, two sets of masks
    assert "#### Paired against `" + LESION_MODEL + "`" in text
    paired = records[1]["paired_dice_vs_first"]
    diffs = [b["dice"] - a["dice"] for a, b in zip(records[0]["cases"], records[1]["cases"]) if a["dice"] is not None]
    assert paired["cases"] == len(diffs) and paired["mean"] == pytest.approx(sum(diffs) / len(diffs))


def test_the_demo_question(out, capsys):
    assert E.main(["--quick", "--device", "cpu", "--demo", "--split-seeds", "0", "3"]) == 0
    text = capsys.readouterr().out
    assert "12 demo phantoms (seed 2026), 10 splits at split seeds 0 / 3" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| `{LESION_MODEL}` |") and "/" in line)
    assert len(row.split("|")) == 8  # model, score, fixed Dice, CLS ECR, CLS PC, CRC PC (two seeds each)
    assert "| `identity` |" in row
    (record,) = json.loads((out / "quick.json").read_text())
    assert len(record["demo"]) == 2 and all(0 <= d["cls_pc"] <= 1 and 0 <= d["fixed_dice"] <= 1 for d in record["demo"])
    # 6 calibration scans are too few for alpha = 0.1 (k = ceil(0.9 * 7) = 7 > 6): CLS masks every voxel
    assert all(d["cls_pc"] == 1.0 for d in record["demo"])
    assert len(list((out / "demo" / "quick" / "imagesTr").glob("*.nii.gz"))) == 12


def test_the_demo_question_per_score_and_on_other_phantoms(out, capsys):
    """One row per score from one network run; ``--demo-seed`` asks on other phantoms, in their own folders."""
    assert E.main(["--quick", "--device", "cpu", "--demo", "--split-seeds", "0", "--scores", "identity",
                   "gaussian:2", "--demo-seed", "4000", "--phantoms", "0"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "no held-out test (--phantoms 0)" in text and "mean Dice" not in text
    assert "12 phantoms of seed 4000, 10 splits at split seeds 0" in text
    rows = [line for line in text.splitlines() if line.startswith(f"| `{LESION_MODEL}` | `")]
    assert [row.split("|")[2].strip() for row in rows] == ["`identity`", "`gaussian:2.0`"]  # canonical names
    (record,) = json.loads((out / "quick.json").read_text())
    assert [d["score"] for d in record["demo"]] == ["identity", "gaussian:2.0"]
    plain, smoothed = record["demo"]
    assert plain["fixed_dice"] != smoothed["fixed_dice"]  # the 0.5 threshold applies to the smoothed map
    assert smoothed["seconds"] < plain["seconds"]  # the maps were computed once, then read from the cache
    assert not (out / "demo" / "quick").exists()  # the demo's own phantoms are not touched
    images = sorted((out / "demo" / "quick_seed4000" / "imagesTr").glob("*.nii.gz"))
    assert len(images) == 12


def test_bad_requests_fail_before_any_work(out):
    with pytest.raises(ConformalSegError, match="distance"):
        E.main(["--quick", "--device", "cpu", "--demo", "--scores", "distance:0.5"])
    with pytest.raises(SystemExit, match="nothing to measure"):
        E.main(["--quick", "--device", "cpu", "--phantoms", "0"])
    assert not out.exists()


def _rows(dice):
    return [{"case_id": f"c{i}", "dice": d} for i, d in enumerate(dice)]


def test_paired_dice_difference_by_hand():
    """Matched by case id, lesion-free phantoms (no Dice) left out, wins and losses counted, interval around the
    mean; a constant difference has a zero-width interval; equal models have no Wilcoxon p-value."""
    from _lesion_eval import paired_dice_difference

    model = _rows([0.9, 0.5, None, 0.7, 0.2, 0.6])
    reference = list(reversed(_rows([0.8, 0.5, None, 0.4, 0.3, 0.1])))  # order does not matter
    d = paired_dice_difference(model, reference)
    assert d["cases"] == 5 and d["better"] == 3 and d["worse"] == 1  # +0.1, 0, +0.3, -0.1, +0.5
    assert d["mean"] == pytest.approx(0.16)
    assert d["ci95"][0] < 0.16 < d["ci95"][1] and 0 < d["wilcoxon_p"] <= 1
    shifted = paired_dice_difference(_rows([0.3, 0.4, 0.5]), _rows([0.2, 0.3, 0.4]))
    assert shifted["ci95"] == pytest.approx((0.1, 0.1)) and shifted["better"] == 3
    same = paired_dice_difference(_rows([0.3, 0.4]), _rows([0.3, 0.4]))
    assert same["mean"] == 0 and same["wilcoxon_p"] is None and same["ci95"] == (0.0, 0.0)
    with pytest.raises(ValueError, match="same held-out phantoms"):
        paired_dice_difference(_rows([0.3, 0.4]), _rows([0.3, 0.4, 0.5]))
    with pytest.raises(ValueError, match="at least 2"):
        paired_dice_difference(_rows([0.3, None]), _rows([0.3, None]))
