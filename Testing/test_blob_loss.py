"""Tests of the blob loss (``--loss blob-dice-ce``, ConformalSegLib/training/blob_loss.py): hand values
against a per-lesion loop written from the definition, the limits stated in the module docstring, the
masking of the other lesions, 26-connectivity, crops without lesions, gradients, deep supervision, the
CLI's choices (a tiny training run with it: test_training_recipe.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from ConformalSegLib.cli.train_options import LOSS_CHOICES  # noqa: E402
from ConformalSegLib.training.blob_loss import BlobDiceCELoss, blob_dice, lesion_components  # noqa: E402
from ConformalSegLib.training.losses import LOSS_NAMES, SMOOTH, DiceCELoss, build_loss, supervised_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_blob(p: np.ndarray, labels: list[np.ndarray]) -> float:
    """The definition, lesion by lesion: ``labels[b]`` numbers crop ``b``'s lesions 1..K (0 background)."""
    crops = []
    for pb, lb in zip(p, labels, strict=True):
        k = int(lb.max())
        if k == 0:
            continue
        terms = []
        for j in range(1, k + 1):
            region = (lb == 0) | (lb == j)
            inside = pb[lb == j].sum()
            terms.append(1.0 - (2.0 * inside + SMOOTH) / (pb[region].sum() + (lb == j).sum() + SMOOTH))
        crops.append(np.mean(terms))
    return float(np.mean(crops)) if crops else 0.0


def _two_lesions(shape=(1, 1, 12, 12, 8)) -> torch.Tensor:
    target = torch.zeros(shape, dtype=torch.float64)
    target[0, 0, 1:3, 1:3, 1:3] = 1  # 8 voxels
    target[0, 0, 6:11, 6:11, 3:7] = 1  # 100 voxels
    return target


def test_one_found_one_missed_weighs_the_lesions_equally():
    target = _two_lesions()
    for found in (slice(1, 3), slice(6, 11)):  # the small one found, then the large one
        p = torch.zeros_like(target)
        p[0, 0, found, found] = target[0, 0, found, found]
        value = float(blob_dice(p, target))
        assert value == pytest.approx(0.5, abs=1e-6)  # found: 0, missed: 1 - s/(|C| + s)
    # the batch soft Dice weighs them by volume: missing the small one costs little, the large one a lot
    small_found = torch.zeros_like(target)
    small_found[0, 0, 1:3, 1:3, 1:3] = 1
    batch_dice = 1 - 2 * float((small_found * target).sum()) / float(small_found.sum() + target.sum())
    assert batch_dice > 0.8


def test_limits_of_the_module_docstring():
    target = torch.zeros((1, 1, 8, 8, 8), dtype=torch.float64)
    target[0, 0, 2:5, 2:5, 2:5] = 1
    assert float(blob_dice(target.clone(), target)) == pytest.approx(0.0, abs=1e-12)
    assert float(blob_dice(torch.zeros_like(target), target)) == pytest.approx(1 - SMOOTH / (27 + SMOOTH), abs=1e-15)


def test_other_lesions_are_masked_out():
    target = _two_lesions()
    # p = 1 on both lesions, 0 elsewhere: without masking, each lesion's Dice would count the other's voxels
    assert float(blob_dice(target.clone(), target)) == pytest.approx(0.0, abs=1e-12)
    # a false positive in the background counts against every lesion
    p = target.clone()
    p[0, 0, 0, 11, 0] = 1
    expected = np.mean([1 - (16 + SMOOTH) / (17 + SMOOTH), 1 - (200 + SMOOTH) / (201 + SMOOTH)])
    assert float(blob_dice(p, target)) == pytest.approx(expected, abs=1e-12)


def test_hand_values_against_the_per_lesion_loop():
    rng = np.random.default_rng(3)
    target = torch.zeros((3, 1, 10, 9, 7), dtype=torch.float64)
    target[0, 0, 1:4, 1:4, 1:3] = 1
    target[0, 0, 6:9, 5:8, 4:6] = 1
    target[0, 0, 0, 8, 6] = 1  # a one-voxel lesion in the corner
    target[2, 0, 3:6, 2:7, 2:5] = 1  # crop 1 has no lesion
    p = torch.from_numpy(rng.uniform(size=target.shape))
    labels, counts = lesion_components(target)
    assert counts == [3, 0, 1]
    reference = _reference_blob(p[:, 0].numpy(), [lab.reshape(target.shape[2:]).numpy() for lab in labels])
    assert float(blob_dice(p, target)) == pytest.approx(reference, rel=1e-12)


def test_components_are_26_connected():
    target = torch.zeros((1, 1, 6, 6, 6))
    target[0, 0, 1, 1, 1] = 1
    target[0, 0, 2, 2, 2] = 1  # touches the first at a corner: one lesion
    target[0, 0, 4, 4, 4] = 1  # two voxels away: another
    _, counts = lesion_components(target)
    assert counts == [2]


def test_no_lesion_gives_zero_and_keeps_the_graph():
    target = torch.zeros((2, 1, 8, 8, 4))
    logits = torch.randn((2, 2, 8, 8, 4), requires_grad=True)
    loss = BlobDiceCELoss()
    value = loss(logits, target)
    assert float(value.detach()) == pytest.approx(float(DiceCELoss()(logits, target).detach()), abs=1e-7)
    value.backward()
    assert logits.grad is not None


def test_loss_is_dice_ce_plus_blob_and_has_gradients():
    target = _two_lesions().float()
    logits = torch.randn((1, 2, *target.shape[2:]), requires_grad=True, generator=torch.Generator().manual_seed(0))
    value = BlobDiceCELoss()(logits, target)
    p = torch.softmax(logits, dim=1)[:, 1:2]
    expected = DiceCELoss()(logits, target) + blob_dice(p, target)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), abs=1e-6)
    value.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_deep_supervision_relabels_each_scale():
    target = _two_lesions().float()
    heads = [torch.zeros((1, 2, 12, 12, 8)), torch.zeros((1, 2, 6, 6, 4))]
    value = supervised_loss(build_loss("blob-dice-ce"), heads, target)
    assert np.isfinite(float(value)) and float(value) > 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="batch, 1"):
        blob_dice(torch.zeros((1, 2, 4, 4, 4)), torch.zeros((1, 2, 4, 4, 4)))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        lesion_components(torch.zeros((1, 1, 4, 4, 4, 4)))


def test_cli_choices_are_the_library_losses():
    assert LOSS_CHOICES == LOSS_NAMES and "blob-dice-ce" in LOSS_NAMES
