"""Tests of the nnU-Net-style training recipe: the fresh-phantom stream (deterministic for a seed, the
same batches for any number of loader workers), lesion-balanced foreground oversampling (the
configured rate; small lesions as likely as large ones), seeded augmentation, DynUNet with deep
supervision end to end (the loss goes down), checkpoint selection, resuming an interrupted run
(bit-identical to an uninterrupted one) and the checks on resuming. Tiny phantoms and networks, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import InferenceEngine, resolve_model  # noqa: E402
from ConformalSegLib.phantoms.labels import LESION  # noqa: E402
from ConformalSegLib.training import (
    AugmentationConfig,
    PhantomStream,
    PhantomStreamSampler,  # noqa: E402
    TrainingCancelled,
    TrainingConfig,
    build_card,
    train,
)
from ConformalSegLib.training.checkpoint import default_checkpoint_path  # noqa: E402
from ConformalSegLib.training.data import PreparedCase  # noqa: E402
from ConformalSegLib.training.networks import downsampling, parse_stride  # noqa: E402
from ConformalSegLib.training.patches import choose_centre, sample_patch  # noqa: E402

TINY_SHAPE = (16, 32, 32)
STREAM = PhantomStream(11, {"shape": TINY_SHAPE})
DYN = dict(
    network="dynunet",
    patch_size=(32, 32, 16),
    crop_size=(16, 16, 8),
    spacing_mm=None,
    channels=(4, 8, 16),
    strides=((2, 2, 1), (2, 2, 2)),
    deep_supervision=True,
    epochs=2,
    batch_size=2,
    steps_per_epoch=2,
    fg_fraction=0.5,
    augment=True,
    optimizer="adamw",
    lr_schedule="poly",
    learning_rate=3e-3,
    device="cpu",
    name="tiny-dyn",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sampler(tmp_path: Path, num_workers: int = 0, augment: bool = True) -> PhantomStreamSampler:
    config = TrainingConfig(**DYN)
    card = build_card(config, tmp_path)
    return PhantomStreamSampler(
        STREAM,
        card,
        (LESION,),
        config.crops,
        batch_size=2,
        steps_per_epoch=2,
        fg_fraction=0.5,
        augmentation=AugmentationConfig() if augment else None,
        num_workers=num_workers,
    )


def test_strides_and_downsampling():
    assert parse_stride("2") == 2 and parse_stride("2x2x1") == (2, 2, 1)
    assert downsampling([(2, 2, 1), 2, (2, 2, 2)]) == (8, 8, 4)
    with pytest.raises(ValueError):
        parse_stride("2x2")
    with pytest.raises(ConformalSegError, match="divisible by the U-Net's total downsampling 4x4x2"):
        TrainingConfig(**{**DYN, "crop_size": (16, 16, 9)}).validate()
    with pytest.raises(ConformalSegError, match="isotropic strides"):
        TrainingConfig(**{**DYN, "network": "unet", "deep_supervision": False}).validate()


def test_stream_is_deterministic_and_independent_of_workers(tmp_path):
    sampler = _sampler(tmp_path)
    a, b = sampler.sample(3), sampler.sample(3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(sampler.sample(4)[0], a[0])
    serial = list(sampler.epoch(1))
    parallel = list(_sampler(tmp_path, num_workers=2).epoch(1))
    assert len(serial) == len(parallel) == 2
    for (x, y), (u, v) in zip(serial, parallel):
        assert x.shape == (2, 1, 16, 16, 8) and torch.equal(x, u) and torch.equal(y, v)
    # epoch 1 holds samples 4..7: batch 0 of epoch 1 is samples 4 and 5
    assert torch.equal(serial[0][0][0], sampler.sample(4)[0])
    # held-out phantoms are other phantoms than the training stream's
    held = STREAM.heldout_cases(2)
    assert held[0].case_id == "heldout_000"
    assert not np.array_equal(held[0].image.array, STREAM.training_case(0).image.array)


def _case_with_two_lesions() -> PreparedCase:
    lesion = torch.zeros(1, 40, 40, 20)
    lesion[0, 2:22, 2:22, 2:12] = 1.0  # a large lesion: 4000 voxels
    lesion[0, 35, 35, 15] = 1.0  # a one-voxel lesion
    voxels = torch.nonzero(lesion[0]).numpy().astype(np.int64)
    return PreparedCase("two", torch.rand(1, 40, 40, 20), lesion, voxels)


def test_foreground_rate_and_small_lesions_not_under_represented():
    case = _case_with_two_lesions()
    assert case.n_components == 2
    rng = np.random.default_rng(0)
    draws = [choose_centre(case, rng, 0.33) for _ in range(6000)]
    positive = np.array([p for _, p in draws])
    assert positive.mean() == pytest.approx(0.33, abs=0.02)
    small = np.array([tuple(c) == (35, 35, 15) for c, p in draws if p])
    assert small.mean() == pytest.approx(0.5, abs=0.03)  # chosen per lesion, not per voxel (1 in 4001)
    image, lesion, positive = sample_patch(case, (16, 16, 8), np.random.default_rng(1), fg_fraction=1.0)
    assert positive and image.shape == lesion.shape == (1, 16, 16, 8) and float(lesion.sum()) >= 1


def test_augmentation_is_seeded_and_keeps_a_binary_label():
    case = _case_with_two_lesions()
    config = AugmentationConfig(
        p_rotate_scale=1.0, p_noise=1.0, p_blur=1.0, p_brightness=1.0, p_contrast=1.0, p_gamma=1.0
    )
    one = sample_patch(case, (16, 16, 8), np.random.default_rng(5), fg_fraction=1.0, augmentation=config)
    two = sample_patch(case, (16, 16, 8), np.random.default_rng(5), fg_fraction=1.0, augmentation=config)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert one[0].shape == one[1].shape == (1, 16, 16, 8)
    assert set(torch.unique(one[1]).tolist()) <= {0.0, 1.0}
    plain = sample_patch(case, (16, 16, 8), np.random.default_rng(5), fg_fraction=1.0)
    assert not torch.equal(one[0], plain[0])


def test_dynunet_stream_training_end_to_end(tmp_path):
    config = TrainingConfig(**{**DYN, "epochs": 6, "steps_per_epoch": 3, "augment": False})
    out = tmp_path / "model"
    result = train(config, STREAM, STREAM.heldout_cases(2), out)
    assert result.epoch_losses[-1] < result.epoch_losses[0]  # it learns
    card = resolve_model(out)
    assert card.source.network == "DynUNet" and card.training["data"]["source"] == "phantom-stream"
    assert card.training["train_cases"] == 6 * 3 * 2 and card.training["deep_supervision"]
    log = json.loads((out / "training.json").read_text())
    scores = [e["val_dice"] for e in log["epochs"]]
    best = max(range(len(scores)), key=lambda i: (scores[i], i)) + 1
    assert result.best_epoch == card.training["selected_epoch"] == best  # the best validation epoch is shipped
    assert "detection" in log["heldout"] and log["heldout"]["detection"]["scans"] == 2
    assert not default_checkpoint_path(out).exists()  # removed at the end
    image, _ = STREAM.heldout_cases(1)[0].volumes()
    prediction = InferenceEngine(card, device="cpu").predict(image, mc_dropout=2)
    assert prediction.probability.shape == image.array.shape and float(prediction.variance.max()) > 0


def test_blob_loss_trains_end_to_end(tmp_path):
    config = TrainingConfig(**{**DYN, "epochs": 4, "steps_per_epoch": 3, "augment": False, "loss": "blob-dice-ce"})
    result = train(config, STREAM, STREAM.heldout_cases(2), tmp_path / "model")
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert resolve_model(tmp_path / "model").training["loss"] == "blob-dice-ce"


def test_resume_continues_bit_identically(tmp_path):
    config = TrainingConfig(**{**DYN, "epochs": 3})
    train(config, STREAM, STREAM.heldout_cases(1), tmp_path / "whole")
    steps = {"n": 0}

    def stop_in_epoch_three() -> bool:
        steps["n"] += 1
        return steps["n"] > 2 * config.steps_per_epoch  # two complete epochs, then Ctrl-C

    out = tmp_path / "resumed"
    with pytest.raises(TrainingCancelled):
        train(config, STREAM, STREAM.heldout_cases(1), out, cancel=stop_in_epoch_three)
    assert not out.exists() and default_checkpoint_path(out).is_file()
    with pytest.raises(ConformalSegError, match="other settings .*learning_rate"):
        train(
            TrainingConfig(**{**DYN, "epochs": 3, "learning_rate": 1e-3}),
            STREAM,
            STREAM.heldout_cases(1),
            out,
            resume=True,
        )
    train(config, STREAM, STREAM.heldout_cases(1), out, resume=True)
    a = torch.load(tmp_path / "whole" / "weights.pt", weights_only=True)
    b = torch.load(out / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole = json.loads((tmp_path / "whole" / "training.json").read_text())["epochs"]
    resumed = json.loads((out / "training.json").read_text())["epochs"]
    assert [e["loss"] for e in whole] == [e["loss"] for e in resumed]
    with pytest.raises(ConformalSegError, match="no training checkpoint"):
        train(config, STREAM, [], tmp_path / "other", resume=True)


def test_roi_crops_around_stage1_components():
    from ConformalSegLib.cascade.config import CascadeConfig
    from ConformalSegLib.cascade.pipeline import StageOutput
    from ConformalSegLib.training.roi_data import roi_training_cases

    cases = [STREAM.training_case(i) for i in range(3)]

    def perfect(volume, mc_passes):  # a stand-in stage 1 that finds exactly the lesions
        labels = next(c for c in cases if c.image.array is volume.array).labels.array
        return StageOutput((labels == LESION).astype(np.float32))

    config = CascadeConfig(lung_source="none", merge_radius_mm=0.0)
    crops, info = roi_training_cases(perfect, cases, margins=(0, 2), config=config)
    assert info["phantoms"] == 3 and info["crops"] == len(crops) > 0 and info["crops_with_lesion"] == len(crops)
    tight = [c for c in crops if c.case_id.endswith("_m0")]
    wide = {c.case_id[:-3]: c for c in crops if c.case_id.endswith("_m2")}
    assert len(tight) == len(wide) == len(crops) // 2
    for crop in tight:
        lesion = crop.labels.array == LESION
        assert lesion.any() and all(
            lesion.any(axis=tuple(a for a in range(3) if a != k))[[0, -1]].all() for k in range(3)
        )  # margin 0: the box touches the lesion on every side
        other = wide[crop.case_id[:-3]]
        assert all(w >= t for w, t in zip(other.labels.array.shape, crop.labels.array.shape))
        assert crop.image.geometry.shape == crop.image.array.shape
