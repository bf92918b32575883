"""Tests of ConformalSegLib.training and ``conformalseg train``: losses against hand-computed values,
card-identical preprocessing, seeded patch sampling, tiny end-to-end trainings (valid card,
determinism, no silent overwrite, clear errors, cancellation) and the shipped default model.
Everything runs on the CPU with tiny phantoms and networks."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from ConformalSegLib.cli import train_cmd  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.evaluation.metrics import dice_from_masks  # noqa: E402
from ConformalSegLib.inference import InferenceEngine, resolve_model  # noqa: E402
from ConformalSegLib.io.checksums import sha256_file  # noqa: E402
from ConformalSegLib.io.volumes import Volume  # noqa: E402
from ConformalSegLib.phantoms.dataset import write_phantom_dataset  # noqa: E402
from ConformalSegLib.phantoms.generator import make_phantom, phantom_seed  # noqa: E402
from ConformalSegLib.phantoms.labels import LESION  # noqa: E402
from ConformalSegLib.training import (
    DiceCELoss,
    PatchSampler,
    TrainingCancelled,
    TrainingConfig,  # noqa: E402
    UncertaintyAwareLoss,
    build_card,
    mc_dropout_variance,
    phantom_cases,
    prepare_case,
    train,
    weighted_soft_dice,
)
from ConformalSegLib.training.losses import SMOOTH, supervised_loss, voxel_cross_entropy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "Resources" / "models" / "phantom_lesion_unet"
SHIPPED_V2 = ROOT / "Resources" / "models" / "phantom_lesion_unet_v2"  # fine-tuned from SHIPPED
SHIPPED_V3 = ROOT / "Resources" / "models" / "phantom_lesion_unet_v3"  # fine-tuned from SHIPPED_V2
SHIPPED_V7 = ROOT / "Resources" / "models" / "phantom_lesion_unet_v7"  # v3 -> run lesion_v6 -> v7
SHIPPED_V10 = ROOT / "Resources" / "models" / "phantom_lesion_unet_v10"  # v7 -> run lesion_v9 -> v10
SHIPPED_V11 = ROOT / "Resources" / "models" / "phantom_lesion_unet_v11"  # the demo's: fine-tuned from SHIPPED_V10
TINY_SHAPE = (16, 32, 32)  # phantom (z, y, x)
TINY = dict(
    patch_size=(16, 16, 16),
    crop_size=(16, 16, 8),
    spacing_mm=(3.2, 3.2, 3.0),
    channels=(4, 8, 16),
    strides=(2, 2),
    epochs=2,
    batch_size=2,
    samples_per_case=2,
    device="cpu",
    name="tiny",
)
TINY_ARGS = [
    "--phantom-shape",
    *map(str, TINY_SHAPE),
    "--patch-size",
    "16",
    "16",
    "16",
    "--crop-size",
    "16",
    "16",
    "8",
    "--spacing-mm",
    "3.2",
    "3.2",
    "3.0",
    "--channels",
    "4",
    "8",
    "16",
    "--strides",
    "2",
    "2",
    "--epochs",
    "1",
    "--device",
    "cpu",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_cases():
    cases = phantom_cases(3, seed=7, shape=TINY_SHAPE, n_lesions=(1, 2), empty_probability=0.0)
    return cases[:2], cases[2:]


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="conformalseg")
    sub = parser.add_subparsers(dest="command", required=True)
    train_cmd.register(sub)
    args = parser.parse_args(["train", *argv])
    return args.func(args)


def two_class_logits(p_lesion: list[float]) -> torch.Tensor:
    """Logits (1, 2, n, 1, 1) whose softmax lesion probability (channel 1) is ``p_lesion``."""
    p = torch.tensor(p_lesion, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None, :, :, None, None]


def mask(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)[None, None, :, None, None]


# ----------------------------------------------------------------------------- losses

P = [0.5, 0.75, 0.25, 0.5]
G = [1.0, 1.0, 0.0, 0.0]
DICE_HAND = 1 - (2 * (0.5 + 0.75) + SMOOTH) / ((0.5 + 0.75 + 0.25 + 0.5) + 2 + SMOOTH)  # = 1 - 2.5/4
CE_HAND = [-math.log(0.5), -math.log(0.75), -math.log(0.75), -math.log(0.5)]


def test_soft_dice_and_cross_entropy_hand_values():
    logits, target = two_class_logits(P), mask(G)
    assert float(
        weighted_soft_dice(torch.tensor(P, dtype=torch.float64), torch.tensor(G, dtype=torch.float64))
    ) == pytest.approx(DICE_HAND, abs=1e-12)
    assert DICE_HAND == pytest.approx(0.375, abs=1e-5)
    ce = voxel_cross_entropy(logits, target).flatten().tolist()
    assert ce == pytest.approx(CE_HAND, abs=1e-12)
    assert float(DiceCELoss()(logits, target)) == pytest.approx(DICE_HAND + np.mean(CE_HAND), abs=1e-12)


def test_deep_supervision_weights_heads_like_monai():
    """Three heads: 1 x main + 1/2 x second + 1/4 x third (MONAI's "exp" weights)."""
    gen = torch.Generator().manual_seed(0)
    heads = [torch.randn(2, 2, 6, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    target = (torch.rand(2, 1, 6, 5, 4, generator=gen) > 0.7).double()
    loss = DiceCELoss()
    expected = sum(w * float(loss(h, target)) for w, h in zip((1.0, 0.5, 0.25), heads))
    assert float(supervised_loss(loss, heads, target)) == pytest.approx(expected, abs=1e-6)
    assert float(supervised_loss(loss, heads[:1], target)) == pytest.approx(float(loss(heads[0], target)), abs=1e-12)
    u = torch.full_like(target, 0.1)
    ua = UncertaintyAwareLoss()
    expected = sum(w * float(ua(h, target, u)) for w, h in zip((1.0, 0.5, 0.25), heads))
    assert float(supervised_loss(ua, heads, target, u)) == pytest.approx(expected, abs=1e-6)


def test_uncertainty_aware_limits_and_mixed_hand_value():
    logits, target = two_class_logits(P), mask(G)
    loss = UncertaintyAwareLoss()
    # U = 0 everywhere: a = 1, the loss is the soft Dice alone
    assert float(loss(logits, target, torch.zeros_like(target))) == pytest.approx(DICE_HAND, abs=1e-12)
    # U huge everywhere: a = 0, Dice_a = 1 - s/s = 0, the loss is the mean cross entropy
    assert float(loss(logits, target, torch.full_like(target, 1e4))) == pytest.approx(np.mean(CE_HAND), abs=1e-9)
    # U = ln 2 at voxel 0 only: a = (0.5, 1, 1, 1)
    u = mask([math.log(2.0), 0.0, 0.0, 0.0])
    a = np.array([0.5, 1, 1, 1])
    p, g = np.array(P), np.array(G)
    dice = 1 - (2 * np.sum(a * p * g) + SMOOTH) / (np.sum(a * (p + g)) + SMOOTH)
    ce = np.mean((1 - a) * np.array(CE_HAND))
    assert dice == pytest.approx(1 - 2.0 / 3.25, abs=1e-5)
    assert float(loss(logits, target, u)) == pytest.approx(dice + ce, abs=1e-12)


def test_uncertainty_is_a_constant_weight():
    logits = two_class_logits(P).requires_grad_(True)
    u = mask([0.1, 0.2, 0.0, 0.05]).requires_grad_(True)
    UncertaintyAwareLoss()(logits, mask(G), u).backward()
    assert logits.grad is not None and u.grad is None


def test_mc_dropout_variance_restores_modes_and_keeps_batchnorm_stats():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.Dropout(0.5), torch.nn.Conv3d(4, 2, 1)
    )
    net.train()
    stats = net[1].running_mean.clone()
    x = torch.randn(2, 1, 6, 6, 6)
    u = mc_dropout_variance(net, x, passes=5)
    assert u.shape == (2, 1, 6, 6, 6) and not u.requires_grad
    assert float(u.max()) > 0 and float(u.max()) <= 0.25 and float(u.min()) >= 0
    assert torch.equal(net[1].running_mean, stats) and all(m.training for m in net.modules())
    with pytest.raises(ValueError, match="no active dropout"):
        mc_dropout_variance(torch.nn.Conv3d(1, 2, 1), x, passes=3)


# ----------------------------------------------------------------------------- data


def test_training_preprocessing_is_the_engine_preprocessing(tiny_cases, tmp_path):
    """The exchangeability requirement: training tensors == the engine's network input."""
    config = TrainingConfig(**TINY)
    card = build_card(config, tmp_path)
    case = tiny_cases[0][0]
    prepared = prepare_case(card, case, (LESION,), config.crops)
    from monai.networks.nets import UNet

    torch.save(UNet(**config.network_args()).state_dict(), tmp_path / "weights.pt")
    engine = InferenceEngine(card, device="cpu")
    image, labels = case.volumes()
    expected = engine._preprocess(np.asarray(image.array), image).tensor  # what the network sees at inference
    assert prepared.image.shape == expected.shape
    assert torch.equal(prepared.image, expected)
    # the resampled lesion mask holds about the lesion volume (voxels 2x larger in x and y)
    n_lesion = int(np.count_nonzero(labels.array == LESION))
    assert float(prepared.lesion.sum()) == pytest.approx(n_lesion / 4, rel=0.5)
    assert set(torch.unique(prepared.lesion).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "direction",
    [
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),  # the phantoms' (LPS axes: x and y flipped to RAS)
        (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # already RAS
        (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0),  # axes permuted and flipped
    ],
)
def test_on_the_images_own_grid_the_label_is_reoriented_exactly_as_resampling_would(tmp_path, direction):
    """With ``spacing_mm`` null the label map takes the image's reorientation instead of a nearest-neighbour
    resampling onto the reoriented grid: the same voxels, the same grid."""
    from monai.transforms import ResampleToMatch

    from ConformalSegLib.inference.preprocessing import build_preprocessing
    from ConformalSegLib.io.volumes import Geometry, Volume
    from ConformalSegLib.training.data import TrainingCase, to_meta_tensor

    rng = np.random.default_rng(7)
    geometry = Geometry(shape=(9, 14, 11), spacing=(1.6, 1.2, 3.0), origin=(-7.0, 3.0, 11.5), direction=direction)
    image = Volume(rng.normal(40.0, 20.0, geometry.shape).astype(np.float32), geometry, None)
    labels = Volume(np.where(rng.random(geometry.shape) < 0.3, LESION, 1).astype(np.int16), geometry, None)
    card = build_card(TrainingConfig(**{**TINY, "spacing_mm": None}), tmp_path)
    prepared = prepare_case(card, TrainingCase("c", image, labels), (LESION,), (8, 8, 8))
    spatial, _ = build_preprocessing(card)
    lesion = to_meta_tensor(Volume((labels.array == LESION).astype(np.float32), geometry, None))
    resampled = ResampleToMatch(mode="nearest", padding_mode="zeros")(lesion, img_dst=spatial(to_meta_tensor(image)))
    assert torch.equal(prepared.lesion, (resampled.as_tensor() > 0.5).float())
    assert int(prepared.lesion.sum()) == int(np.count_nonzero(labels.array == LESION))  # every voxel kept


def test_patch_sampler_is_seeded_and_balanced(tiny_cases, tmp_path):
    config = TrainingConfig(**TINY)
    card = build_card(config, tmp_path)
    prepared = [prepare_case(card, c, (LESION,), config.crops) for c in tiny_cases[0]]
    sampler = PatchSampler(prepared, config.crops, samples_per_case=3, fg_fraction=1.0, batch_size=2, seed=3)
    first, again = list(sampler.epoch(0)), list(sampler.epoch(0))
    assert len(first) == len(sampler) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, sampler.epoch(1)))
    for images, lesions in first:
        assert images.shape[1:] == (1, 16, 16, 8)
        assert all(float(m.sum()) > 0 for m in lesions)  # fg_fraction 1: every crop holds lesion voxels


# ----------------------------------------------------------------------------- end to end


def test_train_writes_a_card_the_engine_loads(tiny_cases, tmp_path):
    train_cases, heldout = tiny_cases
    out = tmp_path / "model"
    result = train(TrainingConfig(**TINY), train_cases, heldout, out, command="test", data_info={"source": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["model_card.json", "training.json", "weights.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    card = resolve_model(out)
    t = card.training
    assert t["weights_sha256"] == card.sha256() == sha256_file(out / "weights.pt")
    assert t["train_case_ids"] == [c.case_id for c in train_cases] and t["heldout_cases"] == 1
    assert t["epochs"] == 2 and t["loss"] == "dice-ce" and t["seed"] == 0 and t["command"] == "test"
    assert {"version", "wall_seconds", "heldout_mean_dice", "torch", "monai"} <= set(t)
    log = json.loads((out / "training.json").read_text())
    assert len(log["epochs"]) == 2 and all(math.isfinite(e["loss"]) for e in log["epochs"])
    assert log["heldout"]["cases"][0]["case_id"] == heldout[0].case_id
    assert result.epoch_losses == [e["loss"] for e in log["epochs"]]
    image, _ = heldout[0].volumes()
    prediction = InferenceEngine(card, device="cpu").predict(image, mc_dropout=2)
    assert prediction.probability.shape == image.array.shape
    assert float(prediction.variance.max()) > 0  # dropout makes MC dropout meaningful
    assert (out / "weights.pt").stat().st_size < 200_000


def test_uncertainty_aware_training_runs(tiny_cases, tmp_path):
    config = TrainingConfig(**{**TINY, "epochs": 1, "loss": "uncertainty-aware", "mc_passes": 2})
    result = train(config, *tiny_cases, tmp_path / "ua")
    assert math.isfinite(result.epoch_losses[0])
    assert resolve_model(tmp_path / "ua").training["mc_passes"] == 2


def test_same_seed_gives_identical_weights(tiny_cases, tmp_path):
    config = TrainingConfig(**{**TINY, "epochs": 1})
    train(config, tiny_cases[0], [], tmp_path / "a")
    train(config, tiny_cases[0], [], tmp_path / "b")
    train(TrainingConfig(**{**TINY, "epochs": 1, "seed": 1}), tiny_cases[0], [], tmp_path / "c")
    a, b, c = (torch.load(tmp_path / n / "weights.pt", weights_only=True) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "m"
    assert run_cli("--phantoms", "1", "--heldout", "1", "--out", str(out), *TINY_ARGS) == 0
    assert "held-out lesion Dice" in capsys.readouterr().out
    card = resolve_model(out)
    assert card.training["data"]["phantom_seed"] == 0 and card.training["command"].startswith("conformalseg train")
    before = sha256_file(out / "weights.pt")
    with pytest.raises(ConformalSegError, match="already exists") as info:
        run_cli("--phantoms", "1", "--heldout", "0", "--out", str(out), *TINY_ARGS)
    assert "--force" in str(info.value)
    assert sha256_file(out / "weights.pt") == before
    assert run_cli("--phantoms", "1", "--heldout", "0", "--seed", "5", "--out", str(out), "--force", *TINY_ARGS) == 0
    assert resolve_model(out).training["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli_errors_are_clear(tmp_path):
    with pytest.raises(ConformalSegError, match=r"lesion label 9 \(label values present: 0, 1"):
        run_cli("--phantoms", "1", "--heldout", "0", "--lesion-label", "9", "--out", str(tmp_path / "a"), *TINY_ARGS)
    with pytest.raises(ConformalSegError, match="at least 1"):
        run_cli("--phantoms", "0", "--out", str(tmp_path / "b"), *TINY_ARGS)
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "labelsTr").mkdir()
    with pytest.raises(ConformalSegError, match="no images found"):
        run_cli("--data", str(empty), "--lesion-label", "6", "--out", str(tmp_path / "c"), *TINY_ARGS[4:])
    with pytest.raises(ConformalSegError, match="imagesTr/ and labelsTr/"):
        run_cli("--data", str(tmp_path), "--lesion-label", "6", "--out", str(tmp_path / "d"), *TINY_ARGS[4:])
    with pytest.raises(ConformalSegError, match="needs --lesion-label"):
        run_cli("--data", str(empty), "--out", str(tmp_path / "e"), *TINY_ARGS[4:])
    with pytest.raises(ConformalSegError, match="divisible by the U-Net's total downsampling 4"):
        run_cli("--phantoms", "1", "--out", str(tmp_path / "f"), *TINY_ARGS, "--patch-size", "18", "16", "16")
    assert not any(p.name in "abcdef" for p in tmp_path.iterdir())


def test_cli_trains_on_a_dataset_folder(tmp_path):
    data = write_phantom_dataset(tmp_path / "ds", 3, seed=4, shape=TINY_SHAPE, empty_probability=0.0)
    (data / "labelsTr" / "phantom_002.nii.gz").unlink()
    with pytest.raises(ConformalSegError, match="'phantom_002' has no label map"):
        run_cli("--data", str(data), "--lesion-label", "6", "--out", str(tmp_path / "m"), *TINY_ARGS[4:])
    (data / "imagesTr" / "phantom_002_0000.nii.gz").unlink()
    assert run_cli("--data", str(data), "--lesion-label", "6", "--out", str(tmp_path / "m"), *TINY_ARGS[4:]) == 0
    t = resolve_model(tmp_path / "m").training
    assert t["data"]["source"] == "folder" and t["train_cases"] == 1 and t["heldout_cases"] == 1


def test_cancel_writes_nothing(tiny_cases, tmp_path):
    with pytest.raises(TrainingCancelled):
        train(TrainingConfig(**TINY), *tiny_cases, tmp_path / "m", cancel=lambda: True)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the shipped model


@pytest.mark.skipif(not (SHIPPED / "model_card.json").is_file(), reason="the default model is not shipped here")
def _shipped_heldout_phantom(training: dict, case_id: str):
    """The held-out phantom ``case_id`` of the shipped model, regenerated from the card's seeds."""
    seed = training["data"]["phantom_seed"]
    if training["data"].get("source") == "phantom-stream":  # heldout_XXX = SeedSequence(seed, (1, j))
        j = int(case_id.rsplit("_", 1)[1])
        return make_phantom(np.random.SeedSequence(int(seed), spawn_key=(1, j)), case_id=case_id)
    index = training["heldout_case_ids"].index(case_id) + training["train_cases"]
    return make_phantom(phantom_seed(seed, index))


@pytest.mark.parametrize(
    "folder",
    [SHIPPED, SHIPPED_V2, SHIPPED_V3, SHIPPED_V7, SHIPPED_V10, SHIPPED_V11],
    ids=["v1 (the cascade's stage 1)", "v2", "v3", "v7", "v10", "v11 (the demo's)"],
)
def test_shipped_lesion_models(folder):
    card = resolve_model(folder)
    t = card.training
    assert card.sha256() == t["weights_sha256"] == sha256_file(folder / "weights.pt")
    assert (folder / "weights.pt").stat().st_size < 8_000_000  # "a few MB at most"
    assert (folder / "README.md").is_file() and (folder / "training.json").is_file()
    assert 0.4 <= t["heldout_mean_dice"] <= 0.9
    log = json.loads((folder / "training.json").read_text())
    # a held-out phantom with a lesion that it segments well (a lesion-free one left empty scores Dice 1)
    row = max((r for r in log["heldout"]["cases"] if r["lesion_voxels"] > 0), key=lambda r: r["dice"])
    phantom = _shipped_heldout_phantom(t, row["case_id"])
    engine = InferenceEngine(card, device="cpu")
    prediction = engine.predict(Volume(phantom.image, phantom.geometry, None))
    dice = dice_from_masks(prediction.probability >= 0.5, phantom.lesion_mask)
    assert dice == pytest.approx(row["dice"], abs=0.02)  # reproduces the recorded held-out Dice
    assert 0.5 < dice < 1.0
    # the chain of runs: v3 <- v2 <- v1; v11 <- v10
    parent = {SHIPPED_V2: SHIPPED, SHIPPED_V3: SHIPPED_V2, SHIPPED_V11: SHIPPED_V10}.get(folder)
    # v7 <- the run lesion_v6 <- v3; v10 <- the run lesion_v9 <- v7 (their cards in ancestors/, weights not shipped)
    through = {SHIPPED_V7: ("lesion_v6", SHIPPED_V3), SHIPPED_V10: ("lesion_v9", SHIPPED_V7)}.get(folder)
    if through is not None:
        ancestor = json.loads((folder / "ancestors" / f"{through[0]}.model_card.json").read_text())["training"]
        assert t["init_weights_sha256"] == ancestor["weights_sha256"]
        assert ancestor["init_weights_sha256"] == resolve_model(through[1]).sha256()
    else:
        assert t.get("init_weights_sha256") == (None if parent is None else resolve_model(parent).sha256())  # v1: none


@pytest.mark.parametrize(
    ("name", "loss"), [("phantom_roi_unet", "uncertainty-aware"), ("phantom_roi_unet_dicece", "dice-ce")]
)
def test_shipped_roi_models(name, loss):
    """The cascade's ROI models (issue 11): real weights of the recorded loss, trained on crops around the
    *shipped* stage-1 model's components (its pipeline fingerprint is recorded), small, documented."""
    folder = ROOT / "Resources" / "models" / name
    card = resolve_model(folder)
    t = card.training
    assert card.sha256() == t["weights_sha256"] == sha256_file(folder / "weights.pt")
    assert (folder / "weights.pt").stat().st_size < 8_000_000
    assert (folder / "README.md").is_file() and (folder / "training.json").is_file()
    assert t["loss"] == loss and t["data"]["roi"]["margins_voxels"] == [0, 16]
    assert t["data"]["stage1_model"]["pipeline_sha256"] == resolve_model(SHIPPED).pipeline_sha256()
    assert 0.2 <= t["heldout_mean_dice"] <= 0.95
    readme = (folder / "README.md").read_text()
    assert "conformalseg train --task roi" in readme and f"--loss {loss}" in readme
