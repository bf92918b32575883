"""The per-epoch validation of training (:func:`ConformalSegLib.training.validation.validation_dice`): the
mean lesion Dice that selects the checkpoint, and the tracked cost of the per-scan guarantee ``val_cls_pc``,
checked against hand counts on scans whose probabilities are known (a fixed network: p = sigmoid(8 (x - 0.5))
of the preprocessed image x), including the too-few-scans case (every voxel) and scans without a lesion."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training_recipe import DYN  # noqa: E402

from ConformalSegLib.training import TrainingConfig, build_card  # noqa: E402
from ConformalSegLib.training.data import PreparedCase  # noqa: E402
from ConformalSegLib.training.validation import CLS_ALPHA, CLS_EPSILON, validation_dice  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (32, 32, 16)  # = the card's window: one sliding-window tile per scan


class KnownProbability(torch.nn.Module):
    """Two-channel logits (0, 8 (x - 0.5)): the softmax lesion probability is sigmoid(8 (x - 0.5))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 8.0 * (x - 0.5)], dim=1)


def _case(name: str, image: np.ndarray, lesion: np.ndarray) -> PreparedCase:
    return PreparedCase(
        name,
        torch.from_numpy(image[None].astype(np.float32)),
        torch.from_numpy(lesion[None].astype(np.float32)),
        np.argwhere(lesion),
    )


def _scan(lesion_values: list[float], extra_bright: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Background 0 (p = 0.018); a lesion of ``len(lesion_values)`` voxels with those image values; then
    ``extra_bright`` background voxels at 0.7 (p = 0.83, false positives)."""
    image, lesion = np.zeros(SHAPE), np.zeros(SHAPE, dtype=bool)
    flat_image, flat_lesion = image.reshape(-1), lesion.reshape(-1)
    start = 5000
    flat_image[start : start + len(lesion_values)] = lesion_values
    flat_lesion[start : start + len(lesion_values)] = True
    flat_image[100 : 100 + extra_bright] = 0.7
    return image, lesion


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    config = TrainingConfig(**{**DYN, "patch_size": SHAPE})
    return build_card(config, tmp_path_factory.mktemp("card"))


def test_dice_and_the_pooled_cls_cost_by_hand(card):
    assert (CLS_EPSILON, CLS_ALPHA) == (0.1, 0.1)
    # ten scans with a 10-voxel lesion: floor(0.1 * 10) = 1 voxel may be missed, so a scan's critical cutoff is
    # the p of its 9th largest lesion voxel. With n = 10, k = ceil(0.9 * 11) = 10: the CLS cutoff is the
    # smallest of the ten critical cutoffs, scan 0's p(0.6) (nine of its voxels at 0.6, one at 0.95).
    cases = [_case("s0", *_scan([0.6] * 9 + [0.95]))]
    cases += [_case(f"s{i}", *_scan([0.9] * 10, extra_bright=i)) for i in range(1, 10)]
    cases.append(_case("empty", *_scan([], extra_bright=20)))  # no lesion: in the share, not in the cutoff
    result = validation_dice(KnownProbability(), cases, card, torch.device("cpu"))
    assert result["val_cases_with_lesion"] == 10
    # mask p >= 0.5 (x > 0.5): scan 0 hits all 10 lesion voxels; scan i also i false positives
    dice = [1.0] + [2 * 10 / (10 + 10 + i) for i in range(1, 10)]
    assert result["val_dice"] == pytest.approx(np.mean(dice), abs=1e-9)
    # mask p >= p(0.6): every lesion voxel and every 0.7 voxel, nothing of the background
    voxels = math.prod(SHAPE)
    shares = [10 / voxels] + [(10 + i) / voxels for i in range(1, 10)] + [20 / voxels]
    assert result["val_cls_pc"] == pytest.approx(np.mean(shares), rel=1e-12)


def test_too_few_scans_for_alpha_mask_every_voxel_and_no_lesion_gives_none(card):
    one = [_case("s0", *_scan([0.9] * 10)), _case("empty", *_scan([]))]
    result = validation_dice(KnownProbability(), one, card, torch.device("cpu"))
    # n = 1: k = ceil(0.9 * 2) = 2 > 1, the cutoff is -inf and the mask is the whole scan
    assert result["val_cls_pc"] == 1.0 and result["val_dice"] == pytest.approx(1.0)
    none = validation_dice(KnownProbability(), [_case("empty", *_scan([]))], card, torch.device("cpu"))
    assert none == {"val_dice": None, "val_cases_with_lesion": 0, "val_cls_pc": None}
