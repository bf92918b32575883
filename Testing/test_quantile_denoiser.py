"""Tests of the quantile regression denoiser: the pinball loss, quantile model cards, the engine's
quantile prediction, ``conformalseg train --task denoise``, ``infer`` -> ``calibrate --method
sem-crc-organ`` end to end, the shipped phantom denoiser and the sem-CRC demo. CPU only, tiny
phantoms and networks (well under a minute)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings(
        "ignore:`torch.jit.script` is deprecated:DeprecationWarning",
        "ignore:`torch.jit.save` is deprecated:DeprecationWarning",
    ),
]

from ConformalSegLib import cli  # noqa: E402
from ConformalSegLib.cli import train_cmd  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.inference import InferenceEngine, ModelCard, resolve_model  # noqa: E402
from ConformalSegLib.io.volumes import Volume, load_image  # noqa: E402
from ConformalSegLib.semcrc.phantom_denoising import (  # noqa: E402
    NOISE_SIGMA,
    PHANTOM_ORGANS,
    denoising_cases,
    window,
    write_denoising_dataset,
)
from ConformalSegLib.training.denoise import evaluate_denoiser, phantom_denoising_pairs  # noqa: E402
from ConformalSegLib.training.losses import PinballLoss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "Resources" / "models" / "phantom_denoiser_quantile"
#: plausible band for the shipped denoiser's raw [q_0.1, q_0.9] coverage on fresh phantoms (nominal
#: 0.8; a few cases, so allow sampling and fit error) and for its mean length (windowed units)
COVERAGE_BAND = (0.70, 0.90)
LENGTH_BAND = (0.02, 0.40)


@pytest.fixture(autouse=True)
def _trusted_model_code(monkeypatch):
    """These tests load TorchScript probes and MONAI bundles written by the tests themselves."""
    monkeypatch.setenv("CONFORMALSEG_TRUST_MODEL_CODE", "1")


def quantile_card_dict(source: dict, *, patch=(16, 16, 8), spacing=None, orientation=None, levels=(0.1, 0.9)) -> dict:
    return {
        "format": "conformalseg-model-card",
        "format_version": 1,
        "name": "tiny-quantile",
        "source": source,
        "preprocessing": {"orientation": orientation, "spacing_mm": spacing, "intensity": {"kind": "none"}},
        "inference": {"patch_size": list(patch), "overlap": 0.5, "blend": "gaussian", "sw_batch_size": 2},
        "output": {"activation": "none", "quantiles": list(levels)},
        "training": {},
    }


class _Band(torch.nn.Module):
    """A fixed 'denoiser': lower = x - 0.1, upper = x + 0.25 (no activation, any range)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x - 0.1, x + 0.25], dim=1)


@pytest.fixture(scope="module")
def band_card(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("band")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_Band()).save(str(folder / "band.ts"))
    path = folder / "model_card.json"
    path.write_text(json.dumps(quantile_card_dict({"torchscript": "band.ts"})))
    return path


def run_train(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="conformalseg")
    sub = parser.add_subparsers(dest="command", required=True)
    train_cmd.register(sub)
    args = parser.parse_args(["train", *argv])
    return args.func(args)


# ----------------------------------------------------------------------------- pinball loss


def test_pinball_hand_values():
    loss = PinballLoss((0.1, 0.9))
    prediction = torch.zeros(1, 2, 2, 1, 1, dtype=torch.float64)
    target = torch.tensor([1.0, -1.0], dtype=torch.float64).view(1, 1, 2, 1, 1)
    # tau 0.1: r = 1 -> 0.1, r = -1 -> 0.9; tau 0.9: r = 1 -> 0.9, r = -1 -> 0.1; mean of 4 = 0.5
    assert float(loss(prediction, target)) == pytest.approx(0.5, abs=1e-12)
    prediction = torch.tensor([0.5, 0.5, 2.0, 2.0], dtype=torch.float64).view(1, 2, 2, 1, 1)
    target = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 2, 1, 1)
    # q_0.1 = 0.5: r = 0.5 -> 0.05, r = -0.5 -> 0.45; q_0.9 = 2: r = -1 -> 0.1, r = -2 -> 0.2
    assert float(loss(prediction, target)) == pytest.approx((0.05 + 0.45 + 0.1 + 0.2) / 4, abs=1e-12)
    with pytest.raises(ValueError):
        loss(torch.zeros(1, 3, 2, 1, 1), target)
    with pytest.raises(ValueError):
        PinballLoss((0.0, 0.9))


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9])
def test_pinball_minimiser_is_the_empirical_quantile(tau):
    sample = np.random.default_rng(3).normal(size=11)  # tau * n not an integer: a unique minimiser
    loss = PinballLoss((tau,))
    target = torch.tensor(sample).view(1, 1, -1, 1, 1)

    def value(q: float) -> float:
        return float(loss(torch.full((1, 1, sample.size, 1, 1), q, dtype=torch.float64), target))

    grid = np.concatenate([np.linspace(sample.min() - 1, sample.max() + 1, 2001), sample])
    best = grid[int(np.argmin([value(q) for q in grid]))]
    expected = np.quantile(sample, tau, method="inverted_cdf")
    assert best == pytest.approx(expected, abs=1e-12)
    # gradient descent on a free constant converges to it as well
    q = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([q], lr=0.01)
    for _ in range(1500):
        optimiser.zero_grad()
        loss(q.expand(1, 1, sample.size, 1, 1), target).backward()
        optimiser.step()
    assert float(q.detach()) == pytest.approx(expected, abs=0.03)


# ----------------------------------------------------------------------------- cards and engine


def test_quantile_card_round_trip_and_errors(band_card, tmp_path):
    card = resolve_model(band_card)
    assert card.output.is_quantile and card.output.quantiles == (0.1, 0.9) and card.output.lesion_channel is None
    data = json.loads(band_card.read_text())
    assert card.to_dict()["output"] == {"activation": "none", "quantiles": [0.1, 0.9]}
    again = ModelCard.from_dict(card.to_dict(), band_card)
    assert again.to_dict() == card.to_dict() and again.pipeline_sha256() == card.pipeline_sha256()
    assert card.to_dict()["source"] == data["source"]
    lesion = ModelCard.from_dict({**data, "output": {"activation": "sigmoid", "lesion_channel": 0}}, band_card)
    assert lesion.to_dict()["output"] == {"activation": "sigmoid", "lesion_channel": 0}  # unchanged format
    assert not lesion.output.is_quantile
    bad = {
        "softmax with quantiles": {"activation": "softmax", "quantiles": [0.1, 0.9]},
        "decreasing": {"activation": "none", "quantiles": [0.9, 0.1]},
        "one level": {"activation": "none", "quantiles": [0.5]},
        "level 1": {"activation": "none", "quantiles": [0.1, 1.0]},
        "none without quantiles": {"activation": "none", "lesion_channel": 0},
    }
    for name, output in bad.items():
        with pytest.raises(ConformalSegError, match="quantile|output") as info:
            ModelCard.from_dict({**data, "output": output}, band_card)
        assert str(band_card) in str(info.value), name


def test_engine_quantile_geometry_blending_and_refusals(band_card):
    geometry = Geometry(shape=(13, 21, 18), spacing=(1.2, 0.9, 2.5), origin=(5.0, -7.0, 3.0))
    noisy = np.random.default_rng(0).normal(0.5, 0.4, geometry.shape).astype(np.float32)  # leaves [0, 1]
    volume = Volume(noisy, geometry, None)
    engine = InferenceEngine(band_card, device="cpu")
    prediction = engine.predict_quantiles(volume)
    assert prediction.maps.shape == (2, *geometry.shape) and prediction.levels == (0.1, 0.9)
    assert prediction.geometry == geometry and prediction.info["windows"] > 1
    # no activation, no clipping; Gaussian blending of overlapping windows keeps an exact per-voxel map
    np.testing.assert_allclose(prediction.lower, noisy - 0.1, atol=1e-5)
    np.testing.assert_allclose(prediction.upper, noisy + 0.25, atol=1e-5)
    assert prediction.lower.min() < 0 and prediction.upper.max() > 1
    assert prediction.volume("upper").array.shape == geometry.shape
    with pytest.raises(ConformalSegError, match="predict_quantiles"):
        engine.predict(volume)
    # with resampling and reorientation the maps still come back on the input grid
    data = json.loads(band_card.read_text())
    card = ModelCard.from_dict(
        {**data, "preprocessing": {**data["preprocessing"], "orientation": "RAS", "spacing_mm": [2.0, 2.0, 2.0]}},
        band_card,
    )
    resampled = InferenceEngine(card, device="cpu").predict_quantiles(volume)
    assert resampled.maps.shape == (2, *geometry.shape)
    assert np.all(resampled.lower <= resampled.upper)
    assert float(np.mean(resampled.upper - resampled.lower)) == pytest.approx(0.35, abs=1e-4)


def test_lesion_engine_refuses_quantiles(tmp_path):
    from monai.networks.nets import UNet

    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}
    torch.save(UNet(**args).state_dict(), tmp_path / "w.pt")
    data = quantile_card_dict({"state_dict": {"network": "UNet", "args": args, "weights": "w.pt"}})
    data["output"] = {"activation": "softmax", "lesion_channel": 1}
    card = ModelCard.from_dict(data, tmp_path / "model_card.json")
    volume = Volume(np.zeros((8, 16, 16), np.float32), Geometry(shape=(8, 16, 16)), None)
    with pytest.raises(ConformalSegError, match="not a quantile regression model"):
        InferenceEngine(card, device="cpu").predict_quantiles(volume)


# ----------------------------------------------------------------------------- data, training, CLI


def test_denoising_dataset_is_seeded_and_documented(tmp_path):
    a = next(denoising_cases(1, 5))
    b = next(denoising_cases(1, 5))
    np.testing.assert_array_equal(a.noisy, b.noisy)
    assert a.clean.min() >= 0 and a.clean.max() <= 1
    residual = a.noisy - a.clean
    assert float(residual.std()) == pytest.approx(NOISE_SIGMA, rel=0.05)
    np.testing.assert_array_equal(window(np.array([-175.0, 250.0, -1000.0, 1000.0])), [0, 1, 0, 1])
    out = write_denoising_dataset(tmp_path / "d", 2, 5)
    for folder in ("noisy", "clean", "organs"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["noise"]["sigma"] == NOISE_SIGMA
    with pytest.raises(ConformalSegError, match="already holds data"):
        write_denoising_dataset(out, 2, 5)


def test_one_epoch_denoise_training_writes_a_loadable_card(tmp_path):
    out = tmp_path / "tiny_denoiser"
    assert (
        run_train(
            "--task",
            "denoise",
            "--phantoms",
            "2",
            "--heldout",
            "1",
            "--epochs",
            "1",
            "--phantom-shape",
            "16",
            "16",
            "16",
            "--patch-size",
            "16",
            "16",
            "16",
            "--crop-size",
            "8",
            "8",
            "8",
            "--channels",
            "4",
            "8",
            "--strides",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        )
        == 0
    )
    card = resolve_model(out)
    assert card.output.quantiles == (0.1, 0.9)
    training = card.training
    assert training["task"] == "denoise" and training["loss"] == "pinball"
    assert 0.0 <= training["heldout_coverage"] <= 1.0 and training["heldout_mean_length"] is not None
    assert "--task denoise" in training["command"]
    log = json.loads((out / "training.json").read_text())
    assert log["task"] == "denoise" and len(log["epochs"]) == 1
    case = next(denoising_cases(1, 0, shape=(16, 16, 16), spacing=(9.6, 9.6, 9.0)))
    prediction = InferenceEngine(card, device="cpu").predict_quantiles(Volume(case.noisy, case.geometry, None))
    assert prediction.maps.shape == (2, 16, 16, 16)


def test_infer_then_semcrc_organ_calibration_end_to_end(band_card, tmp_path, capsys):
    data = write_denoising_dataset(tmp_path / "data", 12, 11)
    pred = tmp_path / "pred"
    assert (
        cli.main(
            ["infer", "--model", str(band_card), "--images", str(data / "noisy"), "--out", str(pred), "--device", "cpu"]
        )
        == 0
    )
    lower = sorted(p.name for p in (pred / "lower").iterdir())
    assert (
        lower
        == sorted(p.name for p in (pred / "upper").iterdir())
        == sorted(p.name for p in (data / "clean").iterdir())
    )
    assert not (pred / "probs").exists()
    report = json.loads((pred / "inference.json").read_text())
    assert report["cases"][0]["lower"] == "lower/phantom_000.nii.gz"
    assert (
        cli.main(
            [
                "infer",
                "--model",
                str(band_card),
                "--images",
                str(data / "noisy"),
                "--out",
                str(tmp_path / "p2"),
                "--mc-dropout",
                "2",
            ]
        )
        == 2
    )
    profile = tmp_path / "organs.json"
    assert (
        cli.main(
            [
                "calibrate",
                "--method",
                "sem-crc-organ",
                "--lower",
                str(pred / "lower"),
                "--upper",
                str(pred / "upper"),
                "--truth",
                str(data / "clean"),
                "--organs",
                str(data / "organs"),
                "--organ-labels",
                PHANTOM_ORGANS,
                "--body",
                "nonzero",
                "--epsilon",
                "0.2",
                "--n-opt",
                "4",
                "--out",
                str(profile),
            ]
        )
        == 0
    )
    groups = json.loads(profile.read_text())
    assert "liver" in json.dumps(groups) and "lesion" in json.dumps(groups)


# ----------------------------------------------------------------------------- shipped model and demo


def test_shipped_denoiser_coverage_on_fresh_phantoms():
    card = resolve_model(SHIPPED)
    assert card.output.quantiles == (0.1, 0.9)
    assert (SHIPPED / "weights.pt").stat().st_size < 2 * 1024 * 1024
    assert (SHIPPED / "README.md").is_file() and (SHIPPED / "training.json").is_file()
    training = card.training
    assert training["data"]["phantom_seed"] == 1100
    assert COVERAGE_BAND[0] <= training["heldout_coverage"] <= COVERAGE_BAND[1]
    pairs = phantom_denoising_pairs(3, 31337)  # fresh: another phantom stream than training (1100)
    metrics = evaluate_denoiser(card, pairs, device="cpu")
    assert COVERAGE_BAND[0] <= metrics["coverage"] <= COVERAGE_BAND[1], metrics["coverage"]
    assert LENGTH_BAND[0] <= metrics["mean_length"] <= LENGTH_BAND[1], metrics["mean_length"]
    # the denoiser beats the trivial interval noisy +- 1.28 sigma (length 0.51) in length
    assert metrics["mean_length"] < 2 * 1.2816 * NOISE_SIGMA


def test_semcrc_demo_writes_its_files(tmp_path):
    from ConformalSegLib.demo.semcrc_intervals import run_semcrc_demo

    text = run_semcrc_demo(tmp_path / "demo", n_cases=12, seed=7, model=SHIPPED, epsilon=0.2, runs=2)
    out = tmp_path / "demo"
    for name in (
        "semcrc_demo.md",
        "interval_evaluation.png",
        "interval_evaluation.json",
        "heldout_length.png",
        "heldout_table.csv",
        "heldout_table.json",
        "profile.json",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "pred" / "lower").iterdir())) == 12
    assert "| sem-CRC (per organ) |" in text and "heldout_length.png" in text and "| liver |" in text
    assert (out / "semcrc_demo.md").read_text() == text
    assert "must come from the segmentation model's output" in text and "per-scan mean over the test scans" in text
    from ConformalSegLib.semcrc.profile import load_interval_profile

    profile = load_interval_profile(out / "profile.json")  # stores its per-scan thresholds: a new epsilon, no volume
    assert profile.recalibrate(0.3).calibration.epsilon == 0.3 and profile.calibration.omega.min() < 0  # from zero
    table = json.loads((out / "heldout_table.json").read_text())
    assert {row["group"] for row in table["groups"]} >= {"lung", "liver", "kidney", "spleen", "bone", "body"}
    image = load_image(out / "pred" / "upper" / "phantom_011.nii.gz")
    assert image.array.shape == (24, 48, 48)


def test_calibrate_intervals_from_a_quantile_model(tmp_path, capsys):
    """``calibrate --method crc-interval --model CARD --images noisy/ --truth clean/`` predicts the
    quantile maps itself and equals calibrating on the same maps written by ``infer``."""
    from ConformalSegLib.cli import main
    from ConformalSegLib.semcrc.phantom_denoising import write_denoising_dataset
    from ConformalSegLib.semcrc.profile import load_interval_profile

    data = write_denoising_dataset(tmp_path / "data", 8, seed=4321)
    assert (
        main(
            [
                "calibrate",
                "--method",
                "crc-interval",
                "--model",
                str(SHIPPED),
                "--images",
                str(data / "noisy"),
                "--truth",
                str(data / "clean"),
                "--epsilon",
                "0.2",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "direct.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "infer",
                "--model",
                str(SHIPPED),
                "--images",
                str(data / "noisy"),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "calibrate",
                "--method",
                "crc-interval",
                "--lower",
                str(tmp_path / "pred" / "lower"),
                "--upper",
                str(tmp_path / "pred" / "upper"),
                "--truth",
                str(data / "clean"),
                "--epsilon",
                "0.2",
                "--out",
                str(tmp_path / "folders.json"),
            ]
        )
        == 0
    )
    direct, folders = load_interval_profile(tmp_path / "direct.json"), load_interval_profile(tmp_path / "folders.json")
    assert direct.calibration.lam.tolist() == folders.calibration.lam.tolist()
    assert direct.provenance["inference"]["model"]["name"] == "phantom_denoiser_quantile"
    capsys.readouterr()
    assert (
        main(
            [
                "calibrate",
                "--method",
                "crc-interval",
                "--images",
                str(data / "noisy"),
                "--truth",
                str(data / "clean"),
                "--epsilon",
                "0.2",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
    assert "--images needs --model" in capsys.readouterr().err
